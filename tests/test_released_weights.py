"""LlamaGen's, VAR's and MAR's released weights in lit_ar, checked against the peers' own code: tests/fixtures/*_tiny.pt
hold tiny models of theirs and their outputs, made by tests/fixtures/make_*_fixture.py with the peers' code.
Imported, lit_ar's models give the same codes, decoded images, logits, conditions, losses and samples."""

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import CONFIGS, run_dir_args

from lit_ar.checkpoints import load_system
from lit_ar.cli import cli_main
from lit_ar.guidance import cfg_scale, guide
from lit_ar.methods.any_order import AnyOrderSampling
from lit_ar.methods.base import ContinuousSampling
from lit_ar.methods.groups import ScaleSampling
from lit_ar.models.autoencoder import PRESETS, Autoencoder
from lit_ar.models.diffusion_head import DiffusionHead, diffusion_loss, sample_diffusion
from lit_ar.released_weights import (
    main,
    mar_state_dict,
    read_weights,
    write_llamagen_checkpoints,
    write_mar_checkpoints,
    write_mar_kl_checkpoint,
    write_var_checkpoints,
)
from lit_ar.systems.causal_ar import CausalARSystem
from lit_ar.systems.flow_ar import FlowARSystem
from lit_ar.systems.scale_ar import ScaleARSystem
from lit_ar.systems.tokenizer import load_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "llamagen_tiny.pt"
# the tiny VQ's architecture (the released VQ-16 is lit_ar's `llamagen_vq16` preset) and the tiny GPT's size
TOKENIZER_ARCH = dict(preset=None, base_channels=32, ch_mult=(1, 2), num_res_blocks=1, mid_attention=True,
                      z_channels=32, codebook_size=64, latent_dim=8, downsample_padding="taming")  # fmt: skip
TINY_VQ = {**TOKENIZER_ARCH, "disc_width": 8, "disc_layers": 2}


@pytest.fixture(scope="module")
def fixture() -> dict:
    return torch.load(FIXTURE, weights_only=True)


