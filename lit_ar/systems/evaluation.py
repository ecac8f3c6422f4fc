"""NpzEvaluator: `lit_ar test` on an npz of uint8 samples (from lit_ar or any other codebase) against a reference.

    lit_ar test --config configs/eval/npz_shapes.yaml --model.init_args.samples_npz samples.npz

The reference is one split of the configured data (`data:`), in the configured extractor's features, cached in
`reference_dir`. Metrics are logged as `test/fid`, ... and written with the protocol to a JSON record.
"""

import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch

from lit_ar.evaluation import Evaluator, ReferenceSplit
from lit_ar.metrics import ExtractorKind, check_extractor_path, file_sha256


class NpzArray:
    """One array of an .npz (compressed or not), read in row ranges without loading the rest; no pickles.

    A 50k x 256 x 256 x 3 archive is 10 GB: no rank loads it whole.
    """

    def __init__(self, path: str, key: str):
        self.path, self.key = path, key
        with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            fmt = np.lib.format
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            self.offset = f.tell()
        if fortran or dtype.hasobject:
            raise ValueError(f"{path}: array {key!r} is Fortran-ordered or holds Python objects; save a plain array")
        self.shape, self.dtype = tuple(shape), dtype
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize

    @staticmethod
    def keys(path: str) -> list[str]:
        with zipfile.ZipFile(path) as zf:
            return [n.removesuffix(".npy") for n in zf.namelist()]

    def read(self, start: int, end: int) -> np.ndarray:
        return next(self.read_ranges([(start, end)]))

    def read_ranges(self, ranges: Iterable[tuple[int, int]]) -> Iterator[np.ndarray]:
        """Rows [start, end) for each range, in increasing order, through one open stream: a compressed member is
        decompressed once in all, not once per range."""
        with zipfile.ZipFile(self.path) as zf, zf.open(f"{self.key}.npy") as f:
            for start, end in ranges:
                f.seek(self.offset + start * self.row_bytes)  # forward: skips ahead without rewinding
                data = f.read((end - start) * self.row_bytes)
                yield np.frombuffer(data, dtype=self.dtype).reshape(end - start, *self.shape[1:])


def open_samples_npz(path: str, image_size: int, channels: int, setting: str) -> tuple[NpzArray, NpzArray | None]:
    """Check an npz of samples (`images` (N, H, W, C) uint8, optional `labels` (N,); or ADM's `arr_0`/`arr_1`)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{setting}={path!r}: no such file")
    keys = NpzArray.keys(path)
    image_key, label_key = ("images", "labels") if "images" in keys else ("arr_0", "arr_1")
    if image_key not in keys:
        raise ValueError(f"{setting}={path!r} has no `images` array (nor ADM's `arr_0`); it has {keys}")
    images = NpzArray(path, image_key)
    n, *hwc = images.shape
    if images.dtype != np.uint8 or len(hwc) != 3 or hwc[2] not in (1, 3):
        raise ValueError(
            f"{setting}={path!r}: `{image_key}` must be (N, H, W, C) uint8 with C 1 or 3, got {images.shape} "
            f"{images.dtype}"
        )
    if hwc[0] != image_size or hwc[1] != image_size or hwc[2] != channels:
        raise ValueError(
            f"{setting}={path!r} holds {hwc[0]}x{hwc[1]}x{hwc[2]} images but the data (the reference) is "
            f"{image_size}x{image_size}x{channels}: set data.image_size={hwc[0]} and data.channels={hwc[2]}"
        )
    labels = NpzArray(path, label_key) if label_key in keys else None
    if labels is not None and (labels.shape != (n,) or labels.dtype.kind not in "iu"):
        raise ValueError(
            f"{setting}={path!r}: `{label_key}` must be ({n},) integers, got {labels.shape} {labels.dtype}"
        )
    return images, labels


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

    def setup(self, stage: str) -> None:
        if stage == "test":
            # the test split only drives the loop: one batch of it, whatever the config says
            self.trainer.limit_test_batches = 1

    def on_test_start(self) -> None:
        # every check (extractor, sample count, resolution, reference identity) before any features are computed
        self.evaluator.prepare(self.trainer, self, self.images.shape[0], "model.init_args.samples_npz")

    def test_step(self, batch, batch_idx: int) -> None:
        """Nothing per batch: the work is in `on_test_epoch_end` (one test batch drives the loop: see `setup`)."""

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
