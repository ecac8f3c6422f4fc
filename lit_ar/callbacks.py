"""Callbacks that put pictures in the run's loggers (real-image grids, reconstructions, samples; through
`lit_ar.loggers.log_image`: TensorBoard, W&B, MLflow, CSV), write `lit_ar predict`'s samples, measure FID during
training and images/s and tokens/s (`ImageThroughput`)."""

import math
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, ThroughputMonitor, WeightAveraging
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image

from lit_ar.evaluation import GeneratorEvaluator
from lit_ar.loggers import log_image


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
    """Write a grid of (B, C, H, W) images in [-1, 1] to every logger of the trainer (none: nothing)."""
    log_image(trainer, tag, make_grid(images, nrow))


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
    grids show the model improving, not the noise changing). `sample_kwargs` null samples with the generator's
    `predict_kwargs`, so a config states its sampling once; a mapping is checked against the generator's typed
    settings when training starts."""

    def __init__(self, every_n_steps: int = 500, num_classes_shown: int = 10, per_class: int = 4, seed: int = 0,
                 sample_kwargs: dict | None = None):  # fmt: skip
        self.every_n_steps, self.num_classes_shown, self.per_class = every_n_steps, num_classes_shown, per_class
        self.seed, self.sample_kwargs = seed, sample_kwargs

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.sample_kwargs is None:
            self.sample_kwargs = dict(pl_module.hparams.get("predict_kwargs") or {})
        if hasattr(pl_module, "sampling_settings"):  # a misspelt key fails now, not at the first grid
            pl_module.sampling_settings(self.sample_kwargs, "SampleGrid.sample_kwargs")

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
    order, the format evaluators read) and `grid.png` (one row per class, `grid_images` images in all: the first of
    each class), in `output_dir` (default: the run folder), and sends the grid to the loggers as `predict/grid`."""

    def __init__(self, output_dir: str | None = None, grid_images: int = 100):
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
        shown, per_row = self.grid_rows(labels)
        grid = make_grid(images[shown].float() / 127.5 - 1, nrow=per_row)
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(out / "grid.png")
        log_image(trainer, "predict/grid", grid)
        rank_zero_info(f"samples: {out / 'samples.npz'} ({len(labels)} images); grid of {len(shown)}, a row per "
                       f"class: {out / 'grid.png'}")  # fmt: skip

    def grid_rows(self, labels: torch.Tensor) -> tuple[torch.Tensor, int | None]:
        """Indices of the grid's images (the first `grid_images // classes` of each class, class by class) and the
        images per row (None: a square grid, for samples of one class or of an unconditional model)."""
        classes = labels.unique()
        if len(classes) == 1:
            return torch.arange(min(len(labels), self.grid_images)), None
        per_row = max(1, self.grid_images // len(classes))
        shown = [torch.nonzero(labels == c).flatten()[:per_row] for c in classes]
        return torch.cat(shown)[: self.grid_images], per_row


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


class FIDCallback(L.Callback):
    """FID (and precision, recall, class accuracy) of `pl_module.sample` every N training steps, logged as `val/fid`.

    Samples are class-balanced and seeded as in `lit_ar.evaluation.GeneratorEvaluator`, so the curve compares like
    with like. When a `WeightAveraging` callback (e.g. Lightning's `EMAWeightAveraging`) is active, its averaged
    weights are swapped in for sampling and swapped back after, as Lightning itself does for validation. The
    metrics also land in `trainer.callback_metrics`, so `ModelCheckpoint(monitor="val/fid", mode="min")` works.
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        extractor: str = "classifier",
        extractor_ckpt: str | None = None,
        per_class: int | None = 10,
        num_samples: int | None = None,
        seed: int = 0,
        batch_size: int = 64,
        sampling: dict | None = None,
        reference_split: str = "train",
        reference_dir: str = "runs/references",
        reference_max_images: int | None = None,
        pr_num_samples: int = 10000,
        force: bool = False,
        use_averaged_weights: bool = True,
    ):
        """
        Args:
            every_n_steps: Evaluate after every this many optimizer steps.
            extractor: `classifier` (a lit_ar ClassifierSystem checkpoint) or `inception` (FID InceptionV3 weights).
            extractor_ckpt: Path of the classifier checkpoint or of pt_inception-2015-12-05-6726825d.pth.
            per_class: Samples of every class (class-balanced) for a conditional model.
            num_samples: Number of samples of an unconditional model; set per_class to null then.
            seed: Seed of the labels and of every batch's generator (the same samples' noise at every evaluation).
            batch_size: Samples per generation batch per device.
            sampling: Keyword arguments of the generator's `sample` (e.g. `{cfg: 1.5}`); null: the generator's
                `predict_kwargs`.
            reference_split: The data split whose statistics are the reference: `train` or `validation`.
            reference_dir: Cache folder of reference statistics.
            reference_max_images: Use a seeded random subset of this many reference images (null: the whole split).
            pr_num_samples: Samples (each side) for precision/recall.
            force: Compute FID even with fewer samples than feature dimensions (then only a trend, not a figure
                comparable with others).
            use_averaged_weights: Sample with the weights of an active WeightAveraging (EMA) callback.
        """
        if every_n_steps < 1:
            raise ValueError(f"FIDCallback.every_n_steps={every_n_steps} must be at least 1")
        self.every_n_steps, self.use_averaged_weights = every_n_steps, use_averaged_weights
        self.evaluator = GeneratorEvaluator(
            extractor, extractor_ckpt, per_class, num_samples, seed, batch_size, sampling, reference_split,
            reference_dir=reference_dir, reference_max_images=reference_max_images, pr_num_samples=pr_num_samples,
            force=force, setting_prefix="FIDCallback.",
        )  # fmt: skip
        self._last_step = -1
        self.history: list[tuple[int, dict]] = []  # (global step, metrics) of every evaluation on this process

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.evaluator.sampling is None:  # null: the generator's own sampling settings, as `lit_ar test` uses
            self.evaluator.sampling = dict(pl_module.hparams.get("predict_kwargs") or {})
        self.evaluator.prepare(trainer, pl_module)  # bad settings and the reference: before the first step

    def _averaging_callback(self, trainer: L.Trainer):
        for cb in trainer.callbacks:
            if isinstance(cb, WeightAveraging) and cb._average_model is not None:
                return cb
        return None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or step == self._last_step:  # once per optimizer step
            return
        self._last_step = step
        averaging = self._averaging_callback(trainer) if self.use_averaged_weights else None
        if averaging is not None:
            averaging._swap_models(pl_module)  # private, but the same swap Lightning does around validation
        try:
            metrics = self.evaluator.run(pl_module, stage="", write_record=False)
        finally:
            if averaging is not None:
                averaging._swap_models(pl_module)  # a swap is its own inverse
        values = {f"val/{k}": float(v) for k, v in metrics.items() if v is not None}
        self.history.append((step, values))
        for logger in trainer.loggers:  # direct: `self.log` in a batch hook is dropped off the log_every_n_steps grid
            logger.log_metrics(values, step=step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in values.items()})


class ImageThroughput(ThroughputMonitor):
    """Lightning's ThroughputMonitor for lit_ar's batches: `train/samples_per_sec` is images/s and, for a generator,
    `train/items_per_sec` tokens/s (the tokens of one image, read once from the first batch's tokens), with the
    batches/s and the per-device figures beside them; the same for validation. Lightning's `window_size` (batches
    averaged) and `separator` (`/`: the metrics sit beside `train/loss`) are its settings."""

    def __init__(self, window_size: int = 50, separator: str = "/"):
        super().__init__(batch_size_fn=self.images_in, length_fn=self.tokens_in, window_size=window_size,
                         separator=separator)  # fmt: skip
        self._tokens_per_image: int | None = None
        self._module: L.LightningModule | None = None

    @staticmethod
    def images_in(batch: dict) -> int:
        return len(batch["label"])

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._module = pl_module
        self._module_has_flops = hasattr(pl_module, "flops_per_batch")  # no FLOPs warning for lit_ar's systems
        if stage != "fit" or not hasattr(pl_module, "tokens_from_batch"):  # a tokenizer, a classifier, sampling
            self.length_fn = None

    def tokens_in(self, batch: dict) -> int:
        """The batch's tokens: images x tokens per image (a generator's: `tokens_from_batch`)."""
        if self._tokens_per_image is None:
            # on a forked random state: a tokenizer that samples its posterior (the flow family's) must not move the
            # training's random stream (the golden loss curves, exact resume)
            device = self._module.device
            with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
                tokens = self._module.tokens_from_batch(batch)
            parts = tokens if isinstance(tokens, list | tuple) else [tokens]  # multi-scale: one tensor per scale
            self._tokens_per_image = sum(t.shape[1] for t in parts)  # (B, L) ids or (B, L, D) vectors
        return self.images_in(batch) * self._tokens_per_image
