from lit_ar.data.builtin import BUILTIN_DATASETS, SHAPE_CLASSES, DigitsDataset, ShapesDataset
from lit_ar.data.datamodule import ImageDataModule

__all__ = ["BUILTIN_DATASETS", "SHAPE_CLASSES", "DigitsDataset", "ImageDataModule", "ShapesDataset"]
