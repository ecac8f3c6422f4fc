"""What `linears_in_autocast_dtype` buys: lit_ar's VAR sampling under bf16 autocast with the blocks' linear weights
cast once per call (what the scale-wise, masked and flow families run) against autocast casting them at every
matmul (the same call with the cast off), eager and with compiled blocks. The two forms alternate call by call in
one process after a warm-up call of each, and must draw the same tokens (checked).

Images/s, the median of `--repeat` calls a form; prints a table, --json also writes it.

    python -m benchmarks.autocast_linears                     # VAR-d16's size, batch 2, CFG 1.5, top-k 900, top-p 0.96
    python -m benchmarks.autocast_linears --depth 6 --batch 8  # a smaller VAR
"""

import argparse
import contextlib
import gc
import statistics
import tempfile
import time
from pathlib import Path

import torch

import lit_ar.systems.scale_ar as scale_ar_system
from benchmarks.common import machine, parameter_count, print_table, sync, write_json
from benchmarks.scale_ar import make_var, tokenizer_ckpt
from lit_ar.systems.generator import linears_in_autocast_dtype


def uncast(*_):
    """The cast off: autocast casts the fp32 weights itself, at every matmul."""
    return contextlib.nullcontext(0)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=16, help="lit_ar VAR depth (16: VAR-d16's size)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    parser.add_argument("--repeat", type=int, default=6)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    folder = tempfile.TemporaryDirectory()
    ckpt = tokenizer_ckpt(Path(folder.name), "var_msvq16", 256, 4096, 32)
    labels = torch.arange(args.batch, device=device) % 1000
    rows = []
    for mode in args.modes:
        # one model at a time: on a 2-core CPU a second d16 model held in the process slowed the timed one
        gc.collect()
        system = make_var(ckpt, args.depth, 1000, 256, mode == "compiled", device)

        def run(cast: bool, system=system):
            scale_ar_system.linears_in_autocast_dtype = linears_in_autocast_dtype if cast else uncast
            g = torch.Generator(device).manual_seed(0)
            sync()
            start = time.perf_counter()
            with torch.autocast(device, torch.bfloat16):
                indices, _ = system.sample_tokens(labels, cfg=1.5, top_k=900, top_p=0.96, generator=g)
            sync()
            return time.perf_counter() - start, torch.cat(indices, dim=1)

        try:
            (_, with_cast), (_, without) = run(True), run(False)  # warm-up (and compilation) of each form
            if not torch.equal(with_cast, without):
                raise RuntimeError(f"{mode}: the cast changed the sampled tokens; it must change nothing but speed")
            times = {True: [], False: []}
            for i in range(args.repeat):
                for cast in (True, False) if i % 2 else (False, True):
                    times[cast].append(run(cast)[0])
        finally:
            scale_ar_system.linears_in_autocast_dtype = linears_in_autocast_dtype
        ips = {cast: args.batch / statistics.median(t) for cast, t in times.items()}
        rows.append({"model": f"lit_ar VAR depth {args.depth}", "params": parameter_count(system.model), "mode": mode,
                     "batch": args.batch, "uncast images/s": ips[False], "cast images/s": ips[True],
                     "cast / uncast": ips[True] / ips[False], "same tokens": True})  # fmt: skip
        del system
    folder.cleanup()
    title = "VAR sampling under bf16 autocast, linear weights cast once a call (cast) or at every matmul (uncast)"
    print_table(rows, f"{title}, {machine()}")
    if args.json:
        write_json(rows, args.json, args=vars(args))
    return rows


if __name__ == "__main__":
    main()
