"""Causal AR speed and memory: cached vs uncached sampling, eager vs compiled, decode-step time along the sequence,
training throughput, and GPT-B against LlamaGen's own numbers on this machine.

    python -m benchmarks.causal_ar                       # mid-size preset (GPT-mini), 16x16 grid, batch 8
    python -m benchmarks.causal_ar --gpt-b               # + GPT-B, batch 4 with CFG 2.0, fp32 and bf16 autocast
    python -m benchmarks.causal_ar --no-compile          # eager only (compiling takes minutes on a small CPU)
    python -m benchmarks.causal_ar --threads 1 --clock cpu   # on a shared, loaded machine: CPU seconds of 1 thread

Sampling numbers are token generation (`CausalARSystem.generate`, no tokenizer decode), as LlamaGen's `generate()`.
Peak memory on CPU is the process's peak resident set (resource.getrusage ru_maxrss), read after each section, so
it is a running high-water mark; on CUDA it is torch.cuda.max_memory_allocated per section.
"""

import argparse
import time
import warnings
from collections.abc import Callable

import torch

from benchmarks.common import (
    machine,
    peak_memory_mb,
    precision_context,
    print_table,
    reset_peak_memory,
    sync,
    write_json,
)
from lit_ar.systems.causal_ar import CausalARSystem

# LlamaGen's own figures on the reference machine (torch 2.13 CPU, 2 threads): generate() for GPT-B, batch 4 with
# CFG 2.0 (forward batch 8), 256 tokens, top-k off; and training forward+backward at batch 8 in fp32.
LLAMAGEN_IMAGES_PER_S = {"fp32": 0.28, "bf16-autocast": 0.57}
LLAMAGEN_TRAIN_TOKENS_PER_S = 287.0


CLOCK = time.perf_counter  # --clock cpu: time.process_time (CPU seconds of this process, all its threads)


