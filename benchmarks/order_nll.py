"""Teacher-forced NLL by place in the generation order, side by side for any-order checkpoints (RandAR, ARPG, ...):
how well each predicts the first tokens of a random order, when little is known, against the last ones; with the
true class and with the null class (how much the class is used). Real tokens of the validation split, one seeded
random order per image, the same orders for every checkpoint.

    python -m benchmarks.order_nll --ckpt runs/leaderboard/digits/randar/checkpoints/last.ckpt \
        --ckpt runs/leaderboard/digits/arpg/checkpoints/last.ckpt
"""

import argparse

import torch
import torch.nn.functional as F

from benchmarks.common import machine, print_table, write_json
from lit_ar.checkpoints import WrongSystemError, load_system
from lit_ar.data import ImageDataModule
from lit_ar.systems import ARPGSystem, CausalARSystem


def load_any_order(path: str):
    for cls in (ARPGSystem, CausalARSystem):
        try:
            return load_system(path, cls)
        except WrongSystemError:
            continue
    raise ValueError(f"--ckpt {path!r} is neither a CausalARSystem nor an ARPGSystem checkpoint")


def places(L: int) -> list[tuple[int, int]]:
    """Bins of places in the order: the first, then doubling widths (1, 2-3, 4-7, ...) to the last."""
    bins, start, width = [(0, 1)], 1, 3
    while start < L:
        bins.append((start, min(L, start + width)))
        start, width = start + width, 2 * width + 2
    return bins


def nll_rows(systems: dict, images: int, seed: int) -> list[dict]:
    first = next(iter(systems.values()))
    h = first.hparams
    dm = ImageDataModule(dataset="digits" if h.image_size == 32 and h.channels == 1 else "shapes",
                         image_size=h.image_size, channels=h.channels, batch_size=images)  # fmt: skip
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    tokens, labels = first.encode(batch["image"]), batch["label"]  # (B, L)
    order = torch.rand(tokens.shape, generator=torch.Generator().manual_seed(seed)).argsort(-1)
    in_order = tokens.gather(1, order)
    rows = []
    for name, system in systems.items():
        if system.hparams.tokenizer_ckpt != h.tokenizer_ckpt:
            raise ValueError(f"{name}: its tokenizer differs from the first checkpoint's; compare runs on one "
                             "tokenizer")  # fmt: skip
        for which, y in (("class", labels), ("null class", torch.full_like(labels, h.num_classes))):
            with torch.no_grad():
                logits = system.core.logits(system.core.hidden(in_order[:, :-1], y, order))  # (B, L, V)
            nll = F.cross_entropy(logits.flatten(0, 1), in_order.flatten(), reduction="none").view(in_order.shape)
            row = {"checkpoint": name, "label": which}
            row.update({f"places {a}-{b - 1}" if b - a > 1 else f"place {a}": round(nll[:, a:b].mean().item(), 3)
                        for a, b in places(tokens.shape[1])})  # fmt: skip
            row["all"] = round(nll.mean().item(), 3)
            rows.append(row)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", action="append", required=True, help="an any-order checkpoint (repeat to compare)")
    p.add_argument("--images", type=int, default=128, help="validation images")
    p.add_argument("--seed", type=int, default=0, help="seed of the random orders")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    print(machine())
    systems = {path: load_any_order(path) for path in args.ckpt}
    rows = nll_rows(systems, args.images, args.seed)
    print_table(rows, "teacher-forced NLL (nats) by place in a random generation order")
    if args.json:
        write_json(rows, args.json)


if __name__ == "__main__":
    main()
