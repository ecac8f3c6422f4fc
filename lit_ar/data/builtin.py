"""Offline datasets that ship with lit_ar or are generated: nothing is downloaded.

`shapes` is procedural: image `i` of a split is drawn from a generator seeded with (seed, split, i), so any
resolution and any size of dataset is reproducible bit for bit. `digits` is scikit-learn's real 8x8 digits,
kept in the package (see DIGITS_SOURCE.md). `labels` has classes and no images: it lets `lit_ar predict` sample a
class-conditional generator (a released ImageNet model, say) without the data it was trained on.
"""

import math
from importlib import resources

import numpy as np
import torch
from torch.utils.data import Dataset

from lit_ar.draws import mix_seed

SHAPE_CLASSES = (
    "disk", "ring", "square", "square_frame", "triangle", "star", "cross", "crescent", "half_disk", "ellipse",
)  # fmt: skip
BUILTIN_DATASETS = ("shapes", "digits", "labels")


def _shape_inside(name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Signed distance-like field: < 0 inside the unit-sized shape centred at 0 (x, y in shape units)."""
    r = torch.sqrt(x * x + y * y)
    if name == "disk":
        return r - 1.0
    if name == "ring":
        return (r - 0.75).abs() - 0.25
    if name == "square":
        return torch.maximum(x.abs(), y.abs()) - 0.85
    if name == "square_frame":
        return (torch.maximum(x.abs(), y.abs()) - 0.7).abs() - 0.2
    if name == "triangle":  # equilateral, circumradius 1
        d = y.new_full(y.shape, -1e9)
        for k in range(3):
            a = math.pi / 2 + k * 2 * math.pi / 3 + math.pi / 3  # outward normal of edge k
            d = torch.maximum(d, x * math.cos(a) + y * math.sin(a) - 0.5)
        return d
    if name == "star":  # 5 points: radius varies with angle between 0.45 and 1
        theta = torch.atan2(y, x)
        spike = (torch.cos(5 * theta) + 1) / 2
        return r - (0.45 + 0.55 * spike**3)
    if name == "cross":
        arm = 0.3
        return torch.minimum(torch.maximum(x.abs() - 1.0, y.abs() - arm), torch.maximum(x.abs() - arm, y.abs() - 1.0))
    if name == "crescent":
        return torch.maximum(r - 1.0, -(torch.sqrt((x - 0.45) ** 2 + y * y) - 0.8))
    if name == "half_disk":
        return torch.maximum(r - 1.0, -y)
    if name == "ellipse":
        return torch.sqrt(x * x + (y / 0.5) ** 2) - 1.0
    raise ValueError(f"unknown shape {name!r}; known: {SHAPE_CLASSES}")


def render_shape(label: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Render one RGB image (3, size, size) uint8 of class `label` with random placement and colours."""
    u = torch.rand(10, generator=generator, dtype=torch.float64).tolist()
    scale = 0.22 + 0.18 * u[0]  # shape radius as a fraction of the image side
    cx = scale + (1 - 2 * scale) * u[1]
    cy = scale + (1 - 2 * scale) * u[2]
    angle = 2 * math.pi * u[3]
    fg = torch.tensor(_hsv_to_rgb(u[4], 0.55 + 0.45 * u[5], 0.7 + 0.3 * u[6]))
    # background: a dim, desaturated colour so the shape always stands out
    bg = torch.tensor(_hsv_to_rgb(u[7], 0.5 * u[8], 0.1 + 0.3 * u[9]))
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size  # pixel centres in [0, 1]
    py, px = torch.meshgrid(coords, coords, indexing="ij")  # (size, size) each
    dx, dy = (px - cx) / scale, (py - cy) / scale
    c, s = math.cos(angle), math.sin(angle)
    x, y = c * dx + s * dy, -s * dx + c * dy  # rotate into the shape's frame
    field = _shape_inside(SHAPE_CLASSES[label], x, y)
    # anti-aliased edge: one pixel wide in image units
    pixel = 1.0 / (size * scale)
    alpha = torch.clamp(0.5 - field / pixel, 0.0, 1.0)  # (size, size)
    img = bg[:, None, None] * (1 - alpha) + fg[:, None, None] * alpha  # (3, size, size)
    return (img * 255).round().to(torch.uint8)


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]


class ShapesDataset(Dataset):
    """Procedural coloured shapes in 10 classes; item i is the same image for the same (seed, split, size)."""

    def __init__(self, num_images: int, size: int, seed: int = 0, split: str = "train"):
        self.num_images, self.size, self.seed = num_images, size, seed
        offsets = {"train": 0, "validation": 1, "test": 2}  # each split its own images, for the same seed
        if split not in offsets:
            raise ValueError(f"ShapesDataset split={split!r} is not known; known splits: {tuple(offsets)}")
        self.split_offset = offsets[split]
        self.num_classes = len(SHAPE_CLASSES)

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.num_images:
            raise IndexError(index)
        g = torch.Generator().manual_seed(mix_seed(self.seed * 3 + self.split_offset, index))
        label = index % self.num_classes  # balanced classes
        return render_shape(label, self.size, g), label


class DigitsDataset(Dataset):
    """scikit-learn's 1797 real 8x8 digits as (1, 8, 8) uint8 images; the datamodule resizes them."""

    def __init__(self):
        with resources.files("lit_ar.data").joinpath("digits.npz").open("rb") as f:
            data = np.load(f)
            self.images = torch.from_numpy(data["images"]).unsqueeze(1)  # (1797, 1, 8, 8) uint8
            self.labels = torch.from_numpy(data["labels"].astype(np.int64))
        self.num_classes = 10

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


class NoImages(Dataset):
    """The `labels` dataset's splits: `num_classes` classes and no images."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def __len__(self) -> int:
        return 0

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        raise IndexError("the `labels` dataset has no images")
