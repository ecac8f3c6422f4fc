"""Masked AR (MaskGIT) speed: sampling images/s at 8, 16 and 32 steps against the causal family (LlamaGen, one token
per step with a static KV cache) at the same width, depth, heads, vocabulary and token count; and training tokens/s.

Images/s counts token generation only: both families decode with the same tokenizer, so its cost is left out.
Random weights: speed does not depend on training. Prints a table; --json also writes it.

    python -m benchmarks.masked_ar                                    # CPU size: tiny model, 16x16 tokens
    python -m benchmarks.masked_ar --preset base --batch 64 --train-batch 64 --compile   # MaskGIT-B size, on a GPU
"""

import argparse
import contextlib
import warnings

import torch

from benchmarks.common import machine, print_table, time_call, write_json
from lit_ar.models.masked_ar import PRESETS
from lit_ar.systems.masked_ar import MaskedARSystem


def autocast(device: str, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=dtype)


def params_m(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def causal_system(size: dict, args, device: str):
    """The causal family at the same size, or None when it is not installed (branch not merged yet)."""
    try:
        from lit_ar.systems.causal_ar import CausalARSystem
    except ImportError:
        return None
    system = CausalARSystem(vocab_size=args.vocab, grid_size=args.grid, dim=size["dim"], depth=size["depth"],
                            n_heads=size["n_heads"], num_classes=args.num_classes, token_dropout=0.0, resid_dropout=0.0,
                            compile=args.compile)  # fmt: skip
    system.configure_model()  # `compile` applies here, as the Trainer's hook does
    return system.to(device)


def train_tokens_per_s(system, batch: int, args, device: str, dtype: torch.dtype) -> float:
    """Forward, backward and AdamW step on random tokens; tokens/s = batch * L / seconds per step."""
    L = args.grid**2
    opt = system.make_optimizer()
    g = torch.Generator(device=device).manual_seed(0)
    data = {"tokens": torch.randint(0, args.vocab, (batch, L), generator=g, device=device),
            "label": torch.randint(0, args.num_classes, (batch,), generator=g, device=device)}  # fmt: skip
    system.train()

    def step():
        with autocast(device, dtype):
            loss = system.training_step(data, 0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = time_call(step, warmup=2 if args.compile else 1, repeat=args.repeat)
    return batch * L / seconds


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=tuple(PRESETS))
    p.add_argument("--dim", type=int, help="override the preset's width")
    p.add_argument("--depth", type=int, help="override the preset's depth")
    p.add_argument("--n-heads", type=int, help="override the preset's heads")
    p.add_argument("--grid", type=int, default=16, help="token grid side (16: ImageNet-256 token count)")
    p.add_argument("--vocab", type=int, default=1024, help="codebook size (MaskGIT: 1024)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--batch", type=int, default=8, help="images sampled at once")
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--steps", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--cfg", type=float, default=1.0, help="guidance scale (!= 1 doubles the batch in both families)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="compile the blocks (and the causal decode step)")
    p.add_argument("--no-causal", action="store_true", help="skip the causal family")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message="You are trying to `self.log")  # training_step without a Trainer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    size = {**PRESETS[args.preset], **{k: v for k, v in
            dict(dim=args.dim, depth=args.depth, n_heads=args.n_heads).items() if v is not None}}  # fmt: skip
    torch.manual_seed(0)
    masked = MaskedARSystem(vocab_size=args.vocab, grid_size=args.grid, num_classes=args.num_classes, dropout=0.0,
                            compile=args.compile, **{"preset": args.preset, **size}).to(device)  # fmt: skip
    masked.configure_model()  # `compile` applies here, as the Trainer's hook does
    causal = None if args.no_causal else causal_system(size, args, device)
    L, B = args.grid**2, args.batch
    labels = torch.arange(B, device=device) % args.num_classes
    print(
        f"machine: {machine()}; dtype {dtype}; {L} tokens, vocab {args.vocab}, size {size}, batch {B}, cfg {args.cfg}"
    )

    rows = []
    for steps in args.steps:
        if steps > L:
            continue

        def run(steps=steps):
            g = torch.Generator(device=device).manual_seed(0)
            with autocast(device, dtype):
                masked.generate(labels, cfg=args.cfg, steps=steps, generator=g)

        seconds = time_call(run, warmup=1, repeat=args.repeat)
        rows.append({"family": "masked", "steps": steps, "forwards": steps, "params_M": params_m(masked.model),
                     "images/s": B / seconds, "ms/image": 1000 * seconds / B})  # fmt: skip
    if causal is not None:

        def run_causal():
            g = torch.Generator(device=device).manual_seed(0)
            with autocast(device, dtype):
                causal.generate(labels, cfg=args.cfg, generator=g)

        seconds = time_call(run_causal, warmup=1, repeat=args.repeat)
        rows.append({"family": "causal (KV cache)", "steps": L, "forwards": L, "params_M": params_m(causal.model),
                     "images/s": B / seconds, "ms/image": 1000 * seconds / B})  # fmt: skip
    else:
        print("causal family not installed (lit_ar.systems.causal_ar missing or --no-causal): masked alone")
    base = next((r["images/s"] for r in rows if r["family"].startswith("causal")), None)
    for r in rows:
        r["x causal"] = r["images/s"] / base if base else ""
    print_table(rows, f"Sampling ({B} images, token generation only)")

    train_rows = [{"family": "masked", "batch": args.train_batch,
                   "tokens/s": train_tokens_per_s(masked, args.train_batch, args, device, dtype)}]  # fmt: skip
    if causal is not None:
        train_rows.append({"family": "causal", "batch": args.train_batch,
                           "tokens/s": train_tokens_per_s(causal, args.train_batch, args, device, dtype)})  # fmt: skip
    print_table(train_rows, "Training (forward + backward + AdamW step)")
    if args.json:
        write_json(rows + train_rows, args.json, args=vars(args))
    return rows + train_rows


if __name__ == "__main__":
    main()
