"""Callbacks that put pictures in TensorBoard: real-image grids, reconstructions, samples."""

import math
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> one (3, H', W') uint8 grid image; `nrow` images per row."""
    images = images.detach().float().cpu().clamp(-1, 1)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    b, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    ncol = math.ceil(b / nrow)
    grid = torch.ones(c, ncol * (h + padding) + padding, nrow * (w + padding) + padding)  # white gutters
    for i in range(b):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top : top + h, left : left + w] = images[i]
    return ((grid + 1) * 127.5).round().to(torch.uint8)


def log_image_grid(trainer: L.Trainer, tag: str, images: torch.Tensor, nrow: int | None = None) -> None:
    """Write a grid to every TensorBoard logger of the trainer (no-op without one)."""
    grid = make_grid(images, nrow)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, grid, global_step=trainer.global_step)


class RealImageGrid(L.Callback):
    """Logs a grid of real training images once, at the start of fit: a check of what the model is fed."""

    def __init__(self, num_images: int = 64):
        self.num_images = num_images

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and trainer.datamodule is not None:
            dataset = trainer.datamodule.train_set
            n = min(self.num_images, len(dataset))
            images = torch.stack([dataset[i]["image"] for i in range(n)])
            log_image_grid(trainer, "data/real_images", images)


class SampleGrid(L.Callback):
    """Every `every_n_steps` training steps, samples `per_class` images of the first `num_classes_shown` classes
    from fixed labels and a fixed seed, and logs the grid as `samples/grid` (the same noise every time, so the
    grids show the model improving, not the noise changing)."""

    def __init__(self, every_n_steps: int = 500, num_classes_shown: int = 10, per_class: int = 4, seed: int = 0,
                 sample_kwargs: dict | None = None):  # fmt: skip
        self.every_n_steps, self.num_classes_shown, self.per_class = every_n_steps, num_classes_shown, per_class
        self.seed, self.sample_kwargs = seed, sample_kwargs or {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every_n_steps or not trainer.is_global_zero:
            return
        n = min(self.num_classes_shown, pl_module.hparams.num_classes)
        labels = torch.arange(n, device=pl_module.device).repeat_interleave(self.per_class)  # (n * per_class,)
        g = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            images = pl_module.sample(labels, generator=g, **self.sample_kwargs)
        pl_module.train(was_training)
        log_image_grid(trainer, "samples/grid", images, nrow=self.per_class * 2)


class SampleWriter(BasePredictionWriter):
    """Writes `lit_ar predict` samples: `samples.npz` (images (N, H, W, C) uint8, labels (N,), in global index
    order, the format evaluators read) and `grid.png`, in `output_dir` (default: the run folder)."""

    def __init__(self, output_dir: str | None = None, grid_images: int = 64):
        super().__init__(write_interval="epoch")
        self.output_dir, self.grid_images = output_dir, grid_images

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        parts = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        local = {k: torch.cat([p[k] for p in parts]) for k in ("images", "labels", "index")}
        gathered = trainer.strategy.all_gather(local) if trainer.world_size > 1 else local
        if not trainer.is_global_zero:
            return
        flat = {k: v.reshape(-1, *v.shape[2:]) if trainer.world_size > 1 else v for k, v in gathered.items()}
        order = torch.argsort(flat["index"])
        images, labels = flat["images"][order], flat["labels"][order]  # (N, C, H, W) uint8, (N,)
        out = Path(self.output_dir or trainer.log_dir or ".")
        out.mkdir(parents=True, exist_ok=True)
        np.savez(out / "samples.npz", images=images.permute(0, 2, 3, 1).numpy(), labels=labels.numpy())
        grid = make_grid(images[: self.grid_images].float() / 127.5 - 1)
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(out / "grid.png")


class ReconstructionGrid(L.Callback):
    """Logs originals next to their reconstructions (`val/reconstructions`: pairs of columns) after each validation
    epoch, for a fixed set of validation images. The module must have `reconstruct(images) -> images`."""

    def __init__(self, num_images: int = 16):
        self.num_images = num_images

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking or trainer.datamodule is None:
            return
        dataset = trainer.datamodule.val_set
        n = min(self.num_images, len(dataset))
        images = torch.stack([dataset[i]["image"] for i in range(n)]).to(pl_module.device)  # (n, C, H, W)
        recs = pl_module.reconstruct(images)
        pairs = torch.stack([images, recs.to(images.dtype)], dim=1).flatten(0, 1)  # (2n, C, H, W): original, rec
        log_image_grid(trainer, "val/reconstructions", pairs, nrow=2 * math.ceil(math.sqrt(n)))