@pytest.fixture(scope="module")
def released_files(fixture, tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("llamagen")
    for part in ("vq", "gpt"):
        torch.save(fixture[part], folder / f"{part}.pt")  # as LlamaGen's released files: {"model": state_dict}
    return folder / "vq.pt", folder / "gpt.pt"


@pytest.fixture(scope="module")
def imported(released_files) -> tuple[Path, Path]:
    vq, gpt = released_files
    return write_llamagen_checkpoints(str(vq), str(gpt), str(vq.parent / "out"), None, 16, 10,  # size: read
                                      tokenizer_settings=TINY_VQ)  # fmt: skip


def test_imported_tokenizer_gives_llamagen_s_codes_and_images(fixture, imported):
    tokenizer = load_tokenizer(str(imported[0]))
    codes = tokenizer.encode(fixture["images"])  # (2, 64)
    assert torch.equal(codes, fixture["codes"])
    decoded = fixture["decoded"].clamp(-1, 1)  # lit_ar decodes to images in [-1, 1]
    assert 0 < (decoded != fixture["decoded"]).float().mean() < 0.5
    torch.testing.assert_close(tokenizer.decode(fixture["codes"]), decoded, rtol=1e-4, atol=1e-5)


def test_imported_gpt_gives_llamagen_s_logits(fixture, imported):
    system = load_system(str(imported[1]), CausalARSystem)
    assert system.hparams.prefix_rope == "zero" and system.model.vocab_size == 64
    assert system.hparams.preset == "GPT-nano"  # read from the weights: width 64, 2 layers
    # LlamaGen's FID sampling (GPT-B, GPT-L), stored as the complete typed settings
    assert system.hparams.predict_kwargs == AnyOrderSampling(cfg=2.0, temperature=1.0).as_dict()
    logits = system.model(fixture["tokens"][:, :-1], fixture["labels"])  # (2, 64, 64)
    torch.testing.assert_close(logits.float(), fixture["logits"], rtol=1e-4, atol=1e-5)


def test_imported_gpt_decodes_llamagen_s_greedy_sequences(fixture, imported):
    """LlamaGen's KV-cached `generate`, greedy, CFG 2.0, and lit_ar's sampler (KV cache, CFG batch, LlamaGen's
    prefix RoPE) with top-k 1 make the same 64 tokens."""
    system = load_system(str(imported[1]), CausalARSystem)
    tokens = system.generate(torch.tensor([3, 7]), cfg=2.0, top_k=1)  # (2, 64)
    assert torch.equal(tokens, fixture["greedy"].long())


def test_the_taming_padding_is_what_makes_the_codes_match(fixture, imported):
    """lit_ar's own tokenizers pad their stride-2 convs symmetrically; LlamaGen's weights need taming's padding."""
    tokenizer = load_tokenizer(str(imported[0]))
    symmetric = Autoencoder(image_size=16, **{**TOKENIZER_ARCH, "downsample_padding": "symmetric"})
    symmetric.load_state_dict(tokenizer.state_dict())
    assert not torch.equal(symmetric.encode(fixture["images"]), fixture["codes"])
    assert PRESETS["llamagen_vq16"]["downsample_padding"] == "taming"
    known = r"\('symmetric', 'taming'\)"
    with pytest.raises(ValueError, match=rf"downsample_padding='reflect' is not known; use one of {known}"):
        Autoencoder(image_size=16, **{**TOKENIZER_ARCH, "downsample_padding": "reflect"})


def test_imported_generator_samples_through_the_cli(imported, tmp_path):
    """`lit_ar predict` with the written generator.yaml stacked on a causal config: LlamaGen's model, its weights."""
    model_config = imported[1].with_suffix(".yaml")
    cli = cli_main(["predict", "--config", str(CONFIGS / "debug" / "causal.yaml"), "--config", str(model_config),
                    *run_dir_args(tmp_path), "--ckpt_path", str(imported[1])])  # fmt: skip
    assert cli.model.hparams.prefix_rope == "zero" and cli.model.hparams.tokenizer_ckpt == str(imported[0])
    loaded = load_system(str(imported[1]), CausalARSystem)
    assert all(
        torch.equal(a, b) for a, b in zip(cli.model.model.state_dict().values(), loaded.model.state_dict().values())
    )
    samples = np.load(tmp_path / "samples.npz")
    assert samples["images"].shape == (20, 16, 16, 3) and (tmp_path / "grid.png").is_file()


def test_imported_generator_samples_without_its_training_data(imported, tmp_path):
    """`data.dataset: labels` gives the classes and no images: enough for `lit_ar predict` of a released model."""
    cli_main(["predict", "--config", str(CONFIGS / "debug" / "causal.yaml"), "--config",
              str(imported[1].with_suffix(".yaml")), *run_dir_args(tmp_path), "--ckpt_path", str(imported[1]),
              "--data.dataset", "labels", "--data.classes", "10", "--data.predict_per_class", "1"])  # fmt: skip
    samples = np.load(tmp_path / "samples.npz")
    assert samples["images"].shape == (10, 16, 16, 3) and samples["labels"].tolist() == list(range(10))
    with pytest.raises(ValueError, match=r"data.dataset='labels' has classes but no images: it serves `lit_ar "
                                         r"predict` only; `fit` needs image data"):  # fmt: skip
        cli_main(["fit", "--config", str(CONFIGS / "debug" / "causal.yaml"), "--config",
                  str(imported[1].with_suffix(".yaml")), *run_dir_args(tmp_path / "fit"), "--data.dataset", "labels",
                  "--data.classes", "10"])  # fmt: skip
    with pytest.raises(ValueError, match=r"data.dataset='labels' needs data.classes, the number of classes"):
        cli_main(["predict", "--config", str(CONFIGS / "debug" / "causal.yaml"), "--config",
                  str(imported[1].with_suffix(".yaml")), *run_dir_args(tmp_path / "none"), "--ckpt_path",
                  str(imported[1]), "--data.dataset", "labels"])  # fmt: skip


def test_the_command_line_and_its_bad_inputs(fixture, released_files, tmp_path):
    vq, gpt = released_files
    with pytest.raises(FileNotFoundError, match=r"gpt_ckpt='/nonexistent.pt': no such file"):
        main(["llamagen", "--vq_ckpt", str(vq), "--gpt_ckpt", "/nonexistent.pt", "--output", str(tmp_path)])
    # the command builds LlamaGen's VQ-16: the tiny VQ does not fit it, and the message says how
    with pytest.raises(ValueError, match=r"vq_ckpt=.*vq.pt' does not fit the model its settings build: .*shapes"):
        main(["llamagen", "--vq_ckpt", str(vq), "--gpt_ckpt", str(gpt), "--gpt_preset", "GPT-nano", "--image_size",
              "64", "--num_classes", "10", "--output", str(tmp_path / "cli")])  # fmt: skip
    # the wrong size of GPT: every mismatch is named, with the setting to change
    wrong = r"\['cls_embedding.weight: file \(11, 64\), model \(11, 128\)'.*gpt_preset"
    with pytest.raises(ValueError, match=rf"gpt_ckpt=.* does not fit the model its settings build: .*{wrong}"):
        write_llamagen_checkpoints(str(vq), str(gpt), str(tmp_path / "micro"), "GPT-micro", 16, 10,
                                   tokenizer_settings=TINY_VQ)  # fmt: skip
    one_layer = {k: v for k, v in fixture["gpt"]["model"].items() if not k.startswith("layers.1.")}
    torch.save({"model": one_layer}, tmp_path / "one_layer.pt")
    with pytest.raises(ValueError, match=r"holds a GPT of width 64 and 1 layers, which no preset has; known sizes"):
        write_llamagen_checkpoints(str(vq), str(tmp_path / "one_layer.pt"), str(tmp_path / "one"), None, 16, 10)
    # LlamaGen's training scripts store their argparse arguments beside the weights: read without unpickling code
    with_args = tmp_path / "with_args.pt"
    torch.save({"model": fixture["gpt"]["model"], "args": argparse.Namespace(gpt_model="GPT-B"), "steps": 5}, with_args)
    assert read_weights(str(with_args), "gpt_ckpt").keys() == fixture["gpt"]["model"].keys()
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"vq_ckpt=.*list.pt' holds no state dict"):
        read_weights(str(tmp_path / "list.pt"), "vq_ckpt")


