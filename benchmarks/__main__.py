"""One benchmark of every generator family at a named size: training throughput, sampling images/s at several
batches, eager vs compiled, fp32 vs bf16 autocast, peak memory, and model FLOPs utilisation (MFU) against the
matmul peak measured on this machine at start. Prints a markdown table; `--json` also writes the rows.

    python -m benchmarks --size tiny --families causal --batches 1 --steps 2      # seconds on a CPU
    python -m benchmarks --size B --compile both --precision 32 bf16 --json runs/bench/B.json   # on a GPU
    python -m benchmarks --size tiny --what sample --grids 8 16 32 --json scaling.json         # scaling study

Sizes: tiny (CPU tests), small, and B: LlamaGen GPT-B, MaskGIT-base (24 x 768), VAR-d16, MAR-B (and FlowAR at
MAR-B's width). Every model is freshly initialised (random weights: speed does not depend on training) and nothing
is read from disk: the VAR family's multi-scale tokenizer is a random-init one written to a temporary folder.
Sampling times token generation only (as LlamaGen's `generate`, VAR's `autoregressive_infer_cfg`): the tokenizer's
decode, one conv pass per image in every family, is left out.

FLOPs (stated in the JSON): N = parameters of the generator (the frozen tokenizer excluded), L = tokens per image
(grid**2; VAR: the sum of its scales' s**2). Training: 6 * N * L per image (forward + backward). Sampling: 2 * N * L
per image, one forward over every token: the useful work. Families that run more forwards per token (masked: a
full pass per step; MAR/FlowAR: `flow_steps` head calls per token; uncached recomputation) thus show a lower MFU
by design. Attention's L**2 term is left out, as in the 6ND rule. MFU = model FLOP/s / measured matmul FLOP/s
of the same dtype (torch.mm at 2048^3 on CPU, 8192^3 on CUDA; fp32 there follows torch's TF32 setting).
Peak memory: torch.cuda.max_memory_allocated per row on CUDA; on CPU the process's peak resident set, a
high-water mark over the whole run (read it from the first row of a fresh process to compare sizes).
Eager against compiled: `--compile both` times one model after the other; `--compile both --alternate` holds both
and times their calls in turn (fairer on a machine whose speed drifts; no peak memory then).
"""

import argparse
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks import causal_ar as causal_bench
from benchmarks import flow_ar as flow_bench
from benchmarks import scale_ar as scale_bench
from benchmarks.common import (
    machine,
    matmul_peak_flops,
    optimizer_step,
    peak_memory_mb,
    precision_context,
    print_table,
    reset_peak_memory,
    time_in_turn,
    write_json,
)
from lit_ar.models.autoencoder import default_scales

FAMILIES = ("causal", "masked", "scale", "mar", "flowar")
SIZES = ("tiny", "small", "B")
# Per family: the preset (or VAR depth) of each named size. B is each paper's base model.
PRESET = {
    "causal": {"tiny": "GPT-nano", "small": "GPT-mini", "B": "GPT-B"},
    "masked": {"tiny": "tiny", "small": "small", "B": "base"},
    "scale": {"tiny": 2, "small": 6, "B": 16},
    "mar": {"tiny": "tiny", "small": "small", "B": "mar_b"},
    "flowar": {"tiny": "tiny", "small": "small", "B": "mar_b"},
}
# Token space per size: ImageNet's 1000 classes and the papers' codebooks at B; a CPU-sized one below.
VOCAB = {"causal": 16384, "masked": 1024, "scale": 4096}
FORMULAS = {
    "train_flops": "6 * params * tokens (tokens = batch * tokens_per_image per step)",
    "sample_flops": "2 * params * tokens (tokens = batch * tokens_per_image per sampling call)",
    "mfu": "model FLOP/s / measured torch.mm FLOP/s in the row's dtype",
}


