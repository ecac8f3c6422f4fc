"""LPIPS (Zhang et al. 2018, v0.1 "vgg") in plain torch, without torchvision: a perceptual distance for training
tokenizers. Nothing is downloaded: the weights come from a local folder holding the two official files,

  vgg16-397923af.pth  torchvision's ImageNet VGG16 (keys `features.N.weight/bias`)
  vgg.pth             the LPIPS v0.1 linear layers (keys `linK.model.1.weight`, K = 0..4)

The weights are non-persistent buffers: they move with the module but stay out of the tokenizer's checkpoints.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

VGG_FILE, LIN_FILE = "vgg16-397923af.pth", "vgg.pth"
# VGG16 `features`: conv indices, with the ReLU outputs LPIPS compares (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3)
VGG_CONVS = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
VGG_WIDTHS = ((3, 64, 64), (64, 128, 128), (128, 256, 256, 256), (256, 512, 512, 512), (512, 512, 512, 512))


class LPIPS(nn.Module):
    def __init__(self, weights_dir: str, setting: str = "lpips_path"):
        super().__init__()
        folder = Path(weights_dir)
        missing = [name for name in (VGG_FILE, LIN_FILE) if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{setting}={weights_dir!r} lacks {missing}: LPIPS needs a local folder with torchvision's VGG16 "
                f"weights ({VGG_FILE}) and the LPIPS v0.1 linear layers ({LIN_FILE}); nothing is downloaded"
            )
        vgg = torch.load(folder / VGG_FILE, map_location="cpu", weights_only=True)
        lin = torch.load(folder / LIN_FILE, map_location="cpu", weights_only=True)
        for stage, (convs, widths) in enumerate(zip(VGG_CONVS, VGG_WIDTHS)):
            for j, idx in enumerate(convs):
                w, b = vgg[f"features.{idx}.weight"], vgg[f"features.{idx}.bias"]
                if w.shape != (widths[j + 1], widths[j], 3, 3):
                    raise ValueError(f"{VGG_FILE}: features.{idx}.weight has shape {tuple(w.shape)}; is it VGG16?")
                self.register_buffer(f"w{stage}_{j}", w.float(), persistent=False)
                self.register_buffer(f"b{stage}_{j}", b.float(), persistent=False)
            self.register_buffer(f"lin{stage}", lin[f"lin{stage}.model.1.weight"].float(), persistent=False)
        # the input normalisation of the official LPIPS ("ScalingLayer"), for images in [-1, 1]
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None], persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None], persistent=False)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, feats = (x - self.shift) / self.scale, []
        for stage, convs in enumerate(VGG_CONVS):
            if stage > 0:
                h = F.max_pool2d(h, 2)
            for j in range(len(convs)):
                h = F.relu(F.conv2d(h, getattr(self, f"w{stage}_{j}"), getattr(self, f"b{stage}_{j}"), padding=1))
            feats.append(h)  # (B, C_stage, H / 2^stage, W / 2^stage)
        return feats

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] (grey is repeated to RGB) -> distance (B,)."""
        if a.shape[1] == 1:
            a, b = a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)
        dist = 0.0
        for stage, (fa, fb) in enumerate(zip(self.features(a), self.features(b))):
            fa, fb = F.normalize(fa, dim=1, eps=1e-10), F.normalize(fb, dim=1, eps=1e-10)  # unit length per position
            dist = dist + F.conv2d((fa - fb) ** 2, getattr(self, f"lin{stage}")).mean(dim=(1, 2, 3))
        return dist
