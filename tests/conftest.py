import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# Two cores on CI: keep each test process to its share and tell tutorials to run small.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
os.environ.setdefault("LIT_AR_SMALL", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def assert_same_training_step(eager, compiled, batch: dict, batch_idx: int = 0, part=lambda system: system) -> None:
    """One training step of each system (the same weights): the same loss, and the same gradient on every parameter
    of `part(system)`, within float tolerance."""
    losses = []
    for system in (eager, compiled):
        loss = system.training_step(batch, batch_idx)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(part(eager).named_parameters(), part(compiled).parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def head_off_zero(system, seed: int = 0):
    """The flow head starts at v = 0 (MAR's zero-initialised AdaLN gates and output layer), so an untrained head
    returns its noise unchanged whatever its precision or compilation: a test that compares samples must draw those
    zero tensors at random first. Returns the system."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in system.head.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return system


def run_dir_args(run_dir: Path) -> list[str]:
    """CLI arguments that move a shipped config's run folder (logs, checkpoints) under `run_dir`."""
    return ["--trainer.logger.init_args.save_dir", str(run_dir), "--trainer.enable_progress_bar", "false"]


def run_lit_ar(args: list[str], cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real `lit_ar` command in a subprocess (needed for DDP, which re-launches the command)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "lit_ar", *args], cwd=cwd or REPO, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    if proc.returncode != 0:
        raise AssertionError(
            f"lit_ar {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


@pytest.fixture
def small_images(tmp_path: Path) -> Path:
    """An image folder with 3 classes x 4 PNGs made here (nothing is downloaded)."""
    from PIL import Image

    root = tmp_path / "folder"
    g = torch.Generator().manual_seed(0)
    for c, name in enumerate(["cat", "dog", "fox"]):
        (root / name).mkdir(parents=True)
        for i in range(4):
            pixels = (torch.rand(20, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
            pixels[..., c] = 255  # a colour per class
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


_CHECKPOINTS: dict[tuple[str, bool], Path] = {}


def config_for_run_path(ckpt_path: str) -> Path:
    """Shipped configs keep their runs in runs/<group>/<name>/: the checkpoint
    runs/<group>/<name>/checkpoints/last.ckpt was made by configs/<group>/<name>.yaml."""
    parts = Path(ckpt_path).parts
    if len(parts) < 3 or parts[0] != "runs":
        raise ValueError(f"{ckpt_path!r} is not a runs/<group>/<name>/... checkpoint path")
    return CONFIGS / parts[1] / f"{parts[2]}.yaml"


def configs_for_run_path(ckpt_path: str) -> list[Path]:
    """The config files that made a checkpoint: one for runs/<group>/<name>/..., and for a tier's run
    runs/<tier>/<group>/<name>/... the base config configs/<group>/<name>.yaml with the tier's overlay
    configs/<tier>/<group>/<name>.yaml stacked on it."""
    parts = Path(ckpt_path).parts
    overlay = CONFIGS / parts[1] / parts[2] / f"{parts[3]}.yaml" if len(parts) > 4 and parts[0] == "runs" else None
    if overlay is not None and overlay.is_file():
        return stacked_configs(overlay)
    return [config_for_run_path(ckpt_path)]


def stacked_configs(path: Path) -> list[Path]:
    """The files a shipped config is used with, in order. A tier's overlay configs/<tier>/<group>/<name>.yaml goes
    on configs/<group>/<name>.yaml; an evaluation file goes on a generator's config (llamagen_shapes, with the
    tier's overlay of it for a tier's evaluation file)."""
    parts = path.relative_to(CONFIGS).parts
    stack = [CONFIGS / parts[1] / parts[2], path] if len(parts) == 3 else [path]
    if "class_path" not in yaml.safe_load(stack[0].read_text())["model"]:  # configs/eval/generator_shapes.yaml
        generator = [CONFIGS / "causal" / "llamagen_shapes.yaml"]
        if len(parts) == 3:
            generator.append(CONFIGS / parts[0] / "causal" / "llamagen_shapes.yaml")
        stack = generator + stack
    return stack


def merged_yaml(stack: list[Path]) -> dict:
    """The settings of config files stacked in order, as the CLI merges them: mappings merge, anything else (lists
    included) is replaced by the later file's."""

    def merge(base: dict, over: dict) -> dict:
        out = dict(base)
        for key, value in over.items():
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        return out

    merged: dict = {}
    for path in stack:
        merged = merge(merged, yaml.safe_load(path.read_text()) or {})
    return merged


def checkpoint_for_config(
    config: Path | list[Path], root: Path, train: bool = False, extra: list[str] | None = None
) -> Path:
    """A Lightning checkpoint of the system a config (or configs stacked in order) builds, made once per session:
    trained with `lit_ar fit` when `train` (use debug configs), else freshly initialised (enough to instantiate
    configs that depend on it)."""
    from lit_ar.cli import cli_main

    configs = config if isinstance(config, list) else [config]
    key = (tuple(map(str, configs)), train)
    if key not in _CHECKPOINTS:
        name = "_".join(f"{c.parent.name}_{c.stem}" for c in configs)
        run_dir = root / f"{name}_{'trained' if train else 'init'}"
        args = [arg for c in configs for arg in ("--config", str(c))] + [*run_dir_args(run_dir), *(extra or [])]
        if train:
            cli_main(["fit", *args])
            _CHECKPOINTS[key] = run_dir / "checkpoints" / "last.ckpt"
        else:
            import lightning as L

            cli = cli_main(args, run=False)
            trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
            trainer.strategy.connect(cli.model)
            _CHECKPOINTS[key] = run_dir / "init.ckpt"
            trainer.save_checkpoint(_CHECKPOINTS[key])
    return _CHECKPOINTS[key]


@pytest.fixture(scope="session")
def checkpoints_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def classifier_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of the debug classifier after 3 steps (made once per session; treat it as read-only)."""
    from lit_ar.cli import cli_main

    run_dir = tmp_path_factory.mktemp("classifier_ckpt")
    cli_main(["fit", "--config", str(CONFIGS / "debug" / "classifier.yaml"), *run_dir_args(run_dir),
              "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0"])  # fmt: skip
    return run_dir / "checkpoints" / "last.ckpt"


def logged_scalars(run_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return [e.value for e in EventAccumulator(str(run_dir)).Reload().Scalars(tag)]


def assert_golden_curve(path: Path, curve: list[float] | dict[str, list[float]], atol: float = 1e-4, **record) -> None:
    """A run's first logged train/loss values (or such curves by config) against the golden file `path`, within 1e-4
    relative. After an intended change, `LIT_AR_UPDATE_GOLDEN=1 pytest -k golden` writes the file first, with
    `record` (e.g. the config) beside the curve; say why in the commit."""
    if os.environ.get("LIT_AR_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({**record, "train/loss": curve}, indent=1) + "\n")
    golden = json.loads(path.read_text())["train/loss"]
    torch.testing.assert_close(curve, golden, rtol=1e-4, atol=atol)


# The generators' tests run on freshly initialised (seeded) tokenizers, not on tokenizers trained in the session: their
# golden loss curves must be the same on every CPU. A tokenizer trained here is not: its argmins and dead-code revival
# turn the last-bit differences between CPUs' float kernels (AVX2, AVX-512, AMX) into other codes, and the generators'
# curves moved by up to 0.06 between two x86 machines. On one tokenizer checkpoint the generators' own training agrees
# across those kernels to about 1e-6. An untrained tokenizer still gives the generators varied tokens (the debug VQ:
# 46 of its 64 codes, 256 distinct sequences for 256 images).
@pytest.fixture(scope="session")
def debug_tokenizer(checkpoints_root) -> Path:
    """The debug VQ tokenizer (configs/debug/tokenizer_vq.yaml) that the causal and masked debug configs point at,
    freshly initialised, as the note above says (test_tokenizer.py trains it)."""
    return checkpoint_for_config(config_for_run_path("runs/debug/tokenizer_vq/checkpoints/last.ckpt"), checkpoints_root)


@pytest.fixture(scope="session")
def msvq_ckpt(checkpoints_root) -> Path:
    """The debug multi-scale VQ tokenizer (configs/debug/tokenizer_msvq.yaml), freshly initialised: see the note
    above debug_tokenizer (test_tokenizer.py trains it)."""
    return checkpoint_for_config(CONFIGS / "debug" / "tokenizer_msvq.yaml", checkpoints_root)


@pytest.fixture(scope="session")
def classifier_ckpt(tmp_path_factory) -> Path:
    """A tiny shapes classifier (configs/debug/classifier.yaml: 16px, 32 features), trained once per session."""
    from lit_ar.cli import cli_main

    run = tmp_path_factory.mktemp("classifier")
    cli_main(["fit", "--config", str(CONFIGS / "debug" / "classifier.yaml"), *run_dir_args(run)])
    return run / "checkpoints" / "last.ckpt"


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` (tests/test_gpu.py) skip, with the reason, where CUDA is absent."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marker `gpu`): run `pytest -m gpu` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