def time_call(fn: Callable[[], object], warmup: int = 1, repeat: int = 3) -> float:
    """Median seconds of fn() on CLOCK after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        start = CLOCK()
        fn()
        sync()
        times.append(CLOCK() - start)
    return sorted(times)[len(times) // 2]


def make_system(preset: str, vocab: int, grid: int, num_classes: int, compile: bool, device: str) -> CausalARSystem:
    torch.manual_seed(0)
    system = CausalARSystem(preset=preset, vocab_size=vocab, grid_size=grid, num_classes=num_classes, image_size=64,
                            compile=compile, token_dropout=0.0, resid_dropout=0.0)  # fmt: skip
    system.configure_model()  # `compile` applies here, as the Trainer's hook does
    with torch.no_grad():  # trained-looking weights: a zero output layer would make every logit equal
        system.model.output.weight.normal_(0.0, 0.02)
    return system.to(device).eval()


def sampling_row(system: CausalARSystem, batch: int, cfg: float, use_cache: bool, precision: str, repeat: int) -> dict:
    labels = torch.arange(batch, device=system.device) % system.hparams.num_classes

    def run():
        with precision_context(precision, system.device.type):
            system.generate(labels, cfg=cfg, generator=torch.Generator(system.device).manual_seed(0),
                            use_cache=use_cache)  # fmt: skip

    reset_peak_memory()
    seconds = time_call(run, warmup=1, repeat=repeat)
    return {"images/s": batch / seconds, "s/batch": seconds, "peak MB": peak_memory_mb()}


def decode_step_times(system: CausalARSystem, batch: int, repeat: int = 20) -> tuple[float, float]:
    """Seconds of one decode step at the first and at the last position of the static cache."""
    m = system.model
    labels = torch.arange(batch, device=system.device) % system.hparams.num_classes
    step = system.sampling_kwargs()["decode_step"]  # the one-token step the sampler runs (compiled with compile)
    times = []
    with torch.no_grad():
        m.setup_caches(batch, m.output.weight.dtype)
        m.prefill(labels)
        tokens = torch.zeros(batch, 1, dtype=torch.long, device=system.device)
        for pos in (m.cls_token_num, m.cls_token_num + m.num_tokens - 2):
            input_pos = torch.tensor([pos], device=system.device)
            times.append(time_call(lambda: step(tokens, input_pos), warmup=2, repeat=repeat))
        m.clear_caches()
    return times[0], times[1]


def training_row(system: CausalARSystem, batch: int, repeat: int) -> dict:
    """Forward + backward + the system's AdamW step on random tokens (fp32), as LlamaGen's training loop."""
    system.train()
    m, L = system.model, system.model.num_tokens
    opt = system.make_optimizer()
    tokens = torch.randint(0, m.vocab_size, (batch, L), device=system.device)
    data = {"tokens": tokens, "label": torch.arange(batch, device=system.device) % system.hparams.num_classes}

    def step():
        system.training_step(data, 0).backward()  # with `compile`, its head and loss run compiled
        opt.step()
        opt.zero_grad(set_to_none=True)

    reset_peak_memory()
    with warnings.catch_warnings():  # training_step outside a Trainer logs nothing, and says so
        warnings.filterwarnings("ignore", message=".*self.log.*")
        seconds = time_call(step, warmup=1, repeat=repeat)
    system.eval()
    return {"tokens/s": batch * L / seconds, "s/step": seconds, "peak MB": peak_memory_mb()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="GPT-mini", help="the mid-size preset")
    p.add_argument("--grid", type=int, default=16)
    p.add_argument("--vocab", type=int, default=1024, help="vocabulary of the mid-size runs")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-uncached-compiled", action="store_true", help="skip compiling the growing-prefix path")
    p.add_argument("--gpt-b", action="store_true", help="also GPT-B against LlamaGen's figures (minutes)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: CPU seconds of the process (with --threads 1, unaffected by other load)")  # fmt: skip
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args()
    global CLOCK
    if args.threads:
        torch.set_num_threads(args.threads)
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    device = "cuda" if torch.cuda.is_available() else "cpu"
    modes = [False] if args.no_compile else [False, True]
    print(f"machine: {machine()}; clock: {args.clock}")
    rows: list[dict] = []

    for compile in modes:
        system = make_system(args.preset, args.vocab, args.grid, 10, compile, device)
        name = f"{args.preset} {'compiled' if compile else 'eager'}"
        first, last = decode_step_times(system, args.batch)
        rows.append({"run": name, "what": "decode step first/last position (ms)", "value": f"{first * 1e3:.2f} / "
                     f"{last * 1e3:.2f}", "ratio": last / first})  # fmt: skip
        cached = sampling_row(system, args.batch, 1.0, True, "fp32", args.repeat)
        rows.append({"run": name, "what": "sample, KV cache (images/s)", "value": cached["images/s"],
                     "peak MB": cached["peak MB"]})  # fmt: skip
        if not (compile and args.no_uncached_compiled):
            uncached = sampling_row(system, args.batch, 1.0, False, "fp32", 1)
            speedup = cached["images/s"] / uncached["images/s"]
            rows.append({"run": name, "what": "sample, no cache (images/s)", "value": uncached["images/s"],
                         "ratio": speedup, "peak MB": uncached["peak MB"]})  # fmt: skip
        train = training_row(system, args.batch, args.repeat)
        rows.append({"run": name, "what": "train fwd+bwd+AdamW (tokens/s)", "value": train["tokens/s"],
                     "peak MB": train["peak MB"]})  # fmt: skip
        print_table(rows[-4:], f"{name} (batch {args.batch}, {args.grid}x{args.grid} tokens, vocab {args.vocab})")

    if args.gpt_b:
        for compile in modes:
            system = make_system("GPT-B", 16384, 16, 1000, compile, device)
            name = f"GPT-B {'compiled' if compile else 'eager'}"
            for precision in ("fp32", "bf16-autocast"):
                r = sampling_row(system, 4, 2.0, True, precision, 1)
                anchor = LLAMAGEN_IMAGES_PER_S[precision]
                rows.append({"run": name, "what": f"sample b4 CFG 2.0 {precision} (images/s)", "value": r["images/s"],
                             "ratio": r["images/s"] / anchor, "peak MB": r["peak MB"],
                             "LlamaGen": anchor})  # fmt: skip
                print_table(rows[-1:])
            train = training_row(system, 8, 1)
            rows.append({"run": name, "what": "train b8 fp32 (tokens/s)", "value": train["tokens/s"],
                         "ratio": train["tokens/s"] / LLAMAGEN_TRAIN_TOKENS_PER_S, "peak MB": train["peak MB"],
                         "LlamaGen": LLAMAGEN_TRAIN_TOKENS_PER_S})  # fmt: skip
            print_table(rows[-1:])
            del system

    print_table(rows, "causal AR (ratio: cached/uncached, last/first step, or lit_ar/LlamaGen)")
    if args.json:
        write_json(rows, args.json, args=vars(args))


if __name__ == "__main__":
    main()
