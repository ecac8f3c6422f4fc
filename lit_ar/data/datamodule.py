"""ImageDataModule: the one DataModule of every lit_ar family."""

from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from lit_ar.data.cached_tokens import TokenCache
from lit_ar.data.resumable import ResumableDataLoader, ResumableSampler
from lit_ar.data.sources import SourceSplits, load_source
from lit_ar.data.transforms import ImageTransform, TransformedDataset


class ClassBalancedLabels(Dataset):
    """`per_class` labels of each class in class-major order, each with its global index (for `predict`)."""

    def __init__(self, num_classes: int, per_class: int):
        self.num_classes, self.per_class = num_classes, per_class

    def __len__(self) -> int:
        return self.num_classes * self.per_class

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"label": torch.tensor(index // self.per_class), "index": torch.tensor(index)}


class ImageDataModule(L.LightningDataModule):
    def __init__(
        self,
        dataset: str = "shapes",
        data_dir: str | None = None,
        data_files: str | list[str] | None = None,
        hub_config: str | None = None,
        image_column: str = "image",
        label_column: str | None = "label",
        unconditional: bool = False,
        image_size: int = 64,
        channels: Literal[1, 3] = 3,
        resize_scale: float = 1.0,
        crop: Literal["center", "random"] = "center",
        hflip: bool = False,
        train_split: str = "train",
        val_split: str | None = None,
        val_fraction: float = 0.05,
        split_seed: int = 0,
        num_train: int = 10000,
        num_val: int = 1000,
        check_images: bool = True,
        skip_corrupt: bool = False,
        batch_size: int = 64,
        global_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle: bool = True,
        order_seed: int = 0,
        drop_last: bool = True,
        predict_per_class: int = 10,
        token_cache: str | None = None,
        classes: int | None = None,
    ):
        """
        Args:
            dataset: A built-in offline dataset (`shapes`, `digits`, or `labels`: `classes` classes and no
                images, for `lit_ar predict` without the training data), `imagefolder` (with `data_dir`, one
                sub-folder per class), `parquet` (with `data_files`), `disk` (a `datasets.save_to_disk` folder
                in `data_dir`), or a Hugging Face hub name such as `cifar10` (needs the network or a local cache).
            data_dir: Folder for `imagefolder` and `disk`; passed on to `load_dataset` for hub names.
            data_files: Parquet file(s) for `parquet`: a path, a glob or a list.
            hub_config: The configuration name of a hub dataset, if it has several.
            image_column: Column holding the images (hub, folder and parquet sources).
            label_column: Column holding integer class labels; null for unlabelled data.
            unconditional: Ignore labels: every image gets class 0 and `num_classes` is 1.
            image_size: Side of the square images the model sees, after resize and crop.
            channels: 1 (grey) or 3 (RGB); images are converted to it.
            resize_scale: Resize the short side to `image_size * resize_scale` before cropping (1.1 with a
                random crop is LlamaGen's augmentation).
            crop: `center` or `random` crop to `image_size` (validation always crops at the centre).
            hflip: Random horizontal flips in training.
            train_split: The source split used for training.
            val_split: The source split used for validation; null picks `validation`/`valid`/`val`/`test` when
                present, else `val_fraction` of the training split is held out with `split_seed`.
            val_fraction: Fraction of the training split held out when the source has no validation split.
            split_seed: Seed of the held-out split and of the `shapes` images.
            num_train: Number of training images of the procedural `shapes` dataset.
            num_val: Number of validation images of `shapes`.
            check_images: Decode every local image once at setup so that a corrupt file fails before training.
            skip_corrupt: Skip (and count) corrupt images instead of failing on them.
            batch_size: Batch size per device (per process).
            global_batch_size: If set, the batch size summed over all devices; it must divide by the number of
                devices and overrides `batch_size`.
            num_workers: DataLoader worker processes.
            shuffle: Shuffle the training set each epoch.
            order_seed: Seed of the training order (epoch e is shuffled with order_seed + e), shared by all ranks.
            drop_last: Drop the last incomplete training batch.
            predict_per_class: `lit_ar predict` on a generator samples this many images of every class.
            token_cache: A token cache folder (written by `python -m lit_ar.data.token_cache`): batches then carry
                `tokens` (and `label`) instead of `image`, a training sample takes one of the cached views at random
                (the mirrored ones only with `hflip`; five crops with a cache written with `--crops ten`), and the
                model's `tokenizer_ckpt` must be the tokenizer that wrote the cache.
            classes: The number of classes of the `labels` dataset.
        """
        super().__init__()
        self.save_hyperparameters()
        if channels not in (1, 3):
            raise ValueError(f"data.channels={channels} is not supported; use 1 (grey) or 3 (RGB)")
        if image_size < 1:
            raise ValueError(f"data.image_size={image_size} must be a positive integer")
        if crop not in ("center", "random"):
            raise ValueError(f"data.crop={crop!r} is not supported; use 'center' or 'random'")
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} must be at least 1")
        self._splits: SourceSplits | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self._cache = None

    # Resolved lazily, so that `num_classes` can be linked into the model at instantiation.
    @property
    def splits(self) -> SourceSplits:
        if self._splits is None:
            h = self.hparams
            self._splits = load_source(
                h.dataset,
                data_dir=h.data_dir,
                data_files=h.data_files,
                hub_config=h.hub_config,
                image_column=h.image_column,
                label_column=None if h.unconditional else h.label_column,
                train_split=h.train_split,
                val_split=h.val_split,
                val_fraction=h.val_fraction,
                split_seed=h.split_seed,
                image_size=h.image_size,
                num_train=h.num_train,
                num_val=h.num_val,
                check_images=h.check_images,
                skip_corrupt=h.skip_corrupt,
                classes=h.classes,
            )
            if self._splits.skipped_corrupt:
                rank_zero_info(f"ImageDataModule: skipped {self._splits.skipped_corrupt} corrupt images")
        return self._splits

    @property
    def num_classes(self) -> int:
        if self.cache is not None and not self.hparams.unconditional:
            return self.cache.meta["num_classes"]
        return 1 if self.hparams.unconditional else self.splits.num_classes

    @property
    def image_size(self) -> int:
        return self.hparams.image_size

    @property
    def channels(self) -> int:
        return self.hparams.channels

    def per_device_batch_size(self) -> int:
        h = self.hparams
        if h.global_batch_size is None:
            return h.batch_size
        world = self.trainer.world_size if self.trainer is not None else 1
        if h.global_batch_size % world:
            raise ValueError(
                f"data.global_batch_size={h.global_batch_size} does not divide across {world} devices; "
                f"use a multiple of {world} or set `data.batch_size` per device instead"
            )
        return h.global_batch_size // world

    def setup(self, stage: str | None = None) -> None:
        if self.cache is not None:
            return self._setup_token_cache()
        h = self.hparams
        if h.dataset == "labels" and stage != "predict":
            raise ValueError(
                f"data.dataset='labels' has classes but no images: it serves `lit_ar predict` only; "
                f"`{getattr(stage, 'value', stage)}` needs "
                "image data (a built-in dataset, a folder, parquet or a hub name)"
            )
        self.per_device_batch_size()  # fail now, not at the first batch, on a bad global batch size
        train_tf = ImageTransform(h.image_size, h.channels, h.resize_scale, h.crop, h.hflip)
        val_tf = ImageTransform(h.image_size, h.channels, h.resize_scale, "center", False)
        self.train_set = TransformedDataset(self.splits.train, train_tf, h.unconditional, seed=h.order_seed)
        self.val_set = TransformedDataset(self.splits.val, val_tf, h.unconditional)

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        h = self.hparams
        # Our own sharded sampler on 1 or N devices: Lightning's automatic one always shuffles the training set,
        # and one sampler everywhere makes N processes see exactly the samples one process sees.
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        # Training uses the resumable pair: same order, plus a position Lightning checkpoints (mid-epoch resume),
        # and its own generator so that starting an epoch draws nothing from the global RNG.
        sampler_cls, loader_cls = (ResumableSampler, ResumableDataLoader) if train else (DistributedSampler, DataLoader)
        sampler = sampler_cls(
            dataset, num_replicas=world, rank=rank, shuffle=train and h.shuffle, seed=h.order_seed,
            drop_last=train and h.drop_last,
        )  # fmt: skip
        return loader_cls(
            dataset,
            batch_size=self.per_device_batch_size(),
            sampler=sampler,
            drop_last=train and h.drop_last,
            num_workers=h.num_workers,
            persistent_workers=h.num_workers > 0,
            generator=torch.Generator().manual_seed(h.order_seed) if train else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        """Class-balanced labels for generators, sharded across ranks without padding (no duplicates)."""
        labels = ClassBalancedLabels(self.num_classes, self.hparams.predict_per_class)
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        shard = Subset(labels, range(rank, len(labels), world))
        return DataLoader(shard, batch_size=self.per_device_batch_size(), shuffle=False)

    # ---- token caches (lit_ar.data.cached_tokens) ------------------------------------------------------------
    @property
    def cache(self):
        """The TokenCache of `token_cache`, or None."""
        if self._cache is None and self.hparams.token_cache:
            self._cache = TokenCache(self.hparams.token_cache)
        return self._cache

    def _setup_token_cache(self) -> None:
        h, meta = self.hparams, self.cache.meta
        self.per_device_batch_size()
        if (h.image_size, h.channels) != (meta["image_size"], meta["channels"]):
            raise ValueError(
                f"data.image_size={h.image_size}, data.channels={h.channels} differ from the token cache "
                f"data.token_cache={h.token_cache!r}, written at {meta['image_size']}x{meta['image_size']}x"
                f"{meta['channels']}; set data.image_size={meta['image_size']} and data.channels={meta['channels']}"
            )
        model = self.trainer.lightning_module if self.trainer is not None else None
        tokenizer_ckpt = getattr(model, "hparams", {}).get("tokenizer_ckpt") if model is not None else None
        if tokenizer_ckpt:
            self.cache.check_tokenizer(tokenizer_ckpt)
        self.train_set = self.cache.dataset("train", train=True, hflip=h.hflip, unconditional=h.unconditional,
                                            seed=h.order_seed)  # fmt: skip
        self.val_set = self.cache.dataset("val", train=False, hflip=False, unconditional=h.unconditional)
