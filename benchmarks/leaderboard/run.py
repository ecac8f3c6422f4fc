"""Every registered method trained and evaluated under one protocol, at a tier's budget: a markdown table, a JSON
record and a plot (class accuracy and FID against sampling speed).

    python -m benchmarks.leaderboard --tier debug                                  # seconds per method, any CPU
    python -m benchmarks.leaderboard --tier digits --methods LlamaGen VAR          # a subset, on real digits
    python -m benchmarks.leaderboard --tier shapes32 --gpu                         # benchmarks/shapes32_gpu.sh's budget

A tier (benchmarks/leaderboard/tiers.py) trains its classifier (the feature extractor of FID and class accuracy) and
one tokenizer per kind the chosen methods need (vq, msvq, kl) once, then each method's generator config (the
registry: benchmarks/leaderboard/methods.py) at the tier's budget, each in its own run folder under the output
folder, and evaluates it with `lit_ar test` and the tier's evaluation config: the same number of samples of every
class, seeded, with the config's own `predict_kwargs`. The harness then times the sampling of a fixed batch after a
warm-up batch, and counts the calls of the network's core (its first transformer block) and of its head while the
warm-up batch is sampled.

Output (default runs/leaderboard/<tier>/, runs/leaderboard/<tier>_gpu/ with --gpu): leaderboard.md,
leaderboard.json, leaderboard.png, and a folder per method (checkpoints, logs, eval/evaluation.json and the row's
record, leaderboard_row.json). Run the same command again and it continues where it stopped: a row whose record
exists is not trained or evaluated again, a finished fit is not repeated, and an interrupted fit resumes from its
last checkpoint (`--ckpt_path last`).
"""

import argparse
import contextlib
import importlib
import importlib.util
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from benchmarks.leaderboard.methods import METHODS, TOKENIZER_KINDS, Method
from benchmarks.leaderboard.tiers import TIERS, Budget, Tier

REPO = Path(__file__).resolve().parents[2]
QUIET = ["--trainer.enable_progress_bar", "false"]
EVAL = "--model.init_args.evaluator.init_args."
ROW_FILE = "leaderboard_row.json"  # a finished row: present means "do not train or evaluate again"
FIT_FILE = "leaderboard_fit.json"  # {"seconds": summed over the calls that continued the run, "done": bool}
BUDGET_FILE = "leaderboard_budget.json"  # what this output folder's rows were trained at


class LeaderboardError(ValueError):
    """A setting the leaderboard refuses (the command prints it as an argument error)."""


def log(message: str) -> None:
    print(f"[leaderboard] {message}", flush=True)


# -- the machine ---------------------------------------------------------------------------------------------------
def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> str:
    cpu = f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (host CPU: {cpu})"
    return f"{cpu} (no GPU)"


# -- configs and arguments -----------------------------------------------------------------------------------------
def repo_path(path: str | Path) -> str:
    """A config path as the registry writes it (relative to the repository) -> an absolute one."""
    return str(path if Path(path).is_absolute() else REPO / path)


def overlay_of(tier: Tier, config: str) -> str | None:
    """The tier's overlay of `config` (configs/<group>/<name>.yaml -> <overlay_dir>/<group>/<name>.yaml), if any."""
    if tier.overlay_dir is None or not Path(config).parts[:1] == ("configs",):
        return None
    overlay = Path(tier.overlay_dir, *Path(config).parts[1:])
    return str(overlay) if (REPO / overlay).is_file() else None


def with_overlay(tier: Tier, config: str, use: bool = True) -> list[str]:
    overlay = overlay_of(tier, config) if use else None
    return [config] + ([overlay] if overlay else [])


def split_configs(args: list[str]) -> tuple[list[str], list[str]]:
    """`--config FILE` pairs (stacked on the config) apart from the other arguments."""
    configs, rest, i = [], [], 0
    while i < len(args):
        if args[i] == "--config" and i + 1 < len(args):
            configs.append(args[i + 1])
            i += 2
        elif args[i].startswith("--config="):
            configs.append(args[i].split("=", 1)[1])
            i += 1
        else:
            rest.append(args[i])
            i += 1
    return configs, rest


def config_args(configs: list[str]) -> list[str]:
    return [arg for c in configs for arg in ("--config", repo_path(c))]


