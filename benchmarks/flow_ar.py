"""AR + flow sampling speed: images/s of each generator at fixed steps, a MAR-B-size preset against the MAR anchor,
and the fraction of sampling time spent in the flow head at batch 1 and batch 64.

    python -m benchmarks.flow_ar                       # small preset, every backbone, head fraction (CPU minutes)
    python -m benchmarks.flow_ar --mar-b               # adds MAR-B size at batch 2, 64 AR steps (CPU: many minutes)
    python -m benchmarks.flow_ar --json runs/bench/flow_ar.json

Timings are of token generation (`sample_tokens`): the tokenizer's decode is left out (one conv decoder pass per
image, small next to 64 AR steps). Untrained weights: speed does not depend on them.
"""

import argparse
import itertools
import os
import time

import torch

from benchmarks.common import machine, parameter_count, precision_context, print_table, sync, time_call, write_json
from lit_ar.systems.flow_ar import FlowARSystem

MAR_ANCHOR_IMAGES_PER_S = 0.009  # MAR-B, 64 AR steps, 100 diffusion steps, batch 2, CFG 2.9 linear, fp32 (issue 7)
MAR_B_PARAMS, MAR_B_HEAD_PARAMS = 207_924_768, 35_749_920

PRESETS = {
    # a 16x16 grid of 16-wide tokens: ImageNet-256 under MAR's KL-16 (and 64x64 shapes at 4x downsampling)
    "tiny": dict(dim=64, depth=2, n_heads=4, buffer_size=16, head_width=64, head_depth=2, num_classes=10),
    "small": dict(dim=256, depth=4, n_heads=4, buffer_size=16, head_width=256, head_depth=3, num_classes=10),
    "mar_b": dict(dim=768, depth=12, n_heads=12, buffer_size=64, head_width=1024, head_depth=6, num_classes=1000),
}
# MAR-B with MAR's own DDPM head: MAR-B's 207,924,768 parameters exactly (the same work as MAR's code)
PRESETS["mar_b_ddpm"] = {**PRESETS["mar_b"], "head": "diffusion"}


def build(backbone: str, preset: str, device: str, grid_size: int = 16, compile: bool = False,
          head: str | None = None) -> FlowARSystem:  # fmt: skip
    """`head` None keeps the preset's (the flow head but for mar_b_ddpm)."""
    kwargs = dict(PRESETS[preset], **({"head": head} if head else {}))
    if backbone != "mar":
        kwargs.pop("buffer_size")
    torch.manual_seed(0)
    system = FlowARSystem(backbone=backbone, token_dim=16, grid_size=grid_size, image_size=4 * grid_size,
                          compile=compile, **kwargs)  # fmt: skip
    system.configure_model()  # `compile` applies here, as the Trainer's hook does
    return system.to(device).eval()


def images_per_s(system: FlowARSystem, batch: int, repeat: int = 1, **kw) -> float:
    labels = torch.arange(batch, device=system.device) % system.hparams.num_classes
    g = torch.Generator(device=system.device)

    def run():
        system.sample_tokens(labels, generator=g.manual_seed(0), **kw)

    return batch / time_call(run, warmup=1 if repeat > 1 else 0, repeat=repeat)


