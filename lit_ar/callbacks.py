"""Callbacks that put pictures in TensorBoard: real-image grids, reconstructions, samples."""

import math

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger


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