# -- one fit, resumable --------------------------------------------------------------------------------------------
def fit(configs: list[str], args: list[str], run_dir: Path) -> tuple[float, bool]:
    """`lit_ar fit` with the run folder `run_dir` and `--ckpt_path last`, unless an earlier call finished it.
    Returns the training seconds (summed over the calls that continued the run) and whether it trained now."""
    from lit_ar.cli import cli_main

    state_file = run_dir / FIT_FILE
    state = json.loads(state_file.read_text()) if state_file.exists() else {"seconds": 0.0, "done": False}
    if state["done"]:
        return state["seconds"], False
    start, done = time.perf_counter(), False
    try:
        cli_main(["fit", *config_args(configs), *args, *QUIET, "--trainer.logger.init_args.save_dir", str(run_dir),
                  "--ckpt_path", "last"])  # fmt: skip
        done = True
    finally:  # an interrupted call (SIGTERM ends it with SystemExit) counts too: the next one continues its run
        state = {"seconds": state["seconds"] + time.perf_counter() - start, "done": done}
        run_dir.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps(state))
    return state["seconds"], True


def prepare(tier: Tier, budget: Budget, kinds: set[str], out: Path) -> dict:
    """The tier's classifier and one tokenizer per kind in `kinds` (and their token caches where the budget trains
    on codes), each trained once. Returns their checkpoints: `classifier`, `tokenizers` and `caches` by kind."""
    prepared = {"classifier": out / "classifier" / "checkpoints" / tier.classifier_ckpt, "tokenizers": {}, "caches": {}}
    log(f"classifier: {' + '.join(with_overlay(tier, tier.classifier_config))}")
    fit(with_overlay(tier, tier.classifier_config), list(tier.classifier_args), out / "classifier")
    if not prepared["classifier"].is_file():
        raise FileNotFoundError(f"the classifier's fit made no {prepared['classifier']}: see {out / 'classifier'}")
    for kind in sorted(kinds, key=TOKENIZER_KINDS.index):
        configs = with_overlay(tier, tier.tokenizer_config.format(kind=kind))
        log(f"tokenizer {kind}: {' + '.join(configs)}")
        fit(configs, list(tier.tokenizer_args), out / f"tokenizer_{kind}")
        prepared["tokenizers"][kind] = out / f"tokenizer_{kind}" / "checkpoints" / "last.ckpt"
        if budget.token_cache:
            prepared["caches"][kind] = token_cache(prepared["tokenizers"][kind], out / f"cache_{kind}", budget)
    return prepared


def token_cache(tokenizer_ckpt: Path, folder: Path, budget: Budget) -> Path:
    """The training data encoded once by the tokenizer (`python -m lit_ar.data.token_cache`); kept if complete."""
    from lit_ar.data.token_cache import META, main

    if not (folder / META).is_file():  # a cache without its meta file is incomplete: written again
        log(f"token cache {folder}")
        main(["--tokenizer_ckpt", str(tokenizer_ckpt), "--output", str(folder), *budget.cache_args])
    return folder


# -- one method: its arguments, fit, evaluation and measurements ---------------------------------------------------
def generator_run(tier: Tier, budget: Budget, gpu: bool, method: Method, prepared: dict) -> tuple[list, list]:
    """The config stack and the arguments of the method's generator at the tier's budget (`fit` and `test` alike)."""
    config = method.config_for(tier.name, tier.dataset)
    extra_configs, method_args = split_configs(method.overrides_for(tier.name, gpu, budget))
    configs = with_overlay(tier, config, budget.generator_overlays) + extra_configs
    args = [*tier.generator_args, *budget.args, *method_args,
            "--trainer.max_steps", str(budget.steps), "--data.batch_size", str(budget.batch),
            "--model.init_args.tokenizer_ckpt", str(prepared["tokenizers"][method.tokenizer])]  # fmt: skip
    if budget.token_cache:
        args += ["--data.token_cache", str(prepared["caches"][method.tokenizer])]
    return configs, args


