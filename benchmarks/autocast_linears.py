"""What `linears_in_autocast_dtype` buys: a family's sampling under bf16 autocast with the blocks' linear weights
cast once per call (what every family's sampler does) against autocast casting them at every matmul (the same call
with the cast off), eager and with compiled blocks. The two forms alternate call by call in one process after a
warm-up call of each, and must draw the same tokens (checked). One model is held at a time.

Images/s, the median of `--repeat` calls a form; prints a table, --json also writes it.

    python -m benchmarks.autocast_linears                          # VAR-d16, batch 2, CFG 1.5, top-k 900, top-p 0.96
    python -m benchmarks.autocast_linears --family causal --size small --batch 8   # LlamaGen-style, CFG 2.0
"""

import argparse
import contextlib
import gc
import statistics
import tempfile
import time
from pathlib import Path

import torch

import lit_ar.systems.generator
from benchmarks.__main__ import build, count_params
from benchmarks.common import machine, print_table, sync, write_json
from lit_ar.performance import linears_in_autocast_dtype

FAMILIES = ("causal", "flowar", "mar", "masked", "scale")


def uncast(*_):
    """The cast off: autocast casts the fp32 weights itself, at every matmul."""
    return contextlib.nullcontext(0)


def sample_tokens(family: str, system, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One sampling call at the settings the peers' anchors use (VAR's demo for `scale`), tokens out."""
    if family == "scale":
        indices, _ = system.sample_tokens(labels, cfg=1.5, top_k=900, top_p=0.96, generator=generator)
        return torch.cat(indices, dim=1)
    if family == "causal":
        return system.generate(labels, cfg=2.0, generator=generator)
    if family == "masked":
        return system.generate(labels, cfg=2.0, steps=8, generator=generator)
    return system.sample_tokens(labels, cfg=2.0, generator=generator)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="scale", choices=FAMILIES)
    parser.add_argument("--size", default="B", choices=["tiny", "small", "B"], help="B: VAR-d16, GPT-B, ...")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    parser.add_argument("--repeat", type=int, default=6)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    module = lit_ar.systems.generator  # where every family's sampler looks the cast up
    folder = tempfile.TemporaryDirectory()
    rows = []
    for mode in args.modes:
        # one model at a time: on a 2-core CPU a second d16 model held in the process slowed the timed one
        gc.collect()
        system = build(args.family, args.size, 16, mode == "compiled", device, Path(folder.name))
        labels = torch.arange(args.batch, device=device) % system.hparams.num_classes

        def run(cast: bool, system=system, labels=labels):
            module.linears_in_autocast_dtype = linears_in_autocast_dtype if cast else uncast
            g = torch.Generator(device).manual_seed(0)
            sync()
            start = time.perf_counter()
            with torch.no_grad(), torch.autocast(device, torch.bfloat16):
                tokens = sample_tokens(args.family, system, labels, g)
            sync()
            return time.perf_counter() - start, tokens

        try:
            (_, with_cast), (_, without) = run(True), run(False)  # warm-up (and compilation) of each form
            if not torch.equal(with_cast, without):
                raise RuntimeError(f"{mode}: the cast changed the sampled tokens; it must change nothing but speed")
            times = {True: [], False: []}
            for i in range(args.repeat):
                for cast in (True, False) if i % 2 else (False, True):
                    times[cast].append(run(cast)[0])
        finally:
            module.linears_in_autocast_dtype = linears_in_autocast_dtype
        ips = {cast: args.batch / statistics.median(t) for cast, t in times.items()}
        rows.append({"family": args.family, "size": args.size, "params": count_params(system), "mode": mode,
                     "batch": args.batch, "uncast images/s": ips[False], "cast images/s": ips[True],
                     "cast / uncast": ips[True] / ips[False], "same tokens": True})  # fmt: skip
        del system
    folder.cleanup()
    title = "sampling under bf16 autocast, linear weights cast once a call (cast) or at every matmul (uncast)"
    print_table(rows, f"{title}, {machine()}")
    if args.json:
        write_json(rows, args.json, args=vars(args))
    return rows


if __name__ == "__main__":
    main()
