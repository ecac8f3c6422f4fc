"""Scale-wise AR (VAR): the ScaleTransformer core, its block-causal mask and KV-cached scale steps, and the
ScaleARSystem over a real multi-scale VQ tokenizer (training, sampling, CLI, DDP)."""

from pathlib import Path

import pytest
import torch
from conftest import (
    CONFIGS,
    assert_golden_curve,
    assert_same_training_step,
    checkpoint_for_config,
    logged_scalars,
    run_dir_args,
    run_lit_ar,
)

from lit_ar.cli import cli_main
from lit_ar.methods.groups import ScaleSampling, smoothed_codes
from lit_ar.models.layers import clear_kv_caches, setup_kv_caches
from lit_ar.models.scale_ar import ScaleTransformer, block_causal_mask, scale_levels

SCALES = (1, 2, 3, 4)  # L = 30 tokens
CV = 8  # codebook width


def tiny(**kw) -> ScaleTransformer:
    torch.manual_seed(0)
    args = dict(num_classes=5, vocab_size=16, codebook_dim=CV, scales=SCALES, depth=2, dim=32, n_heads=4)
    model = ScaleTransformer(**{**args, **kw}).eval()
    # VAR's init starts every block near the identity (gates ~1e-5); make them matter so the tests see the blocks
    model.init_weights(init_head=1.0, init_adaln=1.0, init_adaln_gamma=1.0)
    return model


