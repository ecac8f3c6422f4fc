"""The evaluation protocol: class-balanced, seeded, distributed sampling against a cached, identified reference.

Published FIDs are often not reproducible because the protocol is implicit. Here it is fixed:
- **Labels**: exactly `per_class` samples of every class (`balanced_labels`), in an order fixed by `seed`.
- **Seeds**: samples are made in batches of `batch_size` consecutive global indices; batch b is generated with a
  `torch.Generator` seeded from (seed, its first global index). Batches go round-robin to the DDP ranks, so every
  sample is generated in the same batch with the same generator on 1 or N processes: the samples, and so the
  metrics, do not depend on the number of processes (`samples_digest` in the record shows it).
- **8-bit**: every image (sample or reference) is evaluated as the 8-bit image a PNG or npz of it would hold.
- **Gathering**: features are gathered with their global indices and sorted; a gap or duplicate is an error.
- **Reference**: statistics (mean, covariance, a subsample of features for precision/recall, count) of one split
  of the data, at the data's resolution, in one extractor's features; computed once and cached in a file that
  records that identity. A reference with another identity is refused.
- **Record**: a JSON `EvaluationRecord` with everything needed to reproduce the figures.

Entry points: `GeneratorEvaluator` (held by generator systems, run from `on_test_epoch_end`; also behind
`lit_ar.callbacks.FIDCallback`) and `lit_ar.systems.evaluation.NpzEvaluator` (an npz of uint8 samples).
"""

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset
from torchmetrics.utilities.distributed import gather_all_tensors

import lit_ar
from lit_ar.data.transforms import ImageTransform, TransformedDataset
from lit_ar.draws import mix_seed
from lit_ar.metrics import (
    ExtractorKind,
    FeatureExtractor,
    class_accuracy,
    feature_statistics,
    file_sha256,
    frechet_distance,
    inception_score,
    load_extractor,
    precision_recall,
)

ReferenceSplit = Literal["train", "validation"]
GenerateFn = Callable[[torch.Tensor, torch.Generator], torch.Tensor]  # (labels (B,), generator) -> (B, C, H, W)


# ----------------------------------------------------------------------------------------------------------------
# Labels, seeds and the split across ranks


def balanced_labels(num_classes: int, per_class: int, seed: int) -> torch.Tensor:
    """(num_classes * per_class,) long: every class exactly `per_class` times, in an order fixed by `seed`."""
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


def rank_batches(total: int, batch_size: int, rank: int, world_size: int) -> list[tuple[int, int]]:
    """The (start, end) global-index ranges this rank handles: batches of `batch_size`, dealt round-robin."""
    starts = list(range(0, total, batch_size))[rank::world_size]
    return [(s, min(s + batch_size, total)) for s in starts]


def batch_seed(seed: int, start: int) -> int:
    """Seed of the generator of the batch that begins at global index `start` (32 bits: CPU generators use 32)."""
    return mix_seed(seed, start)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_by_index(index: torch.Tensor, total: int, **tensors: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gather per-sample tensors from every rank and order them by global index; gaps or duplicates are an error."""
    if _distributed():
        index = torch.cat(gather_all_tensors(index))
        tensors = {k: torch.cat(gather_all_tensors(v)) for k, v in tensors.items()}
    order = index.argsort()
    if not torch.equal(index[order].cpu(), torch.arange(total)):
        raise RuntimeError(f"evaluation gathered {len(index)} samples, not each of the {total} global indices once")
    return {k: v[order] for k, v in tensors.items()}


def to_8bit(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> float32 in [-1, 1] on the 8-bit grid: what a PNG or an npz of the same sample holds."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def image_digests(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> (B,) int64 fingerprints of the 8-bit images (integer sums: exact, order-free)."""
    q = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.int64).flatten(1)  # (B, C*H*W)
    weights = torch.randint(1, 2**31, (q.shape[1],), generator=torch.Generator().manual_seed(q.shape[1]))
    return (q * weights.to(q.device)).sum(1)


