"""The README's figure: samples of every finished row of a leaderboard folder, side by side, a row per class.

    python -m benchmarks.samples_figure --runs runs/leaderboard/digits --out docs/figures/digits_samples.png

Each row's checkpoint samples `--per_class` images of every class through `lit_ar predict` with its own configs,
arguments and `predict_kwargs` (as the leaderboard evaluated it), seeded; the panels are put side by side under the
methods' names.
"""

import argparse
import json
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from lit_ar.cli import cli_main

ORDER = ["LlamaGen", "RAR", "MaskGIT", "VAR", "MAR", "MAR (DDPM head)", "FlowAR", "causal+flow"]


def method_panel(row: dict, per_class: int, work: Path) -> Image.Image:
    """`per_class` samples of every class of one leaderboard row, one row per class (SampleWriter's grid.png)."""
    args = ["predict", *[a for c in row["configs"] for a in ("--config", c)], *row["args"],
            "--ckpt_path", row["checkpoint"], "--data.predict_per_class", str(per_class),
            "--trainer.logger.init_args.save_dir", str(work), "--trainer.enable_progress_bar", "false",
            "--trainer.callbacks", "lit_ar.callbacks.SampleWriter",
            "--trainer.callbacks.grid_images", str(per_class * 10)]  # fmt: skip
    cli_main(args)
    return Image.open(work / "grid.png").convert("RGB")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs/leaderboard/digits", help="a leaderboard output folder")
    parser.add_argument("--out", default="docs/figures/digits_samples.png")
    parser.add_argument("--per_class", type=int, default=4)
    parser.add_argument("--methods", nargs="*", help="rows to show (default: every finished row)")
    args = parser.parse_args(argv)
    rows = {r["method"]: r for r in (json.loads(p.read_text()) for p in Path(args.runs).glob("*/leaderboard_row.json"))}
    names = [n for n in ORDER + sorted(set(rows) - set(ORDER)) if n in rows and (not args.methods or n in args.methods)]
    panels = []
    for name in names:
        with tempfile.TemporaryDirectory() as work:
            panels.append((name, method_panel(rows[name], args.per_class, Path(work))))
    gap, title = 8, 16
    width = sum(p.width for _, p in panels) + gap * (len(panels) - 1)
    figure = Image.new("RGB", (width, title + max(p.height for _, p in panels)), "white")
    draw, x = ImageDraw.Draw(figure), 0
    for name, panel in panels:
        figure.paste(panel, (x, title))
        draw.text((x + 2, 2), name, fill="black")
        x += panel.width + gap
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    grey = figure.convert("L")
    if grey.convert("RGB").tobytes() == figure.tobytes():  # grey data (digits): a third of the file
        figure = grey
    figure.save(args.out, optimize=True)
    print(f"{args.out}: {', '.join(names)} ({figure.width}x{figure.height})")


if __name__ == "__main__":
    main()
