"""Image transforms in plain torch (lit_ar does not depend on torchvision), and `TransformedDataset`, which applies
one to every item of an image source: the batch format of the datamodule, the token cache and the evaluation."""

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from lit_ar.draws import mix_seed


def to_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8/float (C, H, W) with C in {1, 3} to `channels` channels (luminance for grey)."""
    if image.shape[0] == channels:
        return image
    if channels == 3:
        return image.expand(3, -1, -1)
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32)[:, None, None]
    return (image.float() * weights).sum(0, keepdim=True)


def resize_short_side(image: torch.Tensor, size: int) -> torch.Tensor:
    """Float (C, H, W) resized so its shorter side is `size`, bicubic with antialiasing."""
    _, h, w = image.shape
    if min(h, w) == size:
        return image
    scale = size / min(h, w)
    new_hw = (max(size, round(h * scale)), max(size, round(w * scale)))
    return F.interpolate(image[None], size=new_hw, mode="bicubic", antialias=True, align_corners=False)[0]


def crop(image: torch.Tensor, size: int, top: int, left: int) -> torch.Tensor:
    return image[:, top : top + size, left : left + size]


class ImageTransform:
    """uint8 (C, H, W) -> float (channels, size, size) in [-1, 1]; resize, centre or random crop, optional flip."""

    def __init__(self, size: int, channels: int, resize_scale: float = 1.0, crop: str = "center", hflip: bool = False):
        self.size, self.channels, self.resize_scale, self.crop, self.hflip = size, channels, resize_scale, crop, hflip

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = to_channels(image, self.channels).float() / 127.5 - 1.0
        x = resize_short_side(x, max(self.size, round(self.size * self.resize_scale)))
        _, h, w = x.shape
        if self.crop == "random":
            top = int(torch.randint(0, h - self.size + 1, (1,), generator=generator))
            left = int(torch.randint(0, w - self.size + 1, (1,), generator=generator))
        else:
            top, left = (h - self.size) // 2, (w - self.size) // 2
        x = crop(x, self.size, top, left)
        if self.hflip and bool(torch.rand((), generator=generator) < 0.5):
            x = x.flip(-1)
        return x.clamp(-1.0, 1.0).contiguous()


class TransformedDataset(Dataset):
    """(uint8 image, label) pairs to the batch format `{"image": (C, H, W) in [-1, 1], "label": ()}`.

    Indexed by `(index, epoch)` (what ResumableSampler yields), a sample's random crop and flip come from a
    generator seeded with (seed, epoch, index), not from the process's global RNG: the same augmentation on 1 or N
    devices, with any number of workers, and after a mid-epoch resume. A plain int index uses the global RNG."""

    def __init__(self, source: Dataset, transform: ImageTransform, unconditional: bool, seed: int = 0):
        self.source, self.transform, self.unconditional, self.seed = source, transform, unconditional, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        generator = None
        if isinstance(index, tuple):
            index, epoch = index
            generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch, index))
        image, label = self.source[index]
        label = 0 if self.unconditional else label
        return {"image": self.transform(image, generator), "label": torch.tensor(label, dtype=torch.long)}