def build(family: str, size: str, grid: int, compile: bool, device: str, folder: Path):
    """A freshly initialised system of `family` at the named size on a grid x grid token grid (built by the family
    scripts' own builders)."""
    big = size == "B"
    num_classes, vocab = (1000, VOCAB.get(family)) if big else (10, 1024)
    preset = PRESET[family][size]
    if family == "causal":
        return causal_bench.make_system(preset, vocab, grid, num_classes, compile, device)
    if family == "masked":
        from lit_ar.systems.masked_ar import MaskedARSystem

        torch.manual_seed(0)
        system = MaskedARSystem(preset=preset, vocab_size=vocab, grid_size=grid, num_classes=num_classes,
                                dropout=0.0, compile=compile)  # fmt: skip
        system.configure_model()  # `compile` applies here, as the Trainer's hook does
        return system.to(device).eval()
    if family == "scale":
        # VAR's tokenizer at B (16x downsampling, 4096 codes of width 32); the CPU-sized shapes one (4x) below
        tok, down, width = ("var_msvq16", 16, 32) if big else ("shapes", 4, 8)
        ckpt = scale_bench.tokenizer_ckpt(folder, tok, grid * down, vocab, width, default_scales(grid))
        return scale_bench.make_var(ckpt, preset, num_classes, grid * down, compile, device)
    return flow_bench.build(family, preset, device, grid_size=grid, compile=compile)


def count_params(system) -> int:
    return sum(p.numel() for n, p in system.named_parameters() if not n.startswith("tokenizer."))


def tokens_per_image(family: str, system) -> int:
    if family == "scale":
        return sum(s * s for s in system.scales)
    if family in ("mar", "flowar"):
        return system.grid_size**2
    return system.model.num_tokens


