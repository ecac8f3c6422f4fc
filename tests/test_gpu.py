"""GPU-only checks (`pytest -m gpu`; skipped with a reason where CUDA is absent, see conftest.py): FSDP on one GPU,
fp16-mixed with its grad scaler saved and restored, bf16-mixed training of every debug generator, compiled sampling
equal to eager, and a compiled training step no slower than eager (a speed assertion, allowed here only).

Losses are read from the training loop's outputs (LossRecorder), not from TensorBoard event files."""

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import CONFIGS, checkpoint_for_config, config_for_run_path, run_dir_args

from lit_ar.checkpoints import load_checkpoint
from lit_ar.cli import cli_main

pytestmark = pytest.mark.gpu

DEBUG_GENERATORS = ["causal", "rar", "masked", "scale", "flow_mar", "flow_flowar"]


@pytest.fixture(autouse=True)
def fresh_compile_caches():
    """Every test starts with empty torch.compile caches. Dynamo caps the graphs kept per function (recompile_limit,
    8) across all models of a process; this file builds dozens of them (sizes, families, sampling lengths), so
    without the reset the shared block `forward` hit the cap during the compiled-sampling tests and the compiled
    training-speed tests after them silently ran eager (first H200 run: masked and mar "compiled" 1.2x slower)."""
    torch._dynamo.reset()
    yield


class LossRecorder(L.Callback):
    """Keeps every training step's loss (as a float) and the grad scaler's scale at the start of training."""

    def __init__(self, set_scale_at: int | None = None, new_scale: float = 512.0):
        self.losses: list[float] = []
        self.start_scale: float | None = None
        self.set_scale_at, self.new_scale = set_scale_at, new_scale

    def on_train_start(self, trainer, pl_module) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.start_scale = float(scaler.get_scale()) if scaler is not None else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        if trainer.global_step == self.set_scale_at:
            # a scale no run reaches by itself in a few steps: the resumed run must start from it
            trainer.precision_plugin.scaler.update(new_scale=self.new_scale)


def recorder(cli) -> LossRecorder:
    return next(c for c in cli.trainer.callbacks if isinstance(c, LossRecorder))


def generator_args(name: str, run_dir: Path, checkpoints_root: Path, steps: int, **recorder_args) -> list[str]:
    """`fit` of a debug generator config on one GPU for `steps` steps, with a fresh checkpoint of its tokenizer."""
    config = CONFIGS / "debug" / f"{name}.yaml"
    named = yaml.safe_load(config.read_text())["model"]["init_args"]["tokenizer_ckpt"]
    tokenizer = checkpoint_for_config(config_for_run_path(named), checkpoints_root)
    return ["fit", "--config", str(config), *run_dir_args(run_dir), "--model.init_args.tokenizer_ckpt",
            str(tokenizer), "--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.max_steps",
            str(steps), "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
            "--trainer.callbacks+=" + json.dumps({"class_path": "test_gpu.LossRecorder", "init_args": recorder_args})
            ]  # fmt: skip


def test_fsdp_on_one_gpu_trains_like_a_single_device(tmp_path, checkpoints_root):
    from torch.distributed.fsdp import FullyShardedDataParallel

    from lit_ar.models.layers import Block

    plain = cli_main(generator_args("causal", tmp_path / "plain", checkpoints_root, 6))
    fsdp = cli_main([*generator_args("causal", tmp_path / "fsdp", checkpoints_root, 6), "--config",
                     str(CONFIGS / "trainer" / "fsdp.yaml"), "--trainer.devices", "1"])  # fmt: skip
    assert type(fsdp.trainer.strategy).__name__ == "FSDPStrategy"
    units = [m for m in fsdp.trainer.strategy.model.modules() if isinstance(m, FullyShardedDataParallel)]
    assert any(isinstance(u.module, Block) for u in units), "each transformer block is its own FSDP unit"
    a, b = recorder(plain).losses, recorder(fsdp).losses
    assert len(a) == len(b) == 6 and all(math.isfinite(x) for x in b)
    assert b[-1] < b[0], f"FSDP training does not learn: {b}"
    assert b == pytest.approx(a, rel=1e-3), "one-GPU FSDP computes what the plain strategy computes"
    saved = load_checkpoint(tmp_path / "fsdp" / "checkpoints" / "last.ckpt")  # state_dict_type: full
    assert saved["state_dict"].keys() == plain.model.state_dict().keys()


def test_fp16_mixed_with_grad_scaler_trains_and_resumes_with_its_scale(tmp_path, checkpoints_root):
    fp16 = ["--trainer.precision", "16-mixed"]
    first = cli_main([*generator_args("causal", tmp_path, checkpoints_root, 4, set_scale_at=2), *fp16])
    assert all(math.isfinite(x) for x in recorder(first).losses)
    saved = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    scale = saved["MixedPrecision"]["scale"]
    assert scale <= 512.0, f"the scale set at step 2 was saved (got {scale}; the default starts at 65536)"

    resumed = cli_main([*generator_args("causal", tmp_path, checkpoints_root, 8), *fp16, "--ckpt_path", "last"])
    rec = recorder(resumed)
    assert rec.start_scale == scale, "the grad scaler's state is restored on resume"
    assert len(rec.losses) == 4 and all(math.isfinite(x) for x in rec.losses)
    assert resumed.trainer.global_step == 8


@pytest.mark.parametrize("name", DEBUG_GENERATORS)
def test_bf16_mixed_trains_every_debug_generator_finite(name, tmp_path, checkpoints_root):
    cli = cli_main([*generator_args(name, tmp_path, checkpoints_root, 4), "--trainer.precision", "bf16-mixed"])
    losses = recorder(cli).losses
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses), losses
    assert all(torch.isfinite(p).all() for p in cli.model.parameters())


# -- compiled vs eager, through the benchmark harness's builders (random init, tiny sizes, an 8x8 grid) -------------
FAMILIES = ["causal", "masked", "scale", "mar", "flowar"]


def sample(family: str, system, labels: torch.Tensor):
    g = torch.Generator(system.device).manual_seed(0)
    if family == "causal":
        return system.generate(labels, top_k=1, generator=g)  # greedy: a tiny numerical gap cannot flip a draw
    if family == "masked":
        return system.generate(labels, top_k=1, steps=4, generator=g)
    if family == "scale":
        return torch.cat(system.sample_tokens(labels, top_k=1, generator=g)[0], dim=1)
    steps = 8 if family == "mar" else None
    return system.sample_tokens(labels, generator=g, steps=steps, flow_steps=4)


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_sampling_equals_eager_on_cuda(family, tmp_path):
    from benchmarks.__main__ import build

    eager = build(family, "tiny", 8, False, "cuda", tmp_path)
    compiled = build(family, "tiny", 8, True, "cuda", tmp_path)
    compiled.load_state_dict(eager.state_dict())
    labels = torch.arange(4, device="cuda")
    a, b = sample(family, eager, labels), sample(family, compiled, labels)
    if a.is_floating_point():
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)
    else:
        assert (a == b).float().mean() >= 0.99, "compiled sampling draws the eager tokens"


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_training_step_no_slower_than_eager(family, tmp_path):
    from benchmarks.__main__ import build, train_seconds

    seconds = {}
    for compile in (False, True):
        system = build(family, "small", 16, compile, "cuda", tmp_path)
        seconds[compile] = train_seconds(family, system, 16, "bf16", steps=10)
        del system
    # generous: compiling must not cost speed; it usually gains (fused norms, activations, rotary)
    assert seconds[True] <= 1.15 * seconds[False], f"compiled {seconds[True]:.4f}s vs eager {seconds[False]:.4f}s"
