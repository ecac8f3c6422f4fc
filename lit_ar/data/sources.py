"""Where images come from: a built-in dataset, a local image folder, a parquet file, or a Hugging Face hub name.

Every source ends as a map-style dataset of `(uint8 image (C, H, W), int label)` pairs per split, so the
transforms and the batch format are the same whatever the origin.
"""

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Subset

from lit_ar.data.builtin import BUILTIN_DATASETS, DigitsDataset, NoImages, ShapesDataset

VAL_SPLIT_NAMES = ("validation", "valid", "val", "test")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class SourceSplits:
    train: Dataset
    val: Dataset
    num_classes: int
    skipped_corrupt: int = 0


class HFImageDataset(Dataset):
    """A `datasets.Dataset` whose image column is left undecoded; decoding happens here, with clear errors."""

    def __init__(self, hf_dataset, image_column: str, label_column: str | None, source: str):
        self.ds, self.image_column, self.label_column, self.source = hf_dataset, image_column, label_column, source

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row = self.ds[int(index)]
        label = int(row[self.label_column]) if self.label_column else 0
        return decode_image(row[self.image_column], self.source), label


def decode_image(value, source: str) -> torch.Tensor:
    """A `datasets` image cell ({"bytes", "path"}, a path, or PIL image) as uint8 (C, H, W), C in {1, 3}."""
    name = "<in-memory image>"
    try:
        if isinstance(value, Image.Image):
            img = value
        elif isinstance(value, dict):
            name = value.get("path") or name
            img = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
        else:
            name = str(value)
            img = Image.open(value)
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise CorruptImageError(
            f"corrupt or unreadable image {name!r} in data source {source!r} ({type(err).__name__}: {err}). "
            "Fix or remove the file, or set `data.skip_corrupt: true` to skip such files and count them."
        ) from err
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    array = np.asarray(img, dtype=np.uint8)
    tensor = torch.from_numpy(array.copy())
    return tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)  # (C, H, W)


class CorruptImageError(ValueError):
    pass


def load_source(
    dataset: str,
    *,
    data_dir: str | None,
    data_files: str | list[str] | None,
    hub_config: str | None,
    image_column: str,
    label_column: str | None,
    train_split: str,
    val_split: str | None,
    val_fraction: float,
    split_seed: int,
    image_size: int,
    num_train: int,
    num_val: int,
    check_images: bool,
    skip_corrupt: bool,
    classes: int | None = None,
) -> SourceSplits:
    """Resolve the `data.dataset` setting into train/validation splits (see ImageDataModule for the settings)."""
    if dataset == "labels":
        if classes is None or classes < 1:
            raise ValueError(f"data.dataset='labels' needs data.classes, the number of classes (got {classes})")
        return SourceSplits(NoImages(classes), NoImages(classes), classes)
    if dataset == "shapes":
        train = ShapesDataset(num_train, image_size, seed=split_seed, split="train")
        val = ShapesDataset(num_val, image_size, seed=split_seed, split="validation")
        return SourceSplits(train, val, train.num_classes)
    if dataset == "digits":
        full = DigitsDataset()
        train, val = _carve_validation(full, val_fraction, split_seed)
        return SourceSplits(train, val, full.num_classes)

    splits = _load_hf(dataset, data_dir=data_dir, data_files=data_files, hub_config=hub_config)
    if train_split not in splits:
        raise ValueError(f"data.train_split={train_split!r} is not a split of {dataset!r}; it has {list(splits)}")
    train_hf = splits[train_split]
    if image_column not in train_hf.column_names:
        raise ValueError(
            f"data.image_column={image_column!r} is not a column of {dataset!r}; "
            f"its columns are {train_hf.column_names}"
        )
    if label_column is not None and label_column not in train_hf.column_names:
        raise ValueError(
            f"data.label_column={label_column!r} is not a column of {dataset!r}; its columns are "
            f"{train_hf.column_names}. Set `data.label_column: null` (or `data.unconditional: true`) "
            "for unlabelled data."
        )
    import datasets

    num_classes = 1
    if label_column is not None:
        feature = train_hf.features[label_column]
        if isinstance(feature, datasets.ClassLabel):
            num_classes = feature.num_classes
        else:
            num_classes = int(max(train_hf[label_column])) + 1
    val_name = val_split if val_split is not None else next((n for n in VAL_SPLIT_NAMES if n in splits), None)
    if val_split is not None and val_split not in splits:
        raise ValueError(f"data.val_split={val_split!r} is not a split of {dataset!r}; it has {list(splits)}")

    def wrap(hf):
        hf = hf.cast_column(image_column, datasets.Image(decode=False))
        return HFImageDataset(hf, image_column, label_column, dataset)

    train_ds = wrap(train_hf)
    val_ds = wrap(splits[val_name]) if val_name is not None else None
    skipped = 0
    if check_images:
        train_ds, n_train = _check_images(train_ds, skip_corrupt)
        skipped += n_train
        if val_ds is not None:
            val_ds, n_val = _check_images(val_ds, skip_corrupt)
            skipped += n_val
    if val_ds is None:
        train_ds, val_ds = _carve_validation(train_ds, val_fraction, split_seed)
    return SourceSplits(train_ds, val_ds, num_classes, skipped)