def digest_hex(index_ordered: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the ordered per-sample fingerprints (and labels): equal digests mean the same samples."""
    h = hashlib.sha256()
    for key in sorted(index_ordered):
        h.update(key.encode())
        h.update(index_ordered[key].cpu().to(torch.int64).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Reference statistics


def reference_identity(
    datamodule: L.LightningDataModule, split: str, extractor: str, max_images: int | None, pr_num_samples: int
) -> dict[str, Any]:
    """What a reference is: data source and split, resolution, channels, extractor, subsampling."""
    h = datamodule.hparams
    source = {k: h[k] for k in ("data_dir", "data_files", "hub_config", "image_column", "label_column")}
    source |= {k: h[k] for k in ("unconditional", "train_split", "val_split", "val_fraction", "split_seed")}
    if h.dataset == "shapes":
        source |= {"num_train": h.num_train, "num_val": h.num_val}
    return {
        "dataset": h.dataset,
        "split": split,
        "image_size": h.image_size,
        "channels": h.channels,
        "extractor": extractor,
        "max_images": max_images,
        "pr_num_samples": pr_num_samples,
        "source": source,
    }


def reference_dataset(datamodule: L.LightningDataModule, split: str) -> TransformedDataset:
    """The canonical images of a split: centre crop at the data's resolution, no zoom, no flip (as ADM's refs)."""
    h = datamodule.hparams
    source = datamodule.splits.train if split == "train" else datamodule.splits.val
    return TransformedDataset(source, ImageTransform(h.image_size, h.channels, 1.0, "center"), h.unconditional)


def write_split_npz(datamodule: L.LightningDataModule, split: str, path: str | Path) -> int:
    """Write a split's reference images as an npz of samples (`images` uint8 (N, H, W, C), `labels`); returns N.

    Evaluated against the other split's reference, it gives the real-vs-real floor of a results table.
    """
    dataset = reference_dataset(datamodule, split)
    batches = list(DataLoader(dataset, batch_size=256))
    images = torch.cat([to_8bit(b["image"]) for b in batches])  # (N, C, H, W)
    uint8 = ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.savez(path, images=uint8, labels=torch.cat([b["label"] for b in batches]).numpy())
    return len(uint8)


@dataclass
class ReferenceStats:
    identity: dict[str, Any]
    mu: torch.Tensor  # (D,) float64
    sigma: torch.Tensor  # (D, D) float64
    pr_features: torch.Tensor  # (M, D) float32, a seeded subsample for precision/recall
    count: int

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({**asdict(self), "lit_ar_version": lit_ar.__version__}, tmp)
        tmp.replace(path)  # atomic: a crash never leaves half a reference behind

    @classmethod
    def load(cls, path: Path) -> "ReferenceStats":
        d = torch.load(path, map_location="cpu", weights_only=True)
        return cls(d["identity"], d["mu"], d["sigma"], d["pr_features"], int(d["count"]))

    def check(self, expected: dict[str, Any], path: Path, setting: str) -> None:
        if self.identity != expected:
            differ = [f"{k}: {self.identity.get(k)!r} != {expected.get(k)!r}" for k in expected if
                      self.identity.get(k) != expected.get(k)]  # fmt: skip
            raise ValueError(
                f"{setting}={str(path)!r} is a reference for {json.dumps(self.identity, sort_keys=True)} but this "
                f"evaluation needs {json.dumps(expected, sort_keys=True)} (they differ in {'; '.join(differ)}); "
                f"point {setting} at a matching reference or at a new file to compute one"
            )


def reference_filename(identity: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return f"{identity['dataset']}-{identity['split']}-{identity['image_size']}px-{digest}.pt"


# ----------------------------------------------------------------------------------------------------------------
# The JSON record


@dataclass
class EvaluationRecord:
    metrics: dict[str, float | None]
    num_samples: int
    seed: int | None
    extractor: str
    reference: dict[str, Any]  # {"identity": ..., "path": ..., "count": ...}
    samples: dict[str, Any]  # {"source": "generator" | "npz", "digest": ..., and the npz path and sha256}
    checkpoint: dict[str, Any] | None  # {"path": ..., "sha256": ...} of the evaluated generator
    sampling: dict[str, Any]  # generator sampling settings (cfg, temperature, ...) and the batch size
    protocol: dict[str, Any]  # per_class, num_classes, class_counts, world_size, pr_k, pr_num_samples, force
    lit_ar_version: str = lit_ar.__version__
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def to_json(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> "EvaluationRecord":
        return cls(**json.loads(Path(path).read_text()))


# ----------------------------------------------------------------------------------------------------------------
# The evaluator


class Evaluator:
    """Shared machinery of every entry point: extractor, reference, feature collection, metrics, record.

    Errors name settings as `setting_prefix + name` (e.g. `model.init_args.extractor_ckpt`).
    """

    setting_prefix = ""

    def __init__(
        self,
        extractor: ExtractorKind = "classifier",
        extractor_ckpt: str | None = None,
        batch_size: int = 64,
        reference_split: ReferenceSplit = "train",
        reference_path: str | None = None,
        reference_dir: str = "runs/references",
        reference_max_images: int | None = None,
        pr_k: int = 3,
        pr_num_samples: int = 10000,
        force: bool = False,
        record_path: str | None = None,
        setting_prefix: str | None = None,
    ):
        if setting_prefix is not None:
            self.setting_prefix = setting_prefix
        if extractor not in ("classifier", "inception"):
            raise ValueError(f"{self.setting('extractor')}={extractor!r} is not a feature extractor: use 'classifier' "
                             "or 'inception'")  # fmt: skip
        # The weights file is checked (and loaded) by `prepare`, at the start of test or fit: a generator config
        # that names an extractor still instantiates for training before that classifier exists.
        if reference_split not in ("train", "validation"):
            raise ValueError(f"{self.setting('reference_split')}={reference_split!r}: use 'train' or 'validation'")
        minimums = (("batch_size", batch_size, 1), ("pr_k", pr_k, 1), ("pr_num_samples", pr_num_samples, 2))
        for name, value, least in minimums:
            if value < least:
                raise ValueError(f"{self.setting(name)}={value} must be at least {least}")
        self.extractor_kind, self.extractor_ckpt, self.batch_size = extractor, extractor_ckpt, batch_size
        self.reference_split, self.reference_path, self.reference_dir = reference_split, reference_path, reference_dir
        self.reference_max_images, self.pr_k, self.pr_num_samples = reference_max_images, pr_k, pr_num_samples
        self.force, self.record_path = force, record_path
        self.extractor: FeatureExtractor | None = None
        self.reference: ReferenceStats | None = None
        self.reference_file: Path | None = None

    def setting(self, name: str) -> str:
        return f"{self.setting_prefix}{name}"

    # -- preparation: everything that can fail is checked here, before any sampling ---------------------------------

    def check_count(self, n: int, what: str, setting: str) -> None:
        d = self.extractor.feature_dim
        if n < d and not self.force:
            raise ValueError(
                f"{setting}: {n} {what} is fewer than the {d} feature dimensions of {self.extractor.identity}: the "
                f"{d}x{d} covariance is then singular and FID ill-conditioned (not comparable with other FIDs). "
                f"Use at least {d}, or set {self.setting('force')}=true to compute it anyway"
            )

    def prepare(self, trainer: L.Trainer, pl_module: L.LightningModule, num_samples: int, count_setting: str) -> None:
        """Load the extractor, check it against the sample count and the data, load or compute the reference.

        Idempotent; every check runs before the reference is computed and before anything is sampled.
        """
        if self.extractor is None:
            self.extractor = load_extractor(self.extractor_kind, self.extractor_ckpt, self.setting("extractor_ckpt"))
        self.extractor.to(pl_module.device)
        self.check_count(num_samples, "samples", count_setting)
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "splits"):
            raise ValueError("evaluation needs the lit_ar ImageDataModule (`data:` in the config) for its reference")
        size, channels = dm.hparams.image_size, dm.hparams.channels
        e = self.extractor
        if e.input_size not in (None, size) or e.channels not in (None, channels):
            raise ValueError(
                f"{self.setting('extractor_ckpt')}={self.extractor_ckpt!r} takes {e.input_size}x{e.input_size} "
                f"images with {e.channels} channels but the data has data.image_size={size}, data.channels="
                f"{channels}: use a classifier trained on this data at this resolution"
            )
        if self.reference is None:
            self.reference = self._reference(trainer, pl_module, dm)

    def _reference(self, trainer: L.Trainer, pl_module: L.LightningModule, dm) -> ReferenceStats:
        identity = reference_identity(
            dm, self.reference_split, self.extractor.identity, self.reference_max_images, self.pr_num_samples
        )
        setting = self.setting("reference_path")
        path = Path(self.reference_path or Path(self.reference_dir) / reference_filename(identity))
        self.reference_file = path
        if path.is_file():
            ref = ReferenceStats.load(path)
            ref.check(identity, path, setting)
            self.check_count(ref.count, "reference images", setting)
            return ref
        dataset = reference_dataset(dm, self.reference_split)
        indices = torch.arange(len(dataset))
        if self.reference_max_images is not None and self.reference_max_images < len(dataset):
            # a seeded random subset: a folder's first images are its first classes
            indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
            indices = indices[: self.reference_max_images].sort().values
        self.check_count(len(indices), f"reference images of the {self.reference_split} split", setting)
        my_batches = self._my_batches(trainer, len(indices))
        mine = [i for s, e in my_batches for i in range(s, e)]
        # batches of this rank's indices in order: only the globally last batch can be short, so they line up
        num_workers = dm.hparams.num_workers
        loader = DataLoader(Subset(dataset, indices[mine].tolist()), self.batch_size, num_workers=num_workers)
        batches = ((s, b["image"], None) for (s, _), b in zip(my_batches, loader))
        feats = self.collect(trainer, pl_module, len(indices), batches, logits=False)
        mu, sigma = feature_statistics(feats["features"])
        pr = self._subsample(feats["features"], self.pr_num_samples)
        ref = ReferenceStats(identity, mu.cpu(), sigma.cpu(), pr.cpu(), len(indices))
        if trainer.is_global_zero:
            ref.save(path)
        trainer.strategy.barrier()
        return ref

    def _my_batches(self, trainer: L.Trainer, total: int) -> list[tuple[int, int]]:
        return rank_batches(total, self.batch_size, trainer.global_rank, trainer.world_size)

    @staticmethod
    def _subsample(features: torch.Tensor, n: int) -> torch.Tensor:
        if features.shape[0] <= n:
            return features
        keep = torch.randperm(features.shape[0], generator=torch.Generator().manual_seed(0))[:n]
        return features[keep.sort().values.to(features.device)]

    # -- features of samples --------------------------------------------------------------------------------------

    @torch.no_grad()
    def collect(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        total: int,
        batches: Iterable[tuple[int, torch.Tensor, torch.Tensor | None]],
        logits: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Features (and logits, labels, fingerprints) of this rank's batches `(start, images, labels)`, gathered
        from every rank in global-index order."""
        e, device = self.extractor, pl_module.device
        out: dict[str, list[torch.Tensor]] = {"index": [], "features": [], "logits": [], "labels": [], "digest": []}
        for start, images, labels in batches:
            # Every image is evaluated as 8-bit, as published protocols do: the same sample scores the same whether
            # it comes from `sample` directly or from an npz or PNG of it.
            images = to_8bit(images.to(device))
            with torch.autocast(device.type, enabled=False):  # extractors run in float32 under any precision
                f = e.features(images.float())
                out["features"].append(f)
                if logits:
                    out["logits"].append(e.head(f).float())
            out["index"].append(torch.arange(start, start + len(images), device=device))
            out["digest"].append(image_digests(images))
            out["labels"].append((labels if labels is not None else torch.full((len(images),), -1)).to(device).long())
        k = e.head(torch.zeros(1, e.feature_dim, device=device)).shape[1] if logits else 0
        empty = {"features": (0, e.feature_dim), "logits": (0, k)}
        cat = {
            key: torch.cat(v) if v else torch.zeros(empty.get(key, (0,)), device=device,
                                                     dtype=torch.float32 if key in empty else torch.long)
            for key, v in out.items() if key != "logits" or logits
        }  # fmt: skip
        index = cat.pop("index")
        return gather_by_index(index, total, **cat)

    # -- metrics --------------------------------------------------------------------------------------------------

    def metrics(self, fake: dict[str, torch.Tensor], num_classes: int) -> dict[str, float | None]:
        ref, e = self.reference, self.extractor
        feats = fake["features"]
        mu, sigma = feature_statistics(feats)
        fid = frechet_distance(mu, sigma, ref.mu.to(feats.device), ref.sigma.to(feats.device))
        is_mean, is_std = inception_score(fake["logits"], splits=min(10, len(feats)))
        precision, recall = precision_recall(
            ref.pr_features.to(feats.device), self._subsample(feats, self.pr_num_samples), k=self.pr_k
        )
        labels = fake["labels"]
        acc = None
        if e.num_classes is not None and e.num_classes == num_classes > 1 and bool((labels >= 0).all()):
            acc = class_accuracy(fake["logits"], labels)
        return {"fid": fid, "is_mean": is_mean, "is_std": is_std, "precision": precision, "recall": recall,
                "class_accuracy": acc}  # fmt: skip

    def log(self, pl_module: L.LightningModule, metrics: dict[str, float | None], stage: str) -> None:
        for name, value in metrics.items():
            if value is not None:
                pl_module.log(f"{stage}/{name}", float(value), sync_dist=True)  # equal on every rank already

    def record(
        self,
        trainer: L.Trainer,
        metrics: dict[str, float | None],
        fake: dict[str, torch.Tensor],
        samples: dict[str, Any],
        sampling: dict[str, Any],
        protocol: dict[str, Any],
        seed: int | None,
    ) -> EvaluationRecord:
        labels = fake["labels"]
        counts = torch.bincount(labels[labels >= 0].cpu()).tolist() if bool((labels >= 0).any()) else []
        ckpt = trainer.ckpt_path
        rec = EvaluationRecord(
            metrics=metrics,
            num_samples=len(labels),
            seed=seed,
            extractor=self.extractor.identity,
            reference={
                "identity": self.reference.identity,
                "path": str(self.reference_file),
                "count": self.reference.count,
            },  # fmt: skip
            samples={**samples, "digest": digest_hex({"digest": fake["digest"], "labels": labels})},
            checkpoint=None if ckpt is None else {"path": str(ckpt), "sha256": file_sha256(ckpt)},
            sampling=sampling,
            protocol={
                **protocol,
                "class_counts": counts,
                "world_size": trainer.world_size,
                "pr_k": self.pr_k,
                "pr_num_samples": self.pr_num_samples,
                "force": self.force,
            },  # fmt: skip
        )
        # trainer.log_dir broadcasts from rank 0: every rank must ask for it, not just the one that writes
        path = self.record_path or Path(trainer.log_dir or trainer.default_root_dir) / "evaluation.json"
        if trainer.is_global_zero:
            rec.to_json(path)
        return rec