def teacher_inputs(B: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    L = sum(s * s for s in SCALES)
    return torch.randint(0, 5, (B,), generator=g), torch.randn(B, L - 1, CV, generator=g)


def cached_logits(model: ScaleTransformer, labels: torch.Tensor, x_BLCv: torch.Tensor) -> torch.Tensor:
    """Scale by scale with the static KV caches, as sampling runs -> (B, L, V)."""
    setup_kv_caches(model.blocks, len(labels), model.seq_len, torch.float32, labels.device)
    cond, block_cond = model.condition(labels)
    x, out, mods = model.start_tokens(cond), [], model.modulations(block_cond)
    for k, (begin, end) in enumerate(model.bounds):
        out.append(model.forward_scale(k, x, cond, mods))
        if k + 1 < len(model.scales):
            b, e = model.bounds[k + 1]
            x = model.embed_scale(k + 1, x_BLCv[:, b - 1 : e - 1])
    clear_kv_caches(model.blocks)
    return torch.cat(out, dim=1)


def test_d16_preset_has_var_d16_parameter_count():
    with torch.device("meta"):  # no memory, no init work: only the shapes count
        model = ScaleTransformer(num_classes=1000, vocab_size=4096, codebook_dim=32, depth=16)
    assert model.dim == 1024 and model.blocks[0].attn.n_heads == 16 and model.seq_len == 680
    assert sum(p.numel() for p in model.parameters()) == 310_283_520
    names = {n for n, _ in model.named_parameters()}
    for part in ("class_emb.weight", "pos_start", "pos_1LC", "lvl_embed.weight", "word_embed.weight",
                 "blocks.0.ada.1.weight", "blocks.0.attn.q_bias", "blocks.0.attn.v_bias", "blocks.0.attn.logit_scale",
                 "head_nm.ada.1.weight", "head.weight"):  # fmt: skip
        assert part in names
    assert model.class_emb.num_embeddings == 1001  # the last row is the null class of CFG


def test_block_causal_mask_sees_exactly_its_scale_and_coarser():
    mask = block_causal_mask(SCALES)
    levels = scale_levels(SCALES)
    assert levels.tolist() == [0] + [1] * 4 + [2] * 9 + [3] * 16
    for i in range(len(levels)):
        for j in range(len(levels)):
            assert bool(mask[i, j]) == bool(levels[j] <= levels[i])


@pytest.mark.parametrize("variant", [{}, {"shared_adaln": True}, {"rope": True}, {"cosine_attn": False}])
def test_scale_k_logits_depend_on_exactly_scales_up_to_k(variant):
    """Through the whole model: changing the input of scale j changes the logits of scales >= j only."""
    model = tiny(**variant)
    labels, x = teacher_inputs()
    base = model(labels, x)
    for j in range(1, len(SCALES)):
        b, e = model.bounds[j]
        x2 = x.clone()
        x2[:, b - 1 : e - 1] += 1.0
        diff = (model(labels, x2) - base).abs().amax(dim=(0, 2))  # (L,)
        for k, (bk, ek) in enumerate(model.bounds):
            changed = bool(diff[bk:ek].max() > 1e-6)
            assert changed == (k >= j), f"scale {k} {'ignores' if k >= j else 'sees'} scale {j}"


@pytest.mark.parametrize("variant", [{}, {"shared_adaln": True}, {"rope": True}, {"cosine_attn": False}])
def test_cached_scale_steps_match_the_teacher_forced_forward(variant):
    model = tiny(**variant)
    labels, x = teacher_inputs()
    torch.testing.assert_close(cached_logits(model, labels, x), model(labels, x), rtol=1e-4, atol=1e-5)


def test_dropout_and_drop_path_are_off_in_eval_and_on_in_train():
    model = tiny(dropout=0.2, drop_path=0.2)
    labels, x = teacher_inputs()
    torch.testing.assert_close(model(labels, x), model(labels, x))
    model.train()
    assert not torch.allclose(model(labels, x), model(labels, x))


def test_width_not_divisible_by_heads_is_refused():
    with pytest.raises(ValueError, match=r"dim=30 is not divisible by n_heads=4"):
        tiny(dim=30)
    with pytest.raises(ValueError, match=r"rope needs a head width .* divisible by 4"):
        tiny(dim=24, n_heads=4, rope=True)


@pytest.mark.slow
def test_compiled_blocks_equal_eager():
    model = tiny()
    labels, x = teacher_inputs()
    eager = model(labels, x)
    for block in model.blocks:
        block.compile()
    torch.testing.assert_close(model(labels, x), eager, rtol=1e-4, atol=1e-5)
    assert all(not n.startswith("_orig_mod") and "._orig_mod" not in n for n in model.state_dict())


def test_layers_extras_used_by_var():
    """q/v-only biases (no k bias), shared AdaLN offsets, and RoPE positions stretched onto the finest grid."""
    from lit_ar.models.layers import Attention, Block, rope_2d

    attn = Attention(16, 2, bias=True, qv_bias=True)
    assert attn.wqkv.bias is None and attn.q_bias.shape == attn.v_bias.shape == (16,)
    x = torch.randn(2, 5, 16)
    before = attn(x)
    with torch.no_grad():
        attn.v_bias.fill_(1.0)
    assert not torch.allclose(attn(x), before)
    block = Block(16, 2, mlp="gelu", norm="layer", shared_ada=True, cond_dim=16)
    assert block.ada is None and block.ada_offset.shape == (96,)
    assert not block.norm1.elementwise_affine
    with torch.no_grad():
        block.ada_offset.normal_()
    torch.testing.assert_close(block(x, cond=torch.zeros(2, 96)), block(x, cond=block.ada_offset.expand(2, 96) * 0))
    fine, coarse = rope_2d(16, 8), rope_2d(2, 8, pos_scale=8.0)  # the 2x2 map's tokens sit at rows/cols 0 and 8
    torch.testing.assert_close(coarse, fine[[0, 8, 8 * 16, 8 * 16 + 8]])


# ---------------------------------------------------------------------------------------------------------------
# The system over a real (debug) multi-scale VQ tokenizer

DEBUG_SCALE = CONFIGS / "debug" / "scale.yaml"
GOLDEN = Path(__file__).parent / "golden" / "scale.json"


@pytest.fixture(scope="session")
def scale_ckpt(msvq_ckpt, checkpoints_root) -> Path:
    """configs/debug/scale.yaml trained through the CLI on that tokenizer (its run folder holds the logs)."""
    return checkpoint_for_config(DEBUG_SCALE, checkpoints_root, train=True,
                                 extra=["--model.init_args.tokenizer_ckpt", str(msvq_ckpt)])  # fmt: skip


@pytest.fixture(scope="session")
def system(scale_ckpt):
    from lit_ar.systems import ScaleARSystem

    return ScaleARSystem.load_from_checkpoint(scale_ckpt, weights_only=True).eval()


def debug_args(tmp_path: Path, msvq_ckpt: Path) -> list[str]:
    return ["--config", str(DEBUG_SCALE), *run_dir_args(tmp_path), "--model.init_args.tokenizer_ckpt", str(msvq_ckpt)]


def test_debug_config_trains_through_the_cli_and_its_loss_falls(scale_ckpt):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = scale_ckpt.parent.parent
    loss = logged_scalars(run_dir, "train/loss")
    assert len(loss) == 10 and sum(loss[-3:]) < 0.85 * sum(loss[:3]), f"the loss falls: {loss}"
    tags = EventAccumulator(str(run_dir)).Reload().Tags()
    for tag in ("val/loss", "val/token_acc", "val/token_acc_1x1", "val/token_acc_4x4"):
        assert tag in tags["scalars"]
    assert "samples/grid" in tags["images"]


def test_golden_loss_curve(scale_ckpt):
    """The debug run's first 10 logged train/loss values. Regenerate (after an intended change) with
    `LIT_AR_UPDATE_GOLDEN=1 pytest tests/test_scale_ar.py -k golden`."""
    loss = logged_scalars(scale_ckpt.parent.parent, "train/loss")[:10]
    assert_golden_curve(GOLDEN, loss, atol=1e-5, config="configs/debug/scale.yaml")


def test_predict_writes_samples_and_grid(scale_ckpt, msvq_ckpt, tmp_path):
    import numpy as np

    cli_main(["predict", *debug_args(tmp_path, msvq_ckpt), "--ckpt_path", str(scale_ckpt)])
    samples = np.load(tmp_path / "samples.npz")
    assert samples["images"].shape == (20, 16, 16, 3) and samples["images"].dtype == np.uint8
    assert samples["labels"].tolist() == [c for c in range(10) for _ in range(2)]
    assert (tmp_path / "grid.png").is_file()


def record(monkeypatch, obj, name: str) -> list:
    """Wrap obj.name so that every call's (args, result) is kept."""
    calls, fn = [], getattr(obj, name)

    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        calls.append((args, out))
        return out

    monkeypatch.setattr(obj, name, wrapped)
    return calls


def test_cached_sampling_logits_match_the_teacher_forced_forward(system, monkeypatch):
    labels = torch.tensor([0, 3, 7])
    steps = record(monkeypatch, system.model, "forward_scale")
    indices, _ = system.sample_tokens(labels, generator=torch.Generator().manual_seed(0))
    sampled = torch.cat([out for _, out in steps], dim=1)  # (B, L, V)
    x_BLCv = system.tokenizer.quantizer.teacher_forcing_inputs(indices)
    torch.testing.assert_close(sampled, system.model(labels, x_BLCv), rtol=1e-4, atol=1e-5)


def test_input_built_while_sampling_equals_the_training_input(system, monkeypatch):
    embedded = record(monkeypatch, system.model, "embed_scale")
    indices, f_hats = system.sample_tokens(torch.tensor([1, 2]), cfg=2.0, generator=torch.Generator().manual_seed(1))
    assert [args[0] for args, _ in embedded] == list(range(1, len(system.scales)))
    sampled_inputs = torch.cat([args[1] for args, _ in embedded], dim=1)  # (B, L - 1, Cv)
    torch.testing.assert_close(sampled_inputs, system.tokenizer.quantizer.teacher_forcing_inputs(indices))
    torch.testing.assert_close(f_hats[-1], system.tokenizer.quantizer.indices_to_latent(indices))


def test_same_seed_same_samples_and_return_scales(system):
    labels = torch.arange(4)
    kw = dict(cfg=1.5, temperature=0.9, top_k=20, top_p=0.9)
    a = system.sample(labels, generator=torch.Generator().manual_seed(5), **kw)
    b, per_scale = system.sample(labels, generator=torch.Generator().manual_seed(5), return_scales=True, **kw)
    c = system.sample(labels, generator=torch.Generator().manual_seed(6), **kw)
    assert a.shape == (4, 3, 16, 16) and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    assert len(per_scale) == len(system.scales) and torch.equal(per_scale[-1], a)
    assert not torch.equal(per_scale[0], a)  # the coarsest scale alone is a blurrier image


def test_more_smooth_mixes_codes_and_reduces_to_hard_sampling_with_one_candidate(system):
    """VAR's `more_smooth`: each scale adds a Gumbel-softmax mixture of the codes. With top_k=1 only one code has
    weight, so the images equal hard sampling's; with more candidates they differ, and the same seed repeats them."""
    labels, g = torch.arange(4), lambda: torch.Generator().manual_seed(5)
    hard = system.sample(labels, cfg=1.5, top_k=1, generator=g())
    torch.testing.assert_close(system.sample(labels, cfg=1.5, top_k=1, generator=g(), more_smooth=True), hard,
                               rtol=0, atol=1e-6)  # fmt: skip
    kw = dict(cfg=1.5, top_k=20, generator=g())
    smooth = system.sample(labels, more_smooth=True, **kw)
    assert torch.isfinite(smooth).all() and not torch.equal(smooth, system.sample(labels, **{**kw, "generator": g()}))
    assert torch.equal(smooth, system.sample(labels, more_smooth=True, **{**kw, "generator": g()}))
    codes = system.tokenizer.quantizer.codebook.codes()  # (V, C)
    mixed = smoothed_codes(torch.randn(2, 3, codes.shape[0]), ScaleSampling(), 0.0, g(), codes)  # (2, 3, C)
    # a convex combination of the codes: inside their bounding box, dimension by dimension
    assert mixed.shape == (2, 3, codes.shape[1])
    assert (mixed >= codes.min(0).values - 1e-6).all() and (mixed <= codes.max(0).values + 1e-6).all()


def test_sampling_under_bf16_autocast(system):
    """The KV caches take autocast's dtype, so cached bf16 keys meet bf16 queries (as under bf16-mixed predict)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        indices, f_hats = system.sample_tokens(torch.arange(3), cfg=1.5, generator=torch.Generator().manual_seed(0))
    assert [i.shape for i in indices] == [(3, s * s) for s in system.scales]
    assert all(0 <= int(i.min()) and int(i.max()) < system.model.vocab_size for i in indices)
    assert f_hats[-1].dtype == torch.float32 and torch.isfinite(f_hats[-1]).all()  # the quantizer stays fp32


@pytest.mark.parametrize("schedule", ["linear", "constant"])
def test_cfg_over_scales(system, monkeypatch, schedule):
    """One batch of conditional and null-class rows; the logits sampled at scale k are
    uncond + g_k (cond - uncond), with g_k ramped 1 -> cfg over the scales (VAR) or constant."""
    from lit_ar.models.categorical_head import CategoricalHead

    labels, cfg, K = torch.arange(3), 4.0, len(system.scales)
    steps = record(monkeypatch, system.model, "forward_scale")
    sampled = record(monkeypatch, CategoricalHead, "sample_logits")
    system.sample_tokens(labels, cfg=cfg, cfg_schedule=schedule, generator=torch.Generator().manual_seed(0))
    for k in range(K):
        both, used = steps[k][1], sampled[k][0][1]  # (6, s^2, V), (3, s^2, V): args (head, logits, ...)
        assert both.shape[0] == 6
        g = 1 + (cfg - 1) * k / (K - 1) if schedule == "linear" else cfg
        torch.testing.assert_close(used, both[3:] + g * (both[:3] - both[3:]))


@pytest.mark.slow
def test_compiled_system_trains_like_eager(msvq_ckpt):
    """With `compile`, the blocks and the AdaLN head with its weighted, label-smoothed loss run compiled: the same
    loss and gradients as eager."""
    from lit_ar.systems import ScaleARSystem

    torch.manual_seed(0)
    batch = {"image": torch.rand(4, 3, 16, 16) * 2 - 1, "label": torch.tensor([0, 1, 2, 3])}
    kw = dict(tokenizer_ckpt=str(msvq_ckpt), image_size=16, depth=1, dim=32, n_heads=2, class_dropout=0.0,
              label_smoothing=0.1, scale_loss_weights=[1, 2, 3, 4])  # fmt: skip
    eager, compiled = ScaleARSystem(**kw).train(), ScaleARSystem(compile=True, **kw).train()
    compiled.configure_model()  # where `compile` applies (the Trainer calls it)
    compiled.load_state_dict(eager.state_dict())
    assert_same_training_step(eager, compiled, batch, part=lambda system: system.model)


def test_scale_loss_weights_select_scales(msvq_ckpt):
    from lit_ar.systems import ScaleARSystem

    torch.manual_seed(0)
    batch = {"image": torch.rand(4, 3, 16, 16) * 2 - 1, "label": torch.tensor([0, 1, 2, 3])}
    kw = dict(tokenizer_ckpt=str(msvq_ckpt), image_size=16, depth=1, dim=32, n_heads=2, class_dropout=0.0)
    only_last = ScaleARSystem(scale_loss_weights=[0, 0, 0, 1], **kw).eval()
    uniform = ScaleARSystem(**kw).eval()
    uniform.load_state_dict(only_last.state_dict())
    hidden, cond, target = only_last.method.teacher_forced(only_last.model, only_last.tokenizer.quantizer,
                                                           only_last.batch_tokens(batch), batch["label"])  # fmt: skip
    logits = only_last.model.logits(hidden, cond)  # (B, L, V)
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # (B, L)
    torch.testing.assert_close(only_last.training_step(batch, 0), ce[:, -16:].mean())
    torch.testing.assert_close(uniform.training_step(batch, 0), ce.mean())
    # a token cache serving the pyramid concatenated (B, L) gives the same loss
    cached = {"tokens": torch.cat(uniform.encode(batch["image"]), dim=1), "label": batch["label"]}
    torch.testing.assert_close(uniform.training_step(cached, 0), ce.mean())


def test_bad_settings_are_refused(msvq_ckpt, checkpoints_root, system):
    from lit_ar.systems import ScaleARSystem

    kw = dict(tokenizer_ckpt=str(msvq_ckpt), image_size=16, depth=1, dim=32, n_heads=2)
    with pytest.raises(ValueError, match=r"model.init_args.scales=\[1, 2, 4\] differs from the tokenizer's scales="
                                         r"\[1, 2, 3, 4\]"):  # fmt: skip
        ScaleARSystem(scales=[1, 2, 4], **kw)
    with pytest.raises(ValueError, match=r"scale_loss_weights=\[1.0, 2.0\] must be 4 non-negative numbers"):
        ScaleARSystem(scale_loss_weights=[1.0, 2.0], **kw)
    with pytest.raises(ValueError, match=r"model.init_args.tokenizer_ckpt is required"):
        ScaleARSystem(image_size=16)
    vq = checkpoint_for_config(CONFIGS / "debug" / "tokenizer_vq.yaml", checkpoints_root)
    with pytest.raises(ValueError, match=r"is a 'vq' tokenizer without scales; ScaleARSystem needs a multi-scale"):
        ScaleARSystem(**{**kw, "tokenizer_ckpt": str(vq)})
    with pytest.raises(ValueError, match=r"data.image_size=32 differs from the tokenizer's image size 16"):
        ScaleARSystem(**{**kw, "image_size": 32})
    labels = torch.tensor([0, 1])
    bad = [
        (dict(labels=torch.tensor([0, 10])), r"labels must lie in \[0, 10\)"),
        (
            dict(labels=torch.tensor([0.0, 1.0])),
            r"labels must be a 1D integer tensor of class indices; got "
            r"torch.float32 \(2,\)",
        ),
        (dict(temperature=0.0), r"temperature=0.0 must be > 0"),
        (dict(top_k=0), r"top_k=0 must be >= 1"),
        (dict(top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
        (dict(cfg=-1.0), r"cfg=-1.0 must be >= 0"),
        (dict(cfg_schedule="cosine"), r"cfg_schedule='cosine' is not known"),
        (dict(cfg_interval=(0.5, 0.2)), r"cfg_interval=\(0.5, 0.2\) must satisfy"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            system.sample(**{"labels": labels, **kwargs})
    no_cfg = ScaleARSystem(**{**kw, "class_dropout": 0.0})
    with pytest.raises(ValueError, match=r"cfg=2.0 asks for classifier-free guidance, but .*class_dropout=0"):
        no_cfg.sample(labels, cfg=2.0)


@pytest.mark.slow
def test_ddp_two_processes_agree_with_one(msvq_ckpt, tmp_path):
    """2 gloo processes at batch 4 each = 1 process at batch 8: the same train/loss curve, with class dropout on
    (at 0.5, so that about half the labels are dropped): it draws from the step's Draws, for the global batch."""
    common = [
        "fit", "--config", str(DEBUG_SCALE), "--model.init_args.tokenizer_ckpt", str(msvq_ckpt),
        "--model.init_args.class_dropout", "0.5", "--trainer.max_steps", "6", "--data.shuffle", "false",
        "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "0",
    ]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    run_lit_ar([*common, *run_dir_args(one), "--data.batch_size", "8", "--trainer.devices", "1"])
    run_lit_ar(
        [*common, *run_dir_args(two), "--data.batch_size", "4", "--trainer.devices", "2",
         "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"]
    )  # fmt: skip
    loss1, loss2 = logged_scalars(one, "train/loss"), logged_scalars(two, "train/loss")
    assert len(loss1) == len(loss2) == 6
    assert sum(loss1[-2:]) < sum(loss1[:2]), f"the loss falls: {loss1}"
    torch.testing.assert_close(torch.tensor(loss2), torch.tensor(loss1), rtol=2e-3, atol=1e-5)