def _load_hf(dataset: str, *, data_dir, data_files, hub_config) -> dict:
    import datasets

    if dataset == "imagefolder":
        if data_dir is None:
            raise ValueError(
                "data.dataset='imagefolder' needs `data.data_dir`: a folder of images, one sub-folder per class"
            )
        folder = Path(data_dir)
        if not folder.is_dir():
            raise ValueError(f"data.data_dir={data_dir!r} does not exist or is not a folder")
        if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.rglob("*") if p.is_file()):
            raise ValueError(
                f"data.data_dir={data_dir!r} holds no image files (accepted suffixes: {sorted(IMAGE_SUFFIXES)})"
            )
        return dict(datasets.load_dataset("imagefolder", data_dir=str(folder)))
    if dataset == "parquet":
        if not data_files:
            raise ValueError("data.dataset='parquet' needs `data.data_files`: a path, a glob, or a list of paths")
        files = [data_files] if isinstance(data_files, str) else list(data_files)
        for f in files:
            if "*" not in f and not Path(f).exists():
                raise ValueError(f"data.data_files entry {f!r} does not exist")
        return dict(datasets.load_dataset("parquet", data_files={"train": files}))
    if dataset in ("arrow", "disk"):
        if data_dir is None or not Path(data_dir).exists():
            raise ValueError(f"data.dataset={dataset!r} needs `data.data_dir` pointing at a `save_to_disk` folder")
        loaded = datasets.load_from_disk(data_dir)
        return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    # Anything else is a Hugging Face hub name (or a local folder laid out like a hub repository).
    try:
        loaded = datasets.load_dataset(dataset, hub_config, data_dir=data_dir)
    except Exception as err:  # noqa: BLE001 - datasets raises many types for "not reachable / not found"
        raise ValueError(
            f"data.dataset={dataset!r} could not be loaded from the Hugging Face hub or disk "
            f"({type(err).__name__}: {str(err)[:300]}). Built-in offline datasets: {list(BUILTIN_DATASETS)}; "
            "for your own images use `data.dataset: imagefolder` with `data.data_dir: path/to/folder` "
            "(one sub-folder per class), or `data.dataset: parquet` with `data.data_files: path/to/*.parquet`."
        ) from err
    return dict(loaded)


def _check_images(ds: HFImageDataset, skip_corrupt: bool) -> tuple[Dataset, int]:
    """Decode every image once, before training, so a corrupt file fails now and not hours in."""
    good = []
    for i in range(len(ds)):
        try:
            ds[i]
        except CorruptImageError:
            if not skip_corrupt:
                raise
            continue
        good.append(i)
    skipped = len(ds) - len(good)
    return (Subset(ds, good) if skipped else ds), skipped


def _carve_validation(ds: Dataset, val_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={val_fraction} must be in (0, 1) when the source has no validation split")
    n = len(ds)
    n_val = max(1, round(n * val_fraction))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(ds, sorted(order[n_val:])), Subset(ds, sorted(order[:n_val]))
