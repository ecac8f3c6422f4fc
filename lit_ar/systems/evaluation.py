"""NpzEvaluator: `lit_ar test` on an npz of uint8 samples (from lit_ar or any other codebase) against a reference.

    lit_ar test --config configs/eval/npz_shapes.yaml --model.init_args.samples_npz samples.npz

The reference is one split of the configured data (`data:`), in the configured extractor's features, cached in
`reference_dir`. Metrics are logged as `test/fid`, ... and written with the protocol to a JSON record.
"""

from pathlib import Path

import lightning as L
import torch

from lit_ar.evaluation import Evaluator, ReferenceSplit, open_samples_npz
from lit_ar.metrics import ExtractorKind, check_extractor_path, file_sha256


class NpzEvaluator(L.LightningModule):
    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 64,
        channels: int = 3,
        samples_npz: str | None = None,
        extractor: ExtractorKind = "classifier",
        extractor_ckpt: str | None = None,
        reference_split: ReferenceSplit = "train",
        reference_path: str | None = None,
        reference_dir: str = "runs/references",
        reference_max_images: int | None = None,
        eval_batch_size: int = 64,
        pr_k: int = 3,
        pr_num_samples: int = 10000,
        force: bool = False,
        record_path: str | None = None,
    ):
        """
        Args:
            num_classes: Number of classes (linked from `data.num_classes`).
            image_size: Image side (linked from `data.image_size`); the samples must have it.
            channels: Image channels (linked from `data.channels`); the samples must have them.
            samples_npz: The samples: an .npz with `images` (N, H, W, C) uint8 and optionally `labels` (N,) (the
                classes they were asked for: class accuracy); ADM's `arr_0`/`arr_1` layout is read too.
            extractor: Feature space: `classifier` (a lit_ar ClassifierSystem checkpoint) or `inception` (the
                standard FID InceptionV3 weights file).
            extractor_ckpt: Path of the classifier checkpoint or of pt_inception-2015-12-05-6726825d.pth.
            reference_split: The data split whose statistics are the reference: `train` or `validation`.
            reference_path: A reference statistics file; computed there if missing, refused if made for another
                dataset, split, resolution or extractor. Null: an automatically named file in `reference_dir`.
            reference_dir: Cache folder of reference statistics.
            reference_max_images: Use a seeded random subset of this many reference images (null: the whole split).
            eval_batch_size: Images per feature-extraction batch per device (the data's `batch_size` is unused).
            pr_k: k of the k-NN precision and recall (Kynkaanniemi et al. 2019).
            pr_num_samples: Samples (each side) for precision/recall, a seeded subset.
            force: Compute FID even with fewer samples than feature dimensions (ill-conditioned).
            record_path: Where the JSON record goes; null: `evaluation.json` in the run folder.
        """
        super().__init__()
        self.save_hyperparameters()
        if samples_npz is None:
            raise ValueError("model.init_args.samples_npz is not set: give the .npz of uint8 samples to evaluate")
        self.images, labels = open_samples_npz(samples_npz, image_size, channels, "model.init_args.samples_npz")
        self.labels = None if labels is None else torch.from_numpy(labels.read(0, labels.shape[0]).astype("int64"))
        if self.labels is not None and not bool(((self.labels >= 0) & (self.labels < num_classes)).all()):
            raise ValueError(
                f"model.init_args.samples_npz={samples_npz!r} has labels outside [0, {num_classes}) "
                f"(data.num_classes={num_classes}): {sorted(set(self.labels.tolist()))[:20]}"
            )
        check_extractor_path(extractor, extractor_ckpt, "model.init_args.extractor_ckpt")
        self.evaluator = Evaluator(
            extractor, extractor_ckpt, eval_batch_size, reference_split, reference_path, reference_dir,
            reference_max_images, pr_k, pr_num_samples, force, record_path, setting_prefix="model.init_args.",
        )  # fmt: skip
        self.last_record = None

    def on_test_start(self) -> None:
        # every check (extractor, sample count, resolution, reference identity) before any features are computed
        self.evaluator.prepare(self.trainer, self, self.images.shape[0], "model.init_args.samples_npz")

    def test_step(self, batch, batch_idx: int) -> None:
        """Nothing per batch: the work is in `on_test_epoch_end` (configs set `trainer.limit_test_batches: 1`)."""

    def _batches(self):
        ranges = self.evaluator._my_batches(self.trainer, self.images.shape[0])
        for (start, end), array in zip(ranges, self.images.read_ranges(ranges)):
            images = torch.from_numpy(array.copy()).permute(0, 3, 1, 2).contiguous()  # (B, C, H, W) uint8
            labels = None if self.labels is None else self.labels[start:end]
            yield start, images.float() / 127.5 - 1.0, labels

    def on_test_epoch_end(self) -> None:
        ev, h = self.evaluator, self.hparams
        fake = ev.collect(self.trainer, self, self.images.shape[0], self._batches())
        metrics = ev.metrics(fake, h.num_classes)
        ev.log(self, metrics, "test")
        labels = fake["labels"]
        counts = torch.bincount(labels[labels >= 0].cpu()) if self.labels is not None else None
        self.last_record = ev.record(
            self.trainer, metrics, fake,
            samples={"source": "npz", "path": str(Path(h.samples_npz)), "sha256": file_sha256(h.samples_npz)},
            sampling={"batch_size": h.eval_batch_size},
            protocol={"per_class": None, "num_classes": h.num_classes,
                      "class_balanced": counts is not None and bool((counts == counts[0]).all())
                      and len(counts) == h.num_classes},
            seed=None,
        )  # fmt: skip