def head_fraction(system: FlowARSystem, batch: int, **kw) -> tuple[float, float]:
    """(seconds of one sampling call, fraction of them inside the flow head's forward)."""
    head_time = [0.0]
    forward = system.head.forward

    def timed(*args, **kwargs):
        sync()
        start = time.perf_counter()
        out = forward(*args, **kwargs)
        sync()
        head_time[0] += time.perf_counter() - start
        return out

    system.head.forward = timed
    labels = torch.arange(batch, device=system.device) % system.hparams.num_classes
    try:
        sync()
        start = time.perf_counter()
        system.sample_tokens(labels, generator=torch.Generator(device=system.device).manual_seed(0), **kw)
        sync()
        total = time.perf_counter() - start
    finally:
        del system.head.forward  # back to the class's method
    return total, head_time[0] / total


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="batch of the per-generator table")
    p.add_argument("--ar-steps", type=int, default=64, help="MAR's AR steps")
    p.add_argument("--flow-steps", type=int, default=25, help="ODE steps of the head")
    p.add_argument("--sampler", default="euler", choices=["euler", "heun", "euler_maruyama"],
                   help="the head's ODE/SDE sampler (heun: two head calls per step, one in the last)")  # fmt: skip
    p.add_argument("--cfg", type=float, default=2.9)
    p.add_argument("--fraction-batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--fraction-ar-steps", type=int, default=16, help="MAR AR steps of the head-fraction runs")
    p.add_argument("--mar-b", action="store_true", help="also time the MAR-B-size preset at batch 2")
    p.add_argument("--mar-b-flow-steps", type=int, nargs="+", default=[25])
    p.add_argument("--skip-small", action="store_true", help="skip the small-preset tables")
    p.add_argument("--mar-b-ar-steps", type=int, nargs="+", default=[64])
    p.add_argument("--mar-b-preset", default="mar_b", choices=sorted(PRESETS), help="the size of the --mar-b rows")
    p.add_argument("--mar-b-precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16-autocast"],
                   help="MAR-B rows in fp32 (the anchor's precision) and/or under bf16 autocast")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine()}, load average {os.getloadavg()[0]:.1f}")
    sample_kw = dict(cfg=args.cfg, cfg_schedule="linear", flow_steps=args.flow_steps, sampler=args.sampler)
    rows = []

    for backbone in () if args.skip_small else ("mar", "flowar", "causal"):
        system = build(backbone, "small", args.device)
        steps = args.ar_steps if backbone == "mar" else None
        ips = images_per_s(system, args.batch, steps=steps, **sample_kw)
        ar_steps = args.ar_steps if backbone == "mar" else len(system.core.sizes)
        rows.append(dict(table="generators", preset="small", backbone=backbone, batch=args.batch, ar_steps=ar_steps,
                         flow_steps=args.flow_steps, params=parameter_count(system),
                         head_params=parameter_count(system.head), images_per_s=ips))  # fmt: skip
    print_table([r for r in rows if r["table"] == "generators"], "images/s per generator (fp32, CFG, small preset)")

    system = build("mar", "small", args.device) if not args.skip_small else None
    for batch in [] if args.skip_small else args.fraction_batches:
        seconds, frac = head_fraction(system, batch, steps=args.fraction_ar_steps, **sample_kw)
        rows.append(dict(table="head_fraction", preset="small", backbone="mar", batch=batch,
                         ar_steps=args.fraction_ar_steps, flow_steps=args.flow_steps, seconds=seconds,
                         head_fraction=frac))  # fmt: skip
    print_table([r for r in rows if r["table"] == "head_fraction"], "fraction of MAR sampling time in the flow head")

    if args.mar_b:
        system = build("mar", args.mar_b_preset, args.device)
        total, head = parameter_count(system), parameter_count(system.head)
        print(f"\nMAR-B preset: {total:,} parameters (MAR-B: {MAR_B_PARAMS:,}), head {head:,} (MAR-B's diffusion "
              f"head: {MAR_B_HEAD_PARAMS:,}; ours predicts a velocity, not a learned variance too)")  # fmt: skip
        for precision, ar_steps, flow_steps in itertools.product(
            args.mar_b_precisions, args.mar_b_ar_steps, args.mar_b_flow_steps
        ):
            kw = {**sample_kw, "flow_steps": flow_steps}
            with precision_context(precision, args.device):  # the head's time, loss and ODE updates stay fp32
                seconds, frac = head_fraction(system, 2, steps=ar_steps, **kw)
            rows.append(dict(table="mar_b", preset=args.mar_b_preset, backbone="mar", precision=precision, batch=2,
                             ar_steps=ar_steps, sampler=args.sampler, flow_steps=flow_steps, params=total,
                             head_params=head, images_per_s=2 / seconds,
                             vs_anchor=2 / seconds / MAR_ANCHOR_IMAGES_PER_S, head_fraction=frac))  # fmt: skip
        print_table([r for r in rows if r["table"] == "mar_b"],
                    f"MAR-B size, batch 2, CFG {args.cfg} linear, load average {os.getloadavg()[0]:.1f} "
                    f"(anchor: MAR-B {MAR_ANCHOR_IMAGES_PER_S} images/s with 100 diffusion steps)")  # fmt: skip
    if args.json:
        write_json(rows, args.json)
    return rows


if __name__ == "__main__":
    main()