class GeneratorEvaluator(Evaluator):
    """Class-balanced, seeded, distributed evaluation of a generator system's `sample`.

    A generator system holds one and calls `evaluator.run(self)` from `on_test_epoch_end`; it samples with
    `self.sample(labels, generator=g, **sampling)` and logs `test/fid`, `test/is_mean`, `test/precision`,
    `test/recall`, `test/class_accuracy`; the JSON record goes to `record_path` (default: the run folder's
    `evaluation.json`).
    """

    setting_prefix = "model.init_args.evaluator.init_args."

    def __init__(
        self,
        extractor: ExtractorKind = "classifier",
        extractor_ckpt: str | None = None,
        per_class: int | None = 50,
        num_samples: int | None = None,
        seed: int = 0,
        batch_size: int = 64,
        sampling: dict[str, Any] | None = None,
        reference_split: ReferenceSplit = "train",
        reference_path: str | None = None,
        reference_dir: str = "runs/references",
        reference_max_images: int | None = None,
        pr_k: int = 3,
        pr_num_samples: int = 10000,
        force: bool = False,
        record_path: str | None = None,
        setting_prefix: str | None = None,
    ):
        """
        Args:
            extractor: Feature space: `classifier` (a lit_ar ClassifierSystem checkpoint: domain features, class
                accuracy) or `inception` (the standard FID InceptionV3 weights file: published-comparable FID).
            extractor_ckpt: Path of the classifier checkpoint or of pt_inception-2015-12-05-6726825d.pth.
            per_class: Samples of every class (class-balanced; 50 per class = 50k on ImageNet). Conditional models.
            num_samples: Number of samples of an unconditional model (num_classes 1); set per_class to null then.
            seed: Seed of the label order and of every batch's generator.
            batch_size: Samples per generation batch per device. Samples depend on it (batch b gets the
                generator seeded from (seed, b * batch_size)) but not on the number of devices.
            sampling: Keyword arguments of the generator's `sample` (e.g. `{cfg: 1.5, temperature: 1.0, top_k: null}`);
                null: a lit_ar generator system's own `predict_kwargs` (each family's configured sampling).
            reference_split: The data split whose statistics are the reference: `train` or `validation`.
            reference_path: A reference statistics file; computed there if missing, refused if made for another
                dataset, split, resolution or extractor. Null: an automatically named file in `reference_dir`.
            reference_dir: Cache folder of reference statistics.
            reference_max_images: Use a seeded random subset of this many reference images (null: the whole split).
            pr_k: k of the k-NN precision and recall (Kynkaanniemi et al. 2019).
            pr_num_samples: Samples (each side) for precision/recall, a seeded subset.
            force: Compute FID even with fewer samples than feature dimensions (ill-conditioned).
            record_path: Where the JSON record goes; null: `evaluation.json` in the run folder.
            setting_prefix: How error messages name these settings (the owner's config path to them).
        """
        super().__init__(
            extractor, extractor_ckpt, batch_size, reference_split, reference_path, reference_dir,
            reference_max_images, pr_k, pr_num_samples, force, record_path, setting_prefix,
        )  # fmt: skip
        if (per_class is None) == (num_samples is None):
            raise ValueError(
                f"set exactly one of {self.setting('per_class')} (class-conditional models) and "
                f"{self.setting('num_samples')} (unconditional models); got per_class={per_class}, "
                f"num_samples={num_samples}"
            )
        for name, value in (("per_class", per_class), ("num_samples", num_samples)):
            if value is not None and value < 1:
                raise ValueError(f"{self.setting(name)}={value} must be at least 1")
        self.per_class, self.num_samples, self.seed = per_class, num_samples, seed
        # None: the owner decides (a generator system uses its `predict_kwargs`); {} samples with the defaults
        self.sampling = None if sampling is None else dict(sampling)

    def labels(self, num_classes: int) -> torch.Tensor:
        """The labels of every sample, in global-index order; refuses a protocol that does not fit the model."""
        if self.per_class is not None:
            if num_classes <= 1:
                raise ValueError(
                    f"{self.setting('per_class')}={self.per_class} asks for class-balanced sampling, but the model is "
                    f"unconditional (num_classes={num_classes}); set {self.setting('per_class')}=null and "
                    f"{self.setting('num_samples')} instead"
                )
            return balanced_labels(num_classes, self.per_class, self.seed)
        if num_classes > 1:
            raise ValueError(
                f"{self.setting('num_samples')}={self.num_samples} draws no labels, but the model has "
                f"num_classes={num_classes}: evaluate a class-conditional model class-balanced with "
                f"{self.setting('per_class')} (labels drawn at random make FIDs incomparable)"
            )
        return torch.zeros(self.num_samples, dtype=torch.long)

    def prepare(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # type: ignore[override]
        labels = self.labels(int(pl_module.hparams["num_classes"]))  # protocol errors first: they cost nothing
        if hasattr(pl_module, "sampling_settings"):  # a lit_ar generator: its typed settings refuse a misspelt key
            pl_module.sampling_settings(self.sampling or {}, self.setting("sampling"))
        setting = self.setting("per_class" if self.per_class is not None else "num_samples")
        super().prepare(trainer, pl_module, len(labels), setting)

    def sample_features(
        self, trainer: L.Trainer, pl_module: L.LightningModule, generate: GenerateFn | None = None
    ) -> dict[str, torch.Tensor]:
        """Generate this rank's batches and return every rank's features, logits, labels and fingerprints."""
        self.prepare(trainer, pl_module)
        labels = self.labels(int(pl_module.hparams["num_classes"]))
        device = pl_module.device
        if generate is None:

            def generate(y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
                return pl_module.sample(y, generator=g, **(self.sampling or {}))

        def batches() -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
            for start, end in self._my_batches(trainer, len(labels)):
                g = torch.Generator(device=device).manual_seed(batch_seed(self.seed, start))
                y = labels[start:end].to(device)
                with trainer.precision_plugin.forward_context():
                    images = generate(y, g)
                yield start, images.float(), y

        was_training = pl_module.training
        pl_module.eval()
        try:
            return self.collect(trainer, pl_module, len(labels), batches())
        finally:
            pl_module.train(was_training)

    def run(
        self,
        pl_module: L.LightningModule,
        generate: GenerateFn | None = None,
        stage: str = "test",
        write_record: bool = True,
    ) -> dict[str, float | None]:
        """Sample, compute the metrics, log them as `{stage}/<metric>` and write the JSON record (rank 0).

        `generate(labels, generator) -> images in [-1, 1]` defaults to `pl_module.sample(labels, generator=g,
        **sampling)`. Call it from `on_test_epoch_end` (or any hook where every rank runs it).
        """
        trainer = pl_module.trainer
        fake = self.sample_features(trainer, pl_module, generate)
        num_classes = int(pl_module.hparams["num_classes"])
        metrics = self.metrics(fake, num_classes)
        if stage:
            self.log(pl_module, metrics, stage)
        if write_record:
            self.last_record = self.record(
                trainer, metrics, fake, samples={"source": "generator"},
                sampling={**(self.sampling or {}), "batch_size": self.batch_size},
                protocol={"per_class": self.per_class, "num_classes": num_classes}, seed=self.seed,
            )  # fmt: skip
        return metrics