def random_batch(family: str, system, batch: int) -> dict:
    """Random tokens in the family's format, as a token cache serves them (the tokenizer's encode is not timed)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(batch) % system.hparams.num_classes
    if family in ("mar", "flowar"):
        tokens = torch.randn(batch, system.grid_size**2, system.token_dim, generator=g)  # (B, L, D)
    else:
        vocab = system.model.vocab_size
        tokens = torch.randint(0, vocab, (batch, tokens_per_image(family, system)), generator=g)  # (B, L)
    return {"tokens": tokens.to(system.device), "label": labels.to(system.device)}


def warmup_calls(system) -> int:
    return 2 if system.hparams.compile else 1  # compiled: the first calls compile (and may recompile once)


def train_step(family: str, system, batch: int, precision: str) -> Callable[[], None]:
    """One training step: the system's own training_step (loss), backward and optimizer step (the AdamW its
    configure_optimizers returns). Puts the system in train mode."""
    data = random_batch(family, system, batch)
    system.train()
    step = optimizer_step(lambda: system.training_step(data, 0), system.make_optimizer(), system.device.type)
    return lambda: step(precision)


def sample_call(family: str, system, batch: int, precision: str, args) -> Callable[[], None]:
    """Generating the tokens of `batch` images."""
    labels = torch.arange(batch, device=system.device) % system.hparams.num_classes

    def run():
        g = torch.Generator(system.device).manual_seed(0)
        with precision_context(precision, system.device.type), torch.no_grad():
            if family == "causal":
                system.generate(labels, cfg=args.cfg, generator=g)
            elif family == "masked":
                system.generate(labels, cfg=args.cfg, steps=args.masked_steps, generator=g)
            elif family == "scale":
                system.sample_tokens(labels, cfg=args.cfg, generator=g)
            else:
                steps = min(args.mar_steps, system.grid_size**2) if family == "mar" else None
                system.sample_tokens(labels, cfg=args.cfg, generator=g, steps=steps, flow_steps=args.flow_steps)

    return run


def measure(family: str, size: str, grid: int, systems: dict, args, peak: dict) -> list[dict]:
    """The rows of one family: training, then sampling at each batch, in each precision, for each of `systems`
    ({mode: system}). Two systems (eager and compiled, --alternate) are timed call by call in turn, so that a
    machine that slows down or speeds up over the run moves both alike; peak memory is then not reported (both
    models are resident)."""
    rows = []
    shared = len(systems) > 1
    counts = {mode: (count_params(s), tokens_per_image(family, s)) for mode, s in systems.items()}

    def add(kind: str, batch: int, seconds: dict) -> None:
        for mode, s in seconds.items():
            rows.append(row(family, size, grid, mode, precision, kind, batch, s, *counts[mode], peak,
                            None if shared else peak_memory_mb()))  # fmt: skip

    for precision in args.precision:
        if "train" in args.what:
            reset_peak_memory()
            steps = {m: train_step(family, s, args.train_batch, precision) for m, s in systems.items()}
            add("train", args.train_batch, time_in_turn(steps, {m: warmup_calls(s) for m, s in systems.items()},
                                                        args.steps))  # fmt: skip
            for s in systems.values():
                s.eval()
        for batch in args.batches if "sample" in args.what else ():
            reset_peak_memory()
            calls = {m: sample_call(family, s, batch, precision, args) for m, s in systems.items()}
            add("sample", batch, time_in_turn(calls, {m: warmup_calls(s) for m, s in systems.items()}, args.repeat))
    return rows


def row(family, size, grid, mode, precision, kind, batch, seconds, n_params, L, peak, peak_mb) -> dict:
    tokens = batch * L
    flops = (6 if kind == "train" else 2) * n_params * tokens / seconds
    return {"family": family, "size": size, "grid": grid, "mode": mode, "precision": precision, "kind": kind,
            "batch": batch, "params_M": n_params / 1e6, "tokens_per_image": L, "seconds": seconds,
            "images/s": batch / seconds, "tokens/s": tokens / seconds, "peak_MB": peak_mb,
            "TFLOP/s": flops / 1e12, "MFU": flops / peak[precision]}  # fmt: skip


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--size", choices=SIZES, default="tiny", help="named model size of every family")
    p.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    p.add_argument("--grids", type=int, nargs="+", default=[16], help="token grid sides (scaling study: 8 16 32)")
    p.add_argument("--what", nargs="+", choices=("train", "sample"), default=["train", "sample"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64], help="sampling batches")
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed training steps (median; after a warm-up step)")
    p.add_argument("--repeat", type=int, default=2, help="timed sampling calls (median; after a warm-up call)")
    p.add_argument("--compile", choices=("eager", "compiled", "both"), default="eager")
    p.add_argument("--alternate", action="store_true",
                   help="with --compile both: hold both models and time eager and compiled calls in turn (a fairer "
                        "ratio on a shared machine; no peak memory)")  # fmt: skip
    p.add_argument("--precision", nargs="+", choices=("32", "bf16"), default=["32"])
    p.add_argument("--cfg", type=float, default=1.0, help="guidance scale (!= 1 doubles every sampling batch)")
    p.add_argument("--masked-steps", type=int, default=8, help="MaskGIT decoding steps")
    p.add_argument("--mar-steps", type=int, default=64, help="MAR AR steps (capped at the token count)")
    p.add_argument("--flow-steps", type=int, default=25, help="ODE steps of the MAR/FlowAR flow head")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the rows (and the machine, peaks, formulas) here")
    args = p.parse_args(argv)
    for name, values in (("--grids", args.grids), ("--batches", args.batches)):
        if min(values) < 1:
            p.error(f"{name} {values}: every value must be >= 1")
    if args.alternate and args.compile != "both":
        p.error(f"--alternate alternates eager and compiled calls: it needs --compile both, not {args.compile}")
    if "flowar" in args.families and any(g & (g - 1) for g in args.grids):
        p.error(f"--grids {args.grids}: FlowAR's scales double up to the grid, so it needs powers of two")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step outside a Trainer logs nothing
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = 8192 if device == "cuda" else 2048
    dtypes = {"32": torch.float32, "bf16": torch.bfloat16}
    peak = {pr: matmul_peak_flops(dtypes[pr], n) for pr in args.precision}
    print(f"machine: {machine()}; matmul {n}^3 peak: "
          + ", ".join(f"{pr} {f / 1e12:.3g} TFLOP/s" for pr, f in peak.items()))  # fmt: skip
    modes = {"eager": [False], "compiled": [True], "both": [False, True]}[args.compile]
    # the tokenizer checkpoints the generators load: removed at the end (every test run of the harness made one)
    workspace = tempfile.TemporaryDirectory(prefix="lit_ar_bench_")
    folder = Path(workspace.name)
    rows: list[dict] = []
    for grid in args.grids:
        for family in args.families:
            # one model at a time, or both at once when their calls alternate
            for group in [modes] if args.alternate else [[m] for m in modes]:
                systems = {("compiled" if c else "eager"): build(family, args.size, grid, c, device, folder)
                           for c in group}  # fmt: skip
                rows += (new := measure(family, args.size, grid, systems, args, peak))
                print_table(new)
                del systems
                if device == "cuda":
                    torch.cuda.empty_cache()
                if args.json:  # after every model, so a run cut short keeps what it measured
                    write_json(rows, args.json, device=device, matmul_n=n, matmul_peak_flops=peak,
                               formulas=FORMULAS, args=vars(args))  # fmt: skip
    workspace.cleanup()
    print_table(rows, f"\n## lit_ar benchmarks, size {args.size} ({machine()})")
    result = {"machine": machine(), "device": device, "matmul_n": n, "matmul_peak_flops": peak,
              "formulas": FORMULAS, "rows": rows}  # fmt: skip
    return result


if __name__ == "__main__":
    main()
