"""Tokenizer quality and speed on `shapes` 64x64 at 4x downsampling (16x16 tokens), one row per quantizer.

Trains each `configs/tokenizer/<q>_shapes.yaml` through the real CLI within a wall-time budget, then measures on
the validation images: PSNR, SSIM, codebook usage (fraction of codes the validation set uses), training wall
time and encode+decode throughput (images/s, batch 64, eval mode).

    python -m benchmarks.tokenizer_quality                       # all quantizers, the configs' full schedules
    python -m benchmarks.tokenizer_quality --quantizers vq fsq --max_steps 300 --max_minutes 5   # a shortened run
Targets (issue 3): vq, fsq and msvq >= 28 dB PSNR and >= 90% usage within 20 CPU-minutes.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lit_ar.cli import cli_main  # noqa: E402
from lit_ar.data import ImageDataModule  # noqa: E402
from lit_ar.metrics import psnr, ssim  # noqa: E402
from lit_ar.tokenizers import load_tokenizer  # noqa: E402


@torch.no_grad()
def evaluate(autoencoder, images: torch.Tensor, batch_size: int = 64) -> dict:
    p, s, counts = [], [], torch.zeros(autoencoder.vocab_size or 1)
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size]
        tokens = autoencoder.encode(x, sample=False)
        rec = autoencoder.decode(tokens)
        p.append(psnr(rec, x))
        s.append(ssim(rec, x))
        if autoencoder.vocab_size is not None:
            flat = torch.cat([t.flatten() for t in tokens]) if isinstance(tokens, list) else tokens.flatten()
            counts += torch.bincount(flat, minlength=autoencoder.vocab_size).float()
    x = images[:batch_size]
    autoencoder.decode(autoencoder.encode(x, sample=False))  # warm-up
    start, reps = time.perf_counter(), 3
    for _ in range(reps):
        autoencoder.decode(autoencoder.encode(x, sample=False))
    throughput = reps * len(x) / (time.perf_counter() - start)
    usage = float((counts > 0).float().mean()) if autoencoder.vocab_size is not None else float("nan")
    return {"psnr": float(torch.cat(p).mean()), "ssim": float(torch.cat(s).mean()), "usage": usage,
            "img_per_s": throughput}  # fmt: skip


def logged_steps_and_wall_time(run_dir: Path) -> tuple[int, float]:
    """A finished run's last step and the wall time between its first and last logged training loss."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir)).Reload().Scalars("train/rec_loss")
    return events[-1].step + 1, events[-1].wall_time - events[0].wall_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quantizers", nargs="+", default=["vq", "fsq", "lfq", "msvq", "kl"])
    parser.add_argument("--max_minutes", type=float, default=20.0, help="training wall-time budget per quantizer")
    parser.add_argument("--max_steps", type=int, default=None, help="override the configs' schedule length")
    parser.add_argument("--num_val", type=int, default=500)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--run_dir", default=None, help="where runs go (default: a temporary folder)")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="evaluate runs already in run_dir (steps and wall time read from their logs)",
    )
    parser.add_argument("extra", nargs="*", help="extra CLI overrides passed to every run, after a `--`")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run_root = Path(args.run_dir or tempfile.mkdtemp(prefix="lit_ar_bench_tok_"))
    dm = ImageDataModule(dataset="shapes", image_size=64, num_val=args.num_val)
    dm.setup("validate")
    images = torch.stack([dm.val_set[i]["image"] for i in range(len(dm.val_set))])  # (N, 3, 64, 64)
    rows = []
    for q in args.quantizers:
        run_dir = run_root / q
        minutes, seconds = divmod(round(args.max_minutes * 60), 60)
        max_time = f"00:{minutes // 60:02d}:{minutes % 60:02d}:{seconds:02d}"  # DD:HH:MM:SS
        overrides = ["--trainer.logger.init_args.save_dir", str(run_dir), "--trainer.enable_progress_bar", "false",
                     "--trainer.max_time", max_time]  # fmt: skip
        if args.max_steps:
            overrides += ["--trainer.max_steps", str(args.max_steps)]
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        if args.reuse and ckpt.is_file():
            steps, wall = logged_steps_and_wall_time(run_dir)
        else:
            start = time.perf_counter()
            config = str(REPO / f"configs/tokenizer/{q}_shapes.yaml")
            cli = cli_main(["fit", "--config", config, *overrides, *args.extra])
            steps, wall = cli.trainer.global_step, time.perf_counter() - start
        autoencoder = load_tokenizer(str(ckpt))
        row = {"quantizer": q, "steps": steps, "train_min": wall / 60}
        row.update(evaluate(autoencoder, images))
        rows.append(row)
        print(row, flush=True)
    print(f"\nshapes 64x64, 4x downsampling (16x16 tokens), {len(images)} validation images, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.1f}")  # fmt: skip
    print("| quantizer | steps | train min | val PSNR (dB) | val SSIM | codebook usage | enc+dec img/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        usage = "n/a (continuous)" if r["usage"] != r["usage"] else f"{r['usage']:.1%}"
        print(f"| {r['quantizer']} | {r['steps']} | {r['train_min']:.1f} | {r['psnr']:.2f} | {r['ssim']:.3f} | "
              f"{usage} | {r['img_per_s']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