def test_lit_ar_test_scores_the_imported_generator(imported, classifier_ckpt, tmp_path):
    """The evaluation stack of the README on the imported model: LlamaGen's weights under lit_ar's protocol."""
    from test_generator_evaluation import EVAL_CONFIG, evaluator_args

    from lit_ar.evaluation import EvaluationRecord

    model_config = str(imported[1].with_suffix(".yaml"))
    cli_main(["test", "--config", str(CONFIGS / "debug" / "causal.yaml"), "--config", model_config, "--config",
              EVAL_CONFIG, *run_dir_args(tmp_path / "run"), *evaluator_args(classifier_ckpt, tmp_path), "--ckpt_path",
              str(imported[1])])  # fmt: skip
    record = EvaluationRecord.from_json(tmp_path / "run" / "eval" / "evaluation.json")
    assert record.checkpoint["path"] == str(imported[1]) and record.num_samples == 40
    assert record.metrics["fid"] > 0 and 0 <= record.metrics["class_accuracy"] <= 1


def test_the_imported_generator_fine_tunes_on_other_data(imported, tmp_path):
    """`init_weights` starts a new `fit` from LlamaGen's weights: here on the built-in shapes, through the CLI."""
    cli = cli_main(["fit", "--config", str(CONFIGS / "debug" / "causal.yaml"), "--config",
                    str(imported[1].with_suffix(".yaml")), *run_dir_args(tmp_path), "--model.init_args.init_weights",
                    str(imported[1]), "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0"])  # fmt: skip
    loaded = load_system(str(imported[1]), CausalARSystem)
    start, tuned = loaded.model.state_dict(), cli.model.model.state_dict()
    assert cli.trainer.global_step == 3 and torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    # trained from LlamaGen's weights: moved by 3 steps of at most lr each, not re-initialised
    moved = max(float((tuned[k] - v).abs().max()) for k, v in start.items())
    assert 0 < moved < 3 * 2 * cli.model.hparams.lr


