"""lit_ar: autoregressive image generation on PyTorch Lightning."""

__version__ = "0.1.0"
