"""TokenizerSystem through the real CLI: training, logging, load_tokenizer, GAN gradient routing, DDP parity, bad
input, and the token caches the generators read."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import CONFIGS, run_dir_args, run_lit_ar
from test_quantizers import random_lpips_weights

from lit_ar.cli import cli_main
from lit_ar.data import ImageDataModule
from lit_ar.data.token_cache import TokenCache, main, split_scales, tokenizer_fingerprint, write_token_cache
from lit_ar.models.autoencoder import Autoencoder
from lit_ar.systems.tokenizer import BEFORE_PEER_LAYOUTS, TokenizerSystem, autoencoder_kwargs, load_tokenizer

QUANTIZERS = ["vq", "fsq", "lfq", "msvq", "kl"]
DEBUG = {q: str(CONFIGS / "debug" / f"tokenizer_{q}.yaml") for q in QUANTIZERS}


def scalars(run_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return [e.value for e in EventAccumulator(str(run_dir)).Reload().Scalars(tag)]


def tags(run_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator(str(run_dir)).Reload().Tags()


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_debug_config_trains_and_reconstruction_loss_falls(quantizer, tmp_path):
    extra = ["--model.init_args.lecam_weight", "0.1"] if quantizer == "vq" else []
    cli = cli_main(["fit", "--config", DEBUG[quantizer], *run_dir_args(tmp_path), "--trainer.max_steps", "20",
                    "--trainer.log_every_n_steps", "2", *extra])  # fmt: skip
    assert cli.trainer.global_step == 20, "one global step per batch although both networks step"
    rec = scalars(tmp_path, "train/rec_loss")
    assert sum(rec[-3:]) < sum(rec[:3]), f"the reconstruction loss falls: {rec}"
    logged = tags(tmp_path)
    expected = {"train/g_loss", "train/d_loss", "train/loss", "val/psnr", "val/ssim", "val/rec_loss"}
    expected |= {"val/latent_scale"} if quantizer == "kl" else {"train/codebook_usage", "train/perplexity"}
    expected |= {"train/lecam"} if quantizer == "vq" else set()
    assert expected <= set(logged["scalars"]), expected - set(logged["scalars"])
    assert max(scalars(tmp_path, "train/g_loss")) != 0, "the GAN switched on at disc_start"
    assert "val/reconstructions" in logged["images"]
    # the checkpoint loads as a frozen tokenizer that encodes and decodes the validation images
    ae = load_tokenizer(str(tmp_path / "checkpoints" / "last.ckpt"))
    assert not ae.training and not any(p.requires_grad for p in ae.parameters())
    images = torch.stack([cli.datamodule.val_set[i]["image"] for i in range(4)])
    torch.testing.assert_close(ae.decode(ae.encode(images, sample=False)), cli.model.reconstruct(images))
    if quantizer == "kl":  # the latent scale was set from the validation latents and travels in the checkpoint
        assert float(ae.quantizer.scale_factor) == pytest.approx(scalars(tmp_path, "val/latent_scale")[-1])
        assert float(ae.quantizer.scale_factor) != 1.0


def test_codebook_collapse_warns_and_is_logged(tmp_path):
    args = ["fit", "--config", DEBUG["vq"], *run_dir_args(tmp_path), "--trainer.max_steps", "4",
            "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "0",
            "--model.init_args.usage_warn_threshold", "1.01", "--model.init_args.usage_window", "2"]  # fmt: skip
    with pytest.warns(UserWarning, match=r"codebook collapse: only .* of the 64 codes were used in the last 2 steps"):
        cli_main(args)
    assert scalars(tmp_path, "train/codebook_collapse")[-1] == 1.0


def test_lpips_loss_trains_and_stays_out_of_the_checkpoint(tmp_path):
    random_lpips_weights(tmp_path)
    cli_main(["fit", "--config", DEBUG["fsq"], *run_dir_args(tmp_path / "run"), "--trainer.max_steps", "2",
              "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "0",
              "--model.init_args.lpips_weight", "1.0", "--model.init_args.lpips_path", str(tmp_path)])  # fmt: skip
    assert all(v > 0 for v in scalars(tmp_path / "run", "train/lpips"))
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert not any("lpips" in k for k in state)


def tiny_system(quantizer: str = "vq", seed: int = 0, **kwargs) -> TokenizerSystem:
    torch.manual_seed(seed)
    scales = (1, 2, 4) if quantizer == "msvq" else None
    arch = dict(base_channels=8, z_channels=16, codebook_size=64, latent_dim=4, levels=(4, 4, 4), scales=scales)
    return TokenizerSystem(image_size=16, quantizer=quantizer, disc_width=8, disc_layers=2, **arch, **kwargs)


def test_adversarial_gradients_reach_only_their_own_network():
    system = tiny_system()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    rec, _ = system.autoencoder(x)
    system.generator_adv_loss(rec).backward(retain_graph=True)
    assert all(p.grad is None for p in system.discriminator.parameters()), "G's loss must not train D"
    assert system.autoencoder.last_layer.grad.abs().sum() > 0
    system.zero_grad(set_to_none=True)
    d_loss, _ = system.discriminator_loss(x, rec)
    d_loss.backward()
    assert all(p.grad is None for p in system.autoencoder.parameters()), "D's loss must not train G"
    assert all(p.grad is not None for p in system.discriminator.parameters())


@pytest.mark.slow
def test_ddp_two_processes_agree_with_one_on_codebook_statistics(tmp_path):
    """2 gloo processes x batch 4 vs 1 x batch 8: same codes used, same restarts, same losses (GAN on from step 4)."""
    common = ["fit", "--config", DEBUG["vq"], "--trainer.max_steps", "8", "--data.shuffle", "false",
              "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "0",
              "--model.init_args.dead_code_steps", "2", "--model.init_args.disc_start", "4",
              "--model.init_args.lecam_weight", "0.1"]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    run_lit_ar([*common, *run_dir_args(one), "--data.batch_size", "8", "--trainer.devices", "1"])
    run_lit_ar([*common, *run_dir_args(two), "--data.batch_size", "4", "--trainer.devices", "2",
                "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"])  # fmt: skip
    assert sum(scalars(one, "train/restarted_codes")) > 0, "dead codes were restarted"
    for tag in ("train/codebook_usage", "train/perplexity", "train/restarted_codes", "train/rec_loss",
                "train/d_loss", "train/g_loss"):  # fmt: skip
        a, b = torch.tensor(scalars(one, tag)), torch.tensor(scalars(two, tag))
        assert len(a) == len(b) == 8, tag
        torch.testing.assert_close(b, a, rtol=2e-3, atol=1e-5, msg=f"{tag}: {a.tolist()} vs {b.tolist()}")


@pytest.mark.parametrize(
    "args,error,match",
    [
        (["--data.image_size", "18"], ValueError, r"data.image_size=18 is not divisible by the tokenizer's downsampl"),
        (["--model.init_args.scales", "[1, 3, 2, 4]"], ValueError,
         r"model.init_args.scales=\(1, 3, 2, 4\) must be positive integers in strictly increasing order"),
        (["--model.init_args.scales", "[1, 2, 3]"], ValueError,
         r"model.init_args.scales=\(1, 2, 3\) must end at the latent grid size 4"),
        (["--model.init_args.quantizer", "fsq", "--model.init_args.levels", "[4, 1]"], ValueError,
         r"model.init_args.levels=\(4, 1\) are not valid FSQ levels: use integers >= 2"),
        (["--model.init_args.quantizer", "lfq", "--model.init_args.codebook_size", "100"], ValueError,
         r"model.init_args.codebook_size=100 is not valid for lfq: use a power of two"),
        (["--model.init_args.lpips_weight", "1.0"], ValueError,
         r"model.init_args.lpips_weight=1.0 needs model.init_args.lpips_path"),
        (["--model.init_args.lpips_weight", "1.0", "--model.init_args.lpips_path", "/nonexistent"],
         ValueError, r"model.init_args.lpips_path='/nonexistent' lacks \['vgg16-397923af.pth', 'vgg.pth'\]"),
        (["--model.init_args.disc_layers", "4"], ValueError, r"model.init_args.disc_layers=4 is too deep for 16x16"),
    ],
)  # fmt: skip
def test_bad_settings_are_refused_with_the_setting_named(args, error, match, tmp_path):
    with pytest.raises(error, match=match):
        cli_main(["--config", DEBUG["msvq"], *run_dir_args(tmp_path), *args], run=False)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'nope.ckpt' does not exist \(model.init_args.tokenizer_ckpt\)"):
        load_tokenizer("nope.ckpt")
    torch.save({"state_dict": {"model.w": torch.zeros(1)}, "hyper_parameters": {"width": 8}}, tmp_path / "c.ckpt")
    with pytest.raises(ValueError, match=r"is not a TokenizerSystem checkpoint"):
        load_tokenizer(str(tmp_path / "c.ckpt"))


# ---- token caches ---------------------------------------------------------------------------------------------
def save_checkpoint(system: TokenizerSystem, path: Path) -> str:
    """The two entries of a Lightning checkpoint that load_tokenizer reads (a real one is tested above)."""
    torch.save({"hyper_parameters": dict(system.hparams), "state_dict": system.state_dict()}, path)
    return str(path)


def data(**kwargs) -> ImageDataModule:
    return ImageDataModule(**{"dataset": "shapes", "image_size": 16, "num_train": 24, "num_val": 8, "batch_size": 6,
                              **kwargs})  # fmt: skip


@pytest.mark.parametrize("quantizer", ["vq", "msvq", "kl"])
def test_cache_write_read_round_trip(quantizer, tmp_path):
    system = tiny_system(quantizer)
    ckpt = save_checkpoint(system, tmp_path / "tok.ckpt")
    folder = write_token_cache(ckpt, str(tmp_path / "cache"), data(), hflip=True, batch_size=10)  # partial batches
    cache = TokenCache(str(folder))
    ae = load_tokenizer(ckpt)
    meta = cache.meta
    assert meta["tokenizer_fingerprint"] == tokenizer_fingerprint(ae) and meta["splits"] == {"train": 24, "val": 8}
    assert (meta["vocab_size"], meta["grid_size"], meta["latent_channels"]) == (ae.vocab_size, 4, ae.latent_channels)
    assert meta["scales"] == ([1, 2, 4] if quantizer == "msvq" else None) and meta["num_classes"] == 10
    # the cache holds exactly what the tokenizer encodes, for the image and its mirror
    source = data()
    source.setup("fit")
    images = torch.stack([source.val_set[i]["image"] for i in range(8)])  # centre crops, no augmentation
    exact = cache.dataset("val", train=False, hflip=False)
    cached = torch.stack([exact[i]["tokens"] for i in range(8)])
    for variant, view in enumerate([images, images.flip(-1)]):
        tokens = ae.encode(view, sample=False)
        if quantizer == "kl":
            stored = torch.from_numpy(np.load(folder / "val_mean.npy")[:, variant])
            torch.testing.assert_close(stored, tokens, atol=1e-5, rtol=1e-5)
        else:
            flat = torch.cat(tokens, 1) if quantizer == "msvq" else tokens
            assert torch.equal(torch.from_numpy(np.load(folder / "val_tokens.npy")[:, variant].astype(np.int64)), flat)
        if variant == 0:
            torch.testing.assert_close(cached, torch.cat(tokens, 1) if quantizer == "msvq" else tokens)
    assert [int(exact[i]["label"]) for i in range(8)] == [int(source.val_set[i]["label"]) for i in range(8)]
    # the datamodule serves `tokens` in place of `image`
    dm = data(token_cache=str(folder), hflip=True)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"tokens", "label"} and dm.num_classes == 10
    if quantizer == "kl":
        assert batch["tokens"].shape == (6, 16, ae.latent_channels) and batch["tokens"].dtype == torch.float32
        means = torch.from_numpy(np.load(folder / "train_mean.npy"))
        assert not any(torch.allclose(batch["tokens"][0], means[j, v]) for j in range(24) for v in range(2)), (
            "training batches are posterior samples, not the mean"
        )
    else:
        assert (
            batch["tokens"].shape == (6, sum(s * s for s in (ae.scales or (4,))))
            and batch["tokens"].dtype == torch.long
        )
        if quantizer == "msvq":
            assert [t.shape for t in split_scales(batch["tokens"], ae.scales)] == [(6, 1), (6, 4), (6, 16)]
            assert ae.decode(split_scales(batch["tokens"], ae.scales)).shape == (6, 3, 16, 16)


def test_ten_crop_cache_holds_llamagen_s_ten_views_and_training_draws_among_them(tmp_path):
    """crops="ten" (LlamaGen's --ten-crop): the image enlarged by data.resize_scale (16 -> 20 px), its centre and four
    corner crops, each mirrored. Every variant is the tokenizer's code of that crop; the centre one is the centre-crop
    cache's; training draws among all ten (the unmirrored five without hflip); validation takes the centre."""
    from lit_ar.data.datamodule import TransformedDataset
    from lit_ar.data.transforms import ImageTransform

    ckpt = save_checkpoint(tiny_system("vq"), tmp_path / "tok.ckpt")
    ae = load_tokenizer(ckpt)
    ten = write_token_cache(ckpt, str(tmp_path / "ten"), data(resize_scale=1.25), crops="ten", batch_size=5)
    centre = write_token_cache(ckpt, str(tmp_path / "centre"), data(resize_scale=1.25), batch_size=5)
    corners = ["center", "top_left", "top_right", "bottom_left", "bottom_right"]
    assert TokenCache(str(ten)).meta["variants"] == corners + [f"{c}_hflip" for c in corners]
    source = data(resize_scale=1.25)
    source.setup("fit")
    enlarged = TransformedDataset(source.splits.val, ImageTransform(20, 3, 1.0, "center", False), False)
    images = torch.stack([enlarged[i]["image"] for i in range(8)])  # (8, 3, 20, 20)
    offsets = [(2, 2), (0, 0), (0, 4), (4, 0), (4, 4)]  # top, left of each 16-px crop
    views = [images[..., i : i + 16, j : j + 16] for i, j in offsets]
    stored = torch.from_numpy(np.load(ten / "val_tokens.npy").astype(np.int64))  # (8, 10, 16)
    for v, view in enumerate(views + [x.flip(-1) for x in views]):
        assert torch.equal(stored[:, v], ae.encode(view)), f"variant {v}"
    assert torch.equal(stored[:, [0, 5]], torch.from_numpy(np.load(centre / "val_tokens.npy").astype(np.int64)))
    assert len({tuple(stored[0, v].tolist()) for v in range(10)}) > 5, "the crops encode to different codes"
    # the variants a training sample draws: (index, epoch) as the ResumableSampler yields
    cache = TokenCache(str(ten))
    for hflip, allowed in [(True, range(10)), (False, range(5))]:
        train = cache.dataset("train", train=True, hflip=hflip)
        tokens = torch.from_numpy(np.load(ten / "train_tokens.npy").astype(np.int64))
        drawn = {next(v for v in range(10) if torch.equal(train[(i, e)]["tokens"], tokens[i, v]))
                 for i in range(24) for e in range(3)}  # fmt: skip
        assert drawn <= set(allowed) and len(drawn) > len(allowed) // 2, (hflip, drawn)
    val = cache.dataset("val", train=False, hflip=True)
    assert all(torch.equal(val[i]["tokens"], stored[i, 0]) for i in range(8))
    with pytest.raises(ValueError, match=r"crops='ten' with data.resize_scale=1.0 gives five identical crops"):
        write_token_cache(ckpt, str(tmp_path / "bad"), data(), crops="ten")
    with pytest.raises(ValueError, match=r"crops='nine' is not known; use one of \('center', 'ten'\)"):
        write_token_cache(ckpt, str(tmp_path / "bad"), data(), crops="nine")


def test_a_generator_trains_through_the_cli_on_a_ten_crop_cache(debug_tokenizer, tmp_path):
    folder = main(["--tokenizer_ckpt", str(debug_tokenizer), "--output", str(tmp_path / "cache"), "--crops", "ten",
                   "--data.resize_scale", "1.1", "--data.image_size", "16", "--data.num_train", "64",
                   "--data.num_val", "16"])  # fmt: skip
    assert len(TokenCache(str(folder)).meta["variants"]) == 10
    cli = cli_main(["fit", "--config", str(CONFIGS / "debug" / "causal.yaml"), *run_dir_args(tmp_path / "run"),
                    "--model.init_args.tokenizer_ckpt", str(debug_tokenizer), "--data.token_cache", str(folder),
                    "--data.hflip", "true", "--trainer.max_steps", "3"])  # fmt: skip
    assert cli.trainer.global_step == 3 and torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_checkpoints_from_before_the_peer_layouts_load_as_they_were_built(tmp_path):
    """A tokenizer checkpoint saved before downsample_padding, quant_conv_kernel, double_z and decoder_level_attention
    existed (its hyper-parameters lack them) was built with symmetric padding, 1x1 quant convs, a single z and level
    attention in the decoder, whatever its preset: it loads that way, not as the preset now reads."""
    system = tiny_system("msvq", preset="var_msvq16", ch_mult=(1, 2, 2))  # 16 px -> 4x4, scales 1, 2, 4
    hparams = {k: v for k, v in system.hparams.items() if k not in BEFORE_PEER_LAYOUTS}
    old = Autoencoder(**autoencoder_kwargs(hparams))
    assert old.quant_conv.kernel_size == (1, 1) and not old.encoder.down[2].taming
    now = Autoencoder(**autoencoder_kwargs(dict(system.hparams)))  # saved with the settings: the preset's values
    assert now.quant_conv.kernel_size == (3, 3) and now.encoder.down[2].taming
    path = save_checkpoint(TokenizerSystem(**{**hparams, **BEFORE_PEER_LAYOUTS}), tmp_path / "old.ckpt")
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["hyper_parameters"] = hparams  # as an old checkpoint holds them
    torch.save(checkpoint, path)
    assert load_tokenizer(path).quant_conv.kernel_size == (1, 1)


def test_cache_refuses_another_tokenizer(tmp_path):
    ckpt = save_checkpoint(tiny_system(seed=0), tmp_path / "a.ckpt")
    other = save_checkpoint(tiny_system(seed=1), tmp_path / "b.ckpt")
    folder = main(["--tokenizer_ckpt", ckpt, "--output", str(tmp_path / "cache"), "--hflip", "false",
                   "--data.image_size", "16", "--data.num_train", "6", "--data.num_val", "2"])  # fmt: skip
    cache = TokenCache(str(folder))
    assert cache.meta["variants"] == ["center"]
    cache.check_tokenizer(ckpt)  # the writer passes
    with pytest.raises(ValueError, match=r"data.token_cache=.* was written by another tokenizer: "
                                         r"model.init_args.tokenizer_ckpt=.*b.ckpt"):  # fmt: skip
        cache.check_tokenizer(other)
    dm = data(token_cache=str(folder))  # through the datamodule, as a generator's fit would set it up
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(hparams={"tokenizer_ckpt": other}))
    with pytest.raises(ValueError, match="was written by another tokenizer"):
        dm.setup("fit")
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(hparams={"tokenizer_ckpt": ckpt}))
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"data.image_size=32, data.channels=3 differ from the token cache"):
        data(token_cache=str(folder), image_size=32).setup("fit")
    with pytest.raises(FileNotFoundError, match=r"data.token_cache='/nonexistent' is not a token cache"):
        data(token_cache="/nonexistent").setup("fit")
