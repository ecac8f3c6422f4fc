"""A small CNN classifier: the domain feature extractor behind lit_ar's FID and class-accuracy metrics."""

import torch
from torch import nn


class ConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        # GroupNorm, not BatchNorm: per-sample statistics keep DDP and single-process training identical.
        self.net = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.GroupNorm(8, c_out),
            nn.SiLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.GroupNorm(8, c_out),
            nn.SiLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNNClassifier(nn.Module):
    """Stages of two 3x3 convs, each after the first halving the resolution; global average pool; linear head."""

    def __init__(
        self, num_classes: int, channels: int = 3, width: int = 32, num_stages: int = 4, feature_dim: int = 128
    ):
        super().__init__()
        widths = [width * 2**i for i in range(num_stages)]
        stages, c_in = [], channels
        for i, w in enumerate(widths):
            stages.append(ConvBlock(c_in, w, stride=1 if i == 0 else 2))
            c_in = w
        self.stages = nn.Sequential(*stages)
        self.proj = nn.Sequential(nn.Linear(c_in, feature_dim), nn.SiLU())
        self.head = nn.Linear(feature_dim, num_classes)
        self.min_image_size = 2 ** (num_stages - 1)
        self.feature_dim = feature_dim

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, feature_dim) penultimate features (the FID feature space)."""
        h = self.stages(images)  # (B, C', H / 2^(S-1), W / 2^(S-1))
        return self.proj(h.mean(dim=(2, 3)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))  # (B, num_classes)
