"""The cost of a causal transformer's head and loss in training: final RMSNorm, output layer and cross-entropy over
the (B, L, V) logits, forward and backward, at a preset's width and vocabulary, in two forms:

- `eager`: what a system without `compile` runs (`lit_ar.systems.generator.head_cross_entropy`);
- `compiled`: what it runs with `compile: true` (`compiled_head_cross_entropy`: the head and the loss as one graph).

Milliseconds per forward + backward, the median of `--repeat`; prints a table, --json also writes it.

    python -m benchmarks.head_loss                           # GPT-B, batch 8 x 256 tokens, fp32 and bf16 autocast
    python -m benchmarks.head_loss --presets GPT-B GPT-L --batch 64 --json runs/bench/head_loss_gpu.json  # on a GPU
"""

import argparse

import torch

from benchmarks.common import machine, precision_context, print_table, time_call, write_json
from lit_ar.models.categorical_head import compiled_head_cross_entropy, head_cross_entropy
from lit_ar.models.causal_ar import PRESETS, CausalTransformer

FORMS = {"eager": lambda: head_cross_entropy, "compiled": compiled_head_cross_entropy}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["GPT-B"], choices=sorted(PRESETS))
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16-autocast"], choices=["fp32", "bf16-autocast"])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for preset in args.presets:
        torch.manual_seed(0)
        # one layer: only the head is timed, and its shapes do not depend on the depth
        model = CausalTransformer(args.vocab, args.grid, 1000, **{**PRESETS[preset], "depth": 1}).to(device)
        torch.nn.init.normal_(model.output.weight, std=0.02)  # not the zero init, so the loss is not uniform
        L = args.grid**2
        hidden = torch.randn(args.batch, L, model.dim, device=device)  # (B, L, C): the last layer's states
        targets = torch.randint(0, args.vocab, (args.batch, L), device=device)  # (B, L)
        for precision in args.precisions:
            for form, make in FORMS.items():
                loss_fn = make()

                def step(loss_fn=loss_fn, precision=precision):
                    h = hidden.detach().requires_grad_()
                    with precision_context(precision, device):
                        loss = loss_fn(model, h, targets)
                    loss.backward()
                    model.zero_grad(set_to_none=True)

                seconds = time_call(step, warmup=2, repeat=args.repeat)
                rows.append({"preset": preset, "width": model.dim, "vocab": args.vocab, "tokens": f"{args.batch} x {L}",
                             "precision": precision, "form": form, "ms": 1000 * seconds})  # fmt: skip
    print_table(rows, f"head + cross-entropy, forward and backward, {machine()}")
    if args.json:
        write_json(rows, args.json, args=vars(args))
    return rows


if __name__ == "__main__":
    main()
