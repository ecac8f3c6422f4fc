"""Measuring tools shared by the benchmark scripts: timing, peak memory, the machine's matmul ceiling, tables."""

import contextlib
import json
import platform
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    return f"{cpu} CPU, {torch.get_num_threads()} threads (torch {torch.__version__})"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], warmup: int = 1, repeat: int = 3, fastest: bool = False) -> float:
    """Median (or, with `fastest`, the least) wall seconds of fn() after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times) if fastest else sorted(times)[len(times) // 2]


def time_in_turn(fns: dict[str, Callable[[], object]], warmup: dict[str, int], repeat: int) -> dict[str, float]:
    """Median wall seconds of each fn after its `warmup` untimed calls, the fns timed one call each in turn
    (a, b, a, b, ...): a drift in the machine's speed during the run (another job, the clock) falls on all of
    them alike, which timing one after the other does not give. One fn: the same as time_call."""
    for name, fn in fns.items():
        for _ in range(warmup[name]):
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def aten_calls(fn: Callable[[], object]) -> int:
    """Top-level aten operator calls (each one dispatch; on a GPU at small batch, each one launch-bound) made by one
    call of fn, counted with torch's CPU profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None)


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def precision_context(precision: str, device: str):
    """bf16 autocast for `bf16` / `bf16-autocast`; anything else (fp32, or weights already cast) runs as is."""
    if precision in ("bf16", "bf16-autocast"):
        return torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def optimizer_step(loss_of, opt: torch.optim.Optimizer, device: str):
    """A benchmark's training step(precision): loss_of() under the precision's autocast, backward, optimizer step."""

    def step(precision: str) -> None:
        with precision_context(precision, device):
            loss = loss_of()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def peak_memory_mb() -> float:
    """Peak GPU memory allocated since the last reset on CUDA; else the process's peak resident set (MB)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def matmul_peak_flops(dtype: torch.dtype, n: int = 2048, repeat: int = 10) -> float:
    """Measured FLOP/s of an n^3 matmul in `dtype`, the fastest of `repeat` calls: the ceiling that model FLOPs
    utilisation is reported against. The fastest, not the median: a ceiling measured while something else briefly
    shares the machine would be too low, and a row's MFU then above 1 (seen on a shared 2-core CPU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / time_call(lambda: a @ b, warmup=2, repeat=repeat, fastest=True)


def print_table(rows: list[dict], title: str = "") -> None:
    if not rows:
        return
    cols = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    if title:
        print(f"\n{title}")
    print(" | ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("-|-".join("-" * w for w in widths))
    for row in cells:
        print(" | ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_json(rows: list[dict], path: str | Path, **meta) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"machine": machine(), **meta, "rows": rows}, indent=2))