def core_and_head(system: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """The system's network (its `core`, else its `model`) and its head (`head`), where it has them."""
    core = next((m for m in (getattr(system, "core", None), getattr(system, "model", None))
                 if isinstance(m, nn.Module)), None)  # fmt: skip
    head = getattr(system, "head", None)
    return core, head if isinstance(head, nn.Module) else None


def first_block(core: nn.Module) -> nn.Module:
    """The first module of the core's first list of blocks: every pass of the network runs it once, whichever entry
    point (forward, a KV-cache decode step, a per-scale step) the sampling loop calls. The core itself if it has
    no list of blocks."""
    return next((m[0] for m in core.modules() if isinstance(m, nn.ModuleList) and len(m) > 0), core)


@contextlib.contextmanager
def count_calls(system: nn.Module) -> Iterator[dict[str, int | None]]:
    """Counts, with forward hooks, the passes through the system's core (calls of its first block) and the calls
    of its head (None where it has none) while the block runs."""
    core, head = core_and_head(system)
    counts: dict[str, int | None] = {"core": None if core is None else 0, "head": None if head is None else 0}
    handles = []
    for key, module in (("core", None if core is None else first_block(core)), ("head", head)):
        if module is not None:

            def hook(*_, key=key):
                counts[key] += 1

            handles.append(module.register_forward_hook(hook))
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def sampling_settings(system: nn.Module) -> dict:
    """The sampling keyword arguments the evaluation used: the evaluator's (the config's predict_kwargs when it
    names none)."""
    evaluator = getattr(system, "evaluator", None)
    settings = getattr(evaluator, "sampling", None)
    if settings is None:
        settings = system.hparams.get("predict_kwargs") or {}
    return dict(asdict(settings) if hasattr(settings, "__dataclass_fields__") else settings)


def measure_sampling(system: nn.Module, batch: int, precision: str) -> dict:
    """Images/s of `system.sample` on a batch of `batch` labels (every class in turn) after a warm-up batch of 2,
    with the evaluation's sampling settings, seeded; the calls of the core and the head while the warm-up batch is
    sampled (each call serves every image of the batch, so they are the calls per image). On a GPU it samples in
    bf16 autocast when the run trained in bf16, on a CPU in fp32."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    system.to(device).eval()  # Lightning hands the model back on the CPU after `test`
    settings = sampling_settings(system)
    labels = torch.arange(batch, device=device) % int(system.hparams.num_classes)
    bf16 = device.type == "cuda" and "bf16" in str(precision)

    def draw(y: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator(device).manual_seed(0)
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            return system.sample(y, generator=generator, **settings)

    with count_calls(system) as calls:
        draw(labels[:2])
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    images = draw(labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if images.shape[0] != batch:
        raise RuntimeError(f"sample() made {images.shape[0]} images of a batch of {batch} labels")
    return {"images_per_s": batch / seconds, "speed_batch": batch, "sampling_device": device.type,
            "sampling_precision": "bf16 autocast" if bf16 else "fp32", "sampling": settings,
            "core_calls_per_image": calls["core"], "head_calls_per_image": calls["head"]}  # fmt: skip


def parameters(system: nn.Module) -> int:
    """The generator's parameters: the frozen tokenizer's left out."""
    return sum(p.numel() for name, p in system.named_parameters() if not name.startswith("tokenizer."))


def run_method(tier: Tier, budget: Budget, gpu: bool, method: Method, prepared: dict, out: Path, command: str) -> dict:
    """Train (or resume, or skip a finished fit), evaluate and measure one method; writes and returns its row."""
    from lit_ar.cli import cli_main
    from lit_ar.evaluation import EvaluationRecord

    run_dir = out / method.slug
    trained_as = METHODS[method.samples] if method.samples else method  # a sampling variant evaluates another's run
    configs, args = generator_run(tier, budget, gpu, trained_as, prepared)
    log(f"{trained_as.name}: fit {' + '.join(configs)} {shlex.join(args)}")
    train_seconds, trained = fit(configs, args, out / trained_as.slug)
    ckpt = out / trained_as.slug / "checkpoints" / "last.ckpt"
    if trained_as is not method:
        extra_configs, method_args = split_configs(method.overrides_for(tier.name, gpu, budget))
        configs, args = configs + extra_configs, args + method_args
    log(f"{method.name}: {'trained' if trained else 'trained before'} ({train_seconds:.0f} s); evaluating")
    start = time.perf_counter()
    cli = cli_main(["test", *config_args([*configs, *tier.eval_configs]), *args, *QUIET,
                    "--trainer.logger.init_args.save_dir", str(run_dir),
                    f"{EVAL}extractor_ckpt", str(prepared["classifier"]),
                    f"{EVAL}reference_dir", str(out / "references"),
                    f"{EVAL}per_class", str(tier.per_class), *tier.eval_args, "--ckpt_path", str(ckpt)])  # fmt: skip
    eval_seconds = time.perf_counter() - start
    record_file = run_dir / "eval" / "evaluation.json"
    record = EvaluationRecord.from_json(record_file)
    if record.checkpoint is None or Path(record.checkpoint["path"]) != ckpt:
        raise RuntimeError(f"{record_file} is not the evaluation of {ckpt}")
    system = cli.model
    speed = measure_sampling(system, tier.speed_batch, cli.trainer.precision)
    global_step = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["global_step"]
    metrics = record.metrics
    row = {
        "method": method.name,
        "paper": method.paper,
        "notes": method.notes,
        "tokenizer": method.tokenizer,
        "fid": metrics.get("fid"),
        "precision": metrics.get("precision"),
        "recall": metrics.get("recall"),
        "class_accuracy": metrics.get("class_accuracy"),
        "inception_score": metrics.get("is_mean"),
        "num_samples": record.num_samples,
        **speed,
        "train_minutes": train_seconds / 60,
        "eval_minutes": eval_seconds / 60,
        "params": parameters(system),
        "steps": budget.steps,
        "steps_trained": int(global_step),
        "batch": budget.batch,
        "configs": configs,
        "args": args,
        "checkpoint": str(ckpt),
        "evaluation_json": str(record_file),
        "machine": machine(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "command": command,
    }
    row = json.loads(json.dumps(row, default=str))  # as the file holds it (lists for tuples, settings as text)
    (run_dir / ROW_FILE).write_text(json.dumps(row, indent=2) + "\n")
    log(f"{method.name}: FID {_fmt(row['fid'], 2)}, class accuracy {_fmt(row['class_accuracy'])}, "
        f"{_speed(row['images_per_s'])} images/s")  # fmt: skip
    return row


# -- the outputs ---------------------------------------------------------------------------------------------------
def _fmt(value, decimals: int = 3) -> str:
    """A table cell: `-` for a missing or non-finite value, integers as they are, floats at `decimals` places."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{decimals}f}" if isinstance(value, float) else str(value)


def _speed(value: float | None) -> str:
    """Images/s at about three significant digits, without an exponent."""
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


COLUMNS = ("method", "FID", "precision", "recall", "class acc.", "images/s", "core calls/img", "head calls/img",
           "train min", "params", "steps x batch")  # fmt: skip


def markdown(board: dict) -> str:
    rows = board["rows"]
    budget = board["budget"]
    lines = [
        f"# Leaderboard: tier `{board['tier']}`{' (GPU budget)' if board['gpu'] else ''}",
        "",
        f"{board['description']}.",
        "",
        f"Budget: {budget['steps']} steps of batch {budget['batch']} per method. Evaluation: `lit_ar test` with "
        f"{', '.join(f'`{c}`' for c in board['eval_configs'])}, {board['per_class']} samples of every class, seeded, "
        "with each config's `predict_kwargs`; FID, precision and recall in the tier classifier's features against "
        "the training split, class accuracy by that classifier. Images/s: one batch of "
        f"{board['speed_batch']} after a warm-up batch (tokenizer decode included). Calls per image: passes of the "
        "network's core and calls of its head while one batch is sampled.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "| " + " | ".join("---" for _ in COLUMNS) + " |",
    ]
    for r in rows:
        cells = [f"[{r['method']}]({r['paper']})", _fmt(r["fid"], 2), _fmt(r["precision"]), _fmt(r["recall"]),
                 _fmt(r["class_accuracy"]), _speed(r["images_per_s"]), _fmt(r["core_calls_per_image"]),
                 _fmt(r["head_calls_per_image"]), _fmt(r["train_minutes"], 2 if r["train_minutes"] < 10 else 1),
                 _params(r["params"]),
                 f"{r['steps_trained']} x {r['batch']}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    machines = sorted({r["machine"] for r in rows})
    lines += [
        "",
        f"Machine: {'; '.join(machines) if machines else board['machine']}. torch "
        f"{', '.join(sorted({r['torch'] for r in rows})) or board['torch']}. Rows measured "
        f"{', '.join(sorted({r['date'][:10] for r in rows}))}; this table written {board['date']}.",
        "",
        f"Command: `{board['command']}`",
        "",
    ]
    return "\n".join(lines)


def plot(board: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in board["rows"] if r["images_per_s"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "class_accuracy", "class accuracy (higher is better)"),
                           (axes[1], "fid", "FID (lower is better)")):  # fmt: skip
        points = [(r["images_per_s"], r[key], r["method"]) for r in rows if r[key] is not None]
        ax.scatter([p[0] for p in points], [p[1] for p in points])
        for x, y, name in points:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel(f"images/s ({board['rows'][0]['sampling_device'] if board['rows'] else ''}, batch "
                      f"{board['speed_batch']})")  # fmt: skip
        ax.set_ylabel(label)
        if key == "class_accuracy":
            ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    fig.suptitle(f"tier {board['tier']}{' (GPU budget)' if board['gpu'] else ''}: {board['budget']['steps']} steps "
                 f"x batch {board['budget']['batch']}")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def prepared_minutes(out: Path) -> dict[str, float]:
    """Training minutes of the folder's classifier and tokenizers (summed over the calls that made them)."""
    folders = ["classifier", *(f"tokenizer_{kind}" for kind in TOKENIZER_KINDS)]
    files = {name: out / name / FIT_FILE for name in folders}
    return {name: json.loads(f.read_text())["seconds"] / 60 for name, f in files.items() if f.is_file()}


def write_outputs(board: dict, out: Path) -> None:
    (out / "leaderboard.json").write_text(json.dumps(board, indent=2) + "\n")
    (out / "leaderboard.md").write_text(markdown(board))
    plot(board, out / "leaderboard.png")


# -- the command ---------------------------------------------------------------------------------------------------
def run(tier_name: str, methods: list[Method], gpu: bool = False, out: str | Path | None = None,
        steps: int | None = None, command: str = "") -> dict:  # fmt: skip
    """Every method of `methods` at the tier's budget (`gpu`: its GPU budget; `steps` replaces the budget's steps)
    into `out`; returns the leaderboard (what leaderboard.json holds: these rows and the folder's other finished
    ones) with `cached`: the rows of `methods` found finished."""
    tier = TIERS[tier_name]
    budget = tier.gpu if gpu else tier.cpu
    budget = budget if steps is None else replace(budget, steps=steps)
    out = Path(out or f"runs/leaderboard/{tier.name}{'_gpu' if gpu else ''}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    identity = {"tier": tier.name, "gpu": gpu, "steps": budget.steps, "batch": budget.batch}
    budget_file = out / BUDGET_FILE
    if budget_file.exists() and (held := json.loads(budget_file.read_text())) != identity:
        raise LeaderboardError(f"--out {out} holds a leaderboard of {held}, this run is {identity}: its rows would "
                               "not be comparable; pass another --out (or remove that folder)")  # fmt: skip
    budget_file.write_text(json.dumps(identity))
    if torch.cuda.is_available() and not gpu:
        log("a GPU is present: training the CPU budget on it (--gpu selects the tier's GPU budget)")
    if tier.gpu_tier and not torch.cuda.is_available():
        log(f"tier {tier.name} is sized for a GPU: on this CPU each method takes many hours")
    rows, cached = {}, []
    for method in methods:
        row_file = out / method.slug / ROW_FILE
        if row_file.exists():
            rows[method.name] = json.loads(row_file.read_text())
            cached.append(method.name)
    todo = [m for m in methods if m.name not in rows]
    log(f"tier {tier.name}, {budget.steps} steps x batch {budget.batch}, into {out}; {machine()}")
    log(f"rows finished before (not trained again): {cached or 'none'}; to run: {[m.name for m in todo] or 'none'}")
    prepared = prepare(tier, budget, {m.tokenizer for m in todo}, out) if todo else {}
    for method in todo:
        rows[method.name] = run_method(tier, budget, gpu, method, prepared, out, command)
    # the folder's other finished rows (earlier runs of other --methods) stay on the board: registry order, then name
    for row_file in sorted(out.glob(f"*/{ROW_FILE}")):
        row = json.loads(row_file.read_text())
        rows.setdefault(row["method"], row)
    order = {name: i for i, name in enumerate(METHODS)}
    names = sorted(rows, key=lambda name: (order.get(name, len(order)), name))
    board = {
        "tier": tier.name,
        "description": tier.description,
        "gpu": gpu,
        "budget": asdict(budget),
        "eval_configs": list(tier.eval_configs),
        "per_class": tier.per_class,
        "speed_batch": tier.speed_batch,
        "prepared_minutes": prepared_minutes(out),
        "machine": machine(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "command": command,
        "rows": [rows[name] for name in names],
    }
    write_outputs(board, out)
    log(f"wrote {out / 'leaderboard.md'}, leaderboard.json, leaderboard.png")
    print(markdown(board))
    return {**board, "cached": cached}


def import_registrations(source: str) -> None:
    """Import a Python file or module whose import registers methods (`register(...)`)."""
    if source.endswith(".py") or Path(source).is_file():
        spec = importlib.util.spec_from_file_location(f"leaderboard_plugin_{Path(source).stem}", source)
        if spec is None or spec.loader is None:
            raise ImportError(f"--register {source!r}: not a Python file")
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    else:
        importlib.import_module(source)


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[Method]]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.leaderboard", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--tier", required=True, help=f"one of: {', '.join(TIERS)}")
    p.add_argument("--methods", nargs="+", metavar="NAME", default=None,
                   help="the rows to run, by registered name (default: every method with a config for the tier): "
                        + ", ".join(repr(m) for m in METHODS))  # fmt: skip
    p.add_argument("--gpu", action="store_true", help="the tier's GPU budget (needs a CUDA device)")
    p.add_argument("--out", default=None, help="output folder (default runs/leaderboard/<tier>[_gpu])")
    p.add_argument("--steps", type=int, default=None, help="replace the budget's steps (a short or a longer run)")
    p.add_argument("--register", action="append", default=[], metavar="FILE_OR_MODULE",
                   help="import this Python file or module first: its `register(...)` calls add rows")  # fmt: skip
    args = p.parse_args(argv)
    for source in args.register:
        import_registrations(source)
    if args.tier not in TIERS:
        p.error(f"--tier {args.tier!r} is not a tier; accepted: {', '.join(TIERS)}")
    tier = TIERS[args.tier]
    if args.methods is None:
        methods = [m for m in METHODS.values() if m.config_for(tier.name, tier.dataset)]
    else:
        by_lower = {name.lower(): m for name, m in METHODS.items()}
        if unknown := [n for n in args.methods if n.lower() not in by_lower]:
            p.error(f"--methods {', '.join(map(repr, unknown))}: not a registered method; accepted: "
                    f"{', '.join(map(repr, METHODS))}")  # fmt: skip
        methods = list({by_lower[n.lower()].name: by_lower[n.lower()] for n in args.methods}.values())
        if missing := [m.name for m in methods if not m.config_for(tier.name, tier.dataset)]:
            p.error(f"--methods {', '.join(map(repr, missing))}: no config for --tier {tier.name} (Method.config / "
                    "Method.debug_config)")  # fmt: skip
    for m in methods:
        stacked, _ = split_configs(m.overrides_for(tier.name, args.gpu, tier.cpu))
        for config in [m.config_for(tier.name, tier.dataset), *stacked]:
            if not Path(repo_path(config)).is_file():
                p.error(f"method {m.name!r}: its config {config} for --tier {tier.name} does not exist")
    if args.gpu and not torch.cuda.is_available():
        p.error(f"--gpu selects tier {tier.name}'s GPU budget, but torch {torch.__version__} sees no CUDA device "
                "here (torch.cuda.is_available() is False); run without --gpu for the CPU budget")  # fmt: skip
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps {args.steps}: must be at least 1")
    return args, methods


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, methods = parse(argv)
    command = "python -m benchmarks.leaderboard " + shlex.join(argv)
    try:
        return run(args.tier, methods, gpu=args.gpu, out=args.out, steps=args.steps, command=command)
    except LeaderboardError as error:
        sys.exit(f"python -m benchmarks.leaderboard: error: {error}")