# ---- VAR ---------------------------------------------------------------------------------------------------------
VAR_FIXTURE = Path(__file__).parent / "fixtures" / "var_tiny.pt"
# the tiny VQVAE of tests/fixtures/make_var_fixture.py (the released one is lit_ar's `var_msvq16` preset)
VAR_VAE = dict(preset=None, base_channels=32, ch_mult=(1, 2), num_res_blocks=1, mid_attention=True, z_channels=8,
               codebook_size=64, latent_dim=8, downsample_padding="taming", quant_conv_kernel=3,
               scales=(1, 2, 3, 4, 5, 6, 8), disc_width=8, disc_layers=2)  # fmt: skip


VAR_TOKENS = [s * s for s in VAR_VAE["scales"]]


@pytest.fixture(scope="module")
def var_fixture() -> dict:
    return torch.load(VAR_FIXTURE, weights_only=True)


@pytest.fixture(scope="module")
def var_imported(var_fixture, tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("var")
    for part in ("vae", "var"):
        torch.save(var_fixture[part], folder / f"{part}.pth")  # as VAR's released files: a bare state dict
    return write_var_checkpoints(str(folder / "vae.pth"), str(folder / "var.pth"), str(folder / "out"), None, 16, 10,
                                 tokenizer_settings=VAR_VAE, generator_settings={"dim": 64, "n_heads": 2})  # fmt: skip


def test_imported_var_tokenizer_gives_var_s_codes_and_images(var_fixture, var_imported):
    tokenizer = load_tokenizer(str(var_imported[0]))
    codes = torch.cat(tokenizer.encode(var_fixture["images"]), 1)  # (2, 155): 7 scales, 1 + 4 + ... + 64 tokens
    assert torch.equal(codes, var_fixture["codes"])
    decoded = tokenizer.decode(list(var_fixture["codes"].split(VAR_TOKENS, dim=1)))
    torch.testing.assert_close(decoded, var_fixture["decoded"], rtol=1e-4, atol=1e-5)


def test_imported_var_gives_var_s_logits(var_fixture, var_imported):
    system = load_system(str(var_imported[1]), ScaleARSystem)
    indices = list(var_fixture["codes"].split(VAR_TOKENS, dim=1))
    inputs = system.tokenizer.quantizer.teacher_forcing_inputs(indices)  # (2, L - 1, 8)
    logits = system.model(var_fixture["labels"], inputs)  # (2, 155, 64)
    torch.testing.assert_close(logits.float(), var_fixture["logits"], rtol=1e-4, atol=1e-5)


def test_imported_var_samples_with_var_s_fid_settings(var_imported):
    """VAR's README samples for FID with cfg=1.5, top_k=900, top_p=0.96, and guides scale k of K with
    (1 + t) * cond - t * uncond, t = cfg * k / (K - 1): lit_ar's linear schedule with cfg 2.5 is that guidance."""
    kwargs = load_system(str(var_imported[1]), ScaleARSystem).hparams.predict_kwargs
    assert kwargs == ScaleSampling(cfg=2.5, cfg_schedule="linear", top_k=900, top_p=0.96).as_dict()
    cond, uncond = torch.randn(3, 64), torch.randn(3, 64)
    for k in range(10):
        t = 1.5 * k / 9
        ours = guide(cond, uncond, cfg_scale("linear", kwargs["cfg"], k / 9))
        torch.testing.assert_close(ours, (1 + t) * cond - t * uncond)


def test_imported_var_samples_var_s_greedy_images(var_fixture, var_imported):
    """VAR's `autoregressive_infer_cfg`, greedy (top-k 1), cfg=1.5, and lit_ar's scale-by-scale sampler with the KV
    cache, linear cfg 2.5 and top-k 1 make the same images."""
    system = load_system(str(var_imported[1]), ScaleARSystem)
    images = system.sample(torch.tensor([3, 7]), cfg=2.5, cfg_schedule="linear", top_k=1)  # (2, 3, 16, 16) in [-1, 1]
    torch.testing.assert_close((images + 1) / 2, var_fixture["greedy"], rtol=1e-4, atol=1e-5)


def test_imported_var_samples_through_the_cli(var_imported, tmp_path):
    cli = cli_main(["predict", "--config", str(CONFIGS / "debug" / "scale.yaml"), "--config",
                    str(var_imported[1].with_suffix(".yaml")), *run_dir_args(tmp_path), "--ckpt_path",
                    str(var_imported[1])])  # fmt: skip
    assert cli.model.hparams.depth == 2 and cli.model.hparams.tokenizer_ckpt == str(var_imported[0])
    assert np.load(tmp_path / "samples.npz")["images"].shape[1:] == (16, 16, 3)


def test_var_command_line_and_bad_inputs(var_fixture, var_imported, tmp_path):
    folder = var_imported[0].parent.parent
    # the command builds VAR's VQVAE: the tiny one does not fit it, and the message says how
    with pytest.raises(ValueError, match=r"vae_ckpt=.*vae.pth' does not fit the model its settings build: .*shapes"):
        main(["var", "--vae_ckpt", str(folder / "vae.pth"), "--var_ckpt", str(folder / "var.pth"), "--depth", "2",
              "--output", str(tmp_path / "cli")])  # fmt: skip
    shared = {**var_fixture["var"], "shared_ada_lin.1.weight": torch.zeros(1)}
    torch.save(shared, tmp_path / "shared.pth")
    with pytest.raises(ValueError, match=r"share one AdaLN linear across blocks \(shared_aln\)"):
        write_var_checkpoints(str(folder / "vae.pth"), str(tmp_path / "shared.pth"), str(tmp_path / "x"), 2, 16, 10,
                              tokenizer_settings=VAR_VAE, generator_settings={"dim": 64, "n_heads": 2})  # fmt: skip


# ---- MAR's KL-16 -------------------------------------------------------------------------------------------------
MAR_KL = dict(preset=None, base_channels=32, ch_mult=(1, 2), num_res_blocks=1, mid_attention=True, z_channels=4,
              latent_dim=4, downsample_padding="taming", quant_conv_kernel=1, double_z=True,
              decoder_level_attention=False, disc_width=8, disc_layers=2)  # fmt: skip


def test_imported_mar_kl_tokenizer_gives_mar_s_latents_and_images(tmp_path):
    """MAR's KL-VAE in lit_ar: the same posterior (mean, and std through the token cache's moments), the same
    decoded images; latents scaled by MAR's 0.2325. Then the flow family trains on it through the CLI."""
    fixture = torch.load(Path(__file__).parent / "fixtures" / "mar_kl_tiny.pt", weights_only=True)
    torch.save(fixture["vae"], tmp_path / "kl16.ckpt")
    path = write_mar_kl_checkpoint(str(tmp_path / "kl16.ckpt"), str(tmp_path / "out"), 16, 10,
                                   tokenizer_settings=MAR_KL)  # fmt: skip
    tokenizer = load_tokenizer(str(path))
    latents = tokenizer.encode(fixture["images"], sample=False)  # (2, 64, 4): the mean, scaled
    expected = fixture["mean"].flatten(2).transpose(1, 2) * 0.2325
    torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-5)
    mean, logvar = tokenizer.quantizer.moments(tokenizer.quant_conv(tokenizer.encoder(fixture["images"])))
    torch.testing.assert_close(logvar, fixture["logvar"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tokenizer.decode(latents), fixture["decoded"].clamp(-1, 1), rtol=1e-4, atol=1e-5)
    # the flow family (MAR-style) trains on the imported tokenizer's latents
    cli = cli_main(["fit", "--config", str(CONFIGS / "debug" / "flow_mar.yaml"), *run_dir_args(tmp_path / "run"),
                    "--model.init_args.tokenizer_ckpt", str(path), "--trainer.max_steps", "2",
                    "--trainer.limit_val_batches", "0"])  # fmt: skip
    assert cli.trainer.global_step == 2 and torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    with pytest.raises(ValueError, match=r"vae_ckpt=.*kl16.ckpt' does not fit the model its settings build"):
        main(["mar-kl", "--vae_ckpt", str(tmp_path / "kl16.ckpt"), "--output", str(tmp_path / "cli")])


# ---- MAR's generators (with MAR's diffusion head) ------------------------------------------------------------------
@pytest.fixture(scope="module")
def mar_fixture() -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(Path(__file__).parent / "fixtures" / "mar_tiny.pt", weights_only=True)


@pytest.fixture(scope="module")
def mar_imported(mar_fixture, tmp_path_factory) -> tuple[Path, Path, Path, Path]:
    """tokenizer.ckpt and generator.ckpt written from MAR-format files: (tokenizer, generator, kl file, mar file)."""
    folder = tmp_path_factory.mktemp("mar")
    kl = torch.load(Path(__file__).parent / "fixtures" / "mar_kl_tiny.pt", weights_only=True)
    torch.save(kl["vae"], folder / "kl16.ckpt")
    torch.save(mar_fixture["mar"], folder / "checkpoint-last.pth")  # MAR's format: model, model_ema, args
    paths = write_mar_checkpoints(str(folder / "kl16.ckpt"), str(folder / "checkpoint-last.pth"), str(folder / "out"),
                                  n_heads=2, image_size=16, tokenizer_settings=MAR_KL)  # fmt: skip
    return (*paths, folder / "kl16.ckpt", folder / "checkpoint-last.pth")


def test_imported_mar_gives_mar_s_conditions_diffusion_loss_and_ddpm_samples(mar_fixture, mar_imported):
    """MAR's EMA weights (what MAR evaluates) in a FlowARSystem with the diffusion head: the same decoder conditions,
    the same loss per token (eps MSE + the variance's bound, steps 0 and 999 among them), the same DDPM samples with
    CFG and temperature for the same noise."""
    system = load_system(str(mar_imported[1]), FlowARSystem).eval()
    assert system.hparams.head == "diffusion" and isinstance(system.head, DiffusionHead)
    with torch.no_grad():
        conditions = system.core(mar_fixture["tokens"], mar_fixture["mask"], mar_fixture["labels"])
    torch.testing.assert_close(conditions, mar_fixture["conditions"], rtol=1e-5, atol=1e-6)
    loss = diffusion_loss(system.head, mar_fixture["loss_target"], mar_fixture["loss_rows"], mar_fixture["loss_noise"],
                          mar_fixture["loss_t"], reduction="none")  # fmt: skip
    torch.testing.assert_close(loss, mar_fixture["loss"], rtol=1e-5, atol=1e-5)
    g = torch.Generator().manual_seed(11)  # the fixture drew MAR's noise from this generator, in lit_ar's order
    noise = torch.randn(6, 4, generator=g)
    assert torch.equal(noise, mar_fixture["sampler_noise"])
    sampled = sample_diffusion(system.head, mar_fixture["sampler_cond"], mar_fixture["sampler_uncond"], noise, 10,
                               cfg=2.0, temperature=0.9, generator=g)  # fmt: skip
    torch.testing.assert_close(sampled, mar_fixture["sampled"], rtol=1e-4, atol=1e-4)
    # --no_ema takes the trained weights instead
    raw = mar_state_dict(read_weights(str(mar_imported[3]), "mar_ckpt", ("model",)))
    assert not torch.equal(raw["core.z_proj.weight"], system.core.z_proj.weight)


def test_imported_mar_generates_mar_s_tokens(mar_fixture, mar_imported):
    """A whole MAR generation (4 AR steps, 10 DDPM steps, CFG 2.5 on MAR's linear schedule, temperature 0.95): MAR's
    orders and noise drawn from one generator in lit_ar's order (see make_mar_fixture.py), lit_ar given a generator
    with the same seed lands on MAR's tokens. It reveals, as MAR, the last tokens of the order first, and its CFG
    ramp never quite reaches cfg (MAR counts at least one token hidden after the last step)."""
    system = load_system(str(mar_imported[1]), FlowARSystem).eval()
    tokens = system.sample_tokens(mar_fixture["gen_labels"], cfg=2.5, temperature=0.95, steps=4, flow_steps=10,
                                  generator=torch.Generator().manual_seed(7))  # fmt: skip
    scale = mar_fixture["generated"].abs().max()  # a random head's tokens are far from unit scale: relative error
    torch.testing.assert_close(tokens / scale, mar_fixture["generated"] / scale, rtol=0, atol=1e-5)


def test_imported_mar_samples_through_the_cli_and_its_bad_inputs(mar_imported, tmp_path):
    """MAR's FID settings in generator.yaml (all tokens as AR steps here: the tiny grid has 64, MAR's 256; 100 DDPM
    steps, linear CFG), stacked on the MAR family's config; `lit_ar predict` samples it without image data."""
    model_config = yaml.safe_load(mar_imported[1].with_suffix(".yaml").read_text())["model"]["init_args"]
    mar_fid = ContinuousSampling(steps=64, flow_steps=100, cfg=3.0, cfg_schedule="linear", temperature=1.0)
    assert model_config["predict_kwargs"] == mar_fid.as_dict()
    assert (model_config["dim"], model_config["depth"], model_config["decoder_depth"], model_config["buffer_size"],
            model_config["head_width"], model_config["head_depth"]) == (32, 2, 2, 4, 64, 2)  # fmt: skip
    cli_main(["predict", "--config", str(CONFIGS / "debug" / "flow_mar.yaml"), "--config",
              str(mar_imported[1].with_suffix(".yaml")), *run_dir_args(tmp_path), "--ckpt_path", str(mar_imported[1]),
              "--data.dataset", "labels", "--data.classes", "10", "--data.predict_per_class", "1",
              "--model.init_args.predict_kwargs", '{"steps": 4, "flow_steps": 5, "cfg": 2.0}'])  # fmt: skip
    samples = np.load(tmp_path / "samples.npz")
    assert samples["images"].shape == (10, 16, 16, 3) and samples["labels"].tolist() == list(range(10))
    kl, mar = str(mar_imported[2]), str(mar_imported[3])
    with pytest.raises(ValueError, match=r"holds a MAR of width 32, which is none of MAR's sizes \[768, 1024, 1280\]; "
                                         r"pass its attention heads \(--n_heads\)"):  # fmt: skip
        main(["mar", "--vae_ckpt", kl, "--mar_ckpt", mar, "--output", str(tmp_path / "cli")])
    # the command builds MAR's KL-16: the tiny KL-VAE does not fit it, and the message names the file
    with pytest.raises(ValueError, match=r"vae_ckpt=.*kl16.ckpt' does not fit the model its settings build"):
        main(["mar", "--vae_ckpt", kl, "--mar_ckpt", mar, "--n_heads", "2", "--output", str(tmp_path / "cli")])
    # a tokenizer whose grid is not the generator's: the position tables are named
    with pytest.raises(ValueError, match=r"mar_ckpt=.* does not fit the model its settings build: .*core.enc_pos"):
        write_mar_checkpoints(kl, mar, str(tmp_path / "big"), n_heads=2, image_size=32, tokenizer_settings=MAR_KL)
