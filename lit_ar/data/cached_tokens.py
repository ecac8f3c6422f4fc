"""Token caches as generators read them: a folder written by `lit_ar.data.token_cache` (`data.token_cache`), its
checks and its datasets. The writing side and its command import the datamodule, which serves caches through this
module; keeping the reading side here keeps that one-way.

A cache folder holds, per split (`train`, `val`), memory-mapped numpy arrays and one `meta.json`:
  discrete tokens  {split}_tokens.npy  (N, V, L_total) uint16/int32; multi-scale scales are concatenated
                   coarse to fine (L_total = sum s*s; `split_scales` cuts a batch back into the per-scale list)
  kl latents       {split}_mean.npy, {split}_std.npy  (N, V, L, D) float32, already times the latent scale:
                   training batches draw mean + std * eps (MAR-style), validation batches take the mean
  labels           {split}_labels.npy  (N,) int64
`meta.json` records the tokenizer's fingerprint (sha256 of its weights), vocabulary, grid, scales, latent width
and image size; a cache refuses to serve a generator whose tokenizer has another fingerprint.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from lit_ar.draws import mix_seed
from lit_ar.tokenizers import load_tokenizer

CACHE_VERSION = 1
META = "meta.json"


def tokenizer_fingerprint(autoencoder: torch.nn.Module) -> str:
    """sha256 over the tokenizer's state dict (names, shapes, dtypes, bytes): its identity, whatever the file."""
    h = hashlib.sha256()
    for name, tensor in sorted(autoencoder.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def split_scales(tokens: torch.Tensor, scales: tuple[int, ...]) -> list[torch.Tensor]:
    """(B, sum s*s) flattened multi-scale tokens -> list of (B, s*s), coarse to fine."""
    return list(tokens.split([s * s for s in scales], dim=1))


class TokenCache:
    """A cache folder written by `lit_ar.data.token_cache.write_token_cache`: its metadata, checks and datasets."""

    def __init__(self, path: str, setting: str = "data.token_cache"):
        self.folder = Path(path)
        if not (self.folder / META).is_file():
            raise FileNotFoundError(
                f"{setting}={path!r} is not a token cache (no {META}); write one with "
                "`python -m lit_ar.data.token_cache --tokenizer_ckpt ... --output ...`"
            )
        self.meta = json.loads((self.folder / META).read_text())
        if self.meta.get("version") != CACHE_VERSION:
            raise ValueError(
                f"{setting}={path!r} has cache version {self.meta.get('version')}; expected {CACHE_VERSION}"
            )
        self.setting = setting

    def check_tokenizer(self, autoencoder_or_ckpt, setting: str = "model.init_args.tokenizer_ckpt") -> None:
        """Refuse a tokenizer (an Autoencoder or a checkpoint path) other than the one that wrote the cache."""
        if isinstance(autoencoder_or_ckpt, str | Path):
            name, autoencoder = str(autoencoder_or_ckpt), load_tokenizer(str(autoencoder_or_ckpt))
        else:
            name, autoencoder = "the given tokenizer", autoencoder_or_ckpt
        fingerprint = tokenizer_fingerprint(autoencoder)
        if fingerprint != self.meta["tokenizer_fingerprint"]:
            raise ValueError(
                f"{self.setting}={str(self.folder)!r} was written by another tokenizer: {setting}={name!r} has "
                f"fingerprint {fingerprint[:16]}..., the cache {self.meta['tokenizer_fingerprint'][:16]}... (written "
                f"from {self.meta['tokenizer_ckpt']!r}); rebuild the cache with this tokenizer"
            )

    def dataset(self, split: str, train: bool, hflip: bool, unconditional: bool = False, seed: int = 0
                ) -> "TokenCacheDataset":  # fmt: skip
        return TokenCacheDataset(self, split, random_variant=train, hflip=hflip, sample=train,
                                 unconditional=unconditional, seed=seed)  # fmt: skip


class TokenCacheDataset(Dataset):
    """Items `{"tokens": (L_total,) long | (L, D) float, "label": ()}` from a cache split; `random_variant` picks one
    of the cached views at random (the mirrored ones only with `hflip`), else the centre crop; `sample` draws kl
    latents from their posterior."""

    def __init__(self, cache: TokenCache, split: str, random_variant: bool, sample: bool, unconditional: bool,
                 seed: int = 0, hflip: bool = True):  # fmt: skip
        self.meta, self.random_variant, self.sample = cache.meta, random_variant, sample
        self.unconditional, self.seed = unconditional, seed
        names = ("mean", "std") if cache.meta["is_continuous"] else ("tokens",)
        self.arrays = {k: np.load(cache.folder / f"{split}_{k}.npy", mmap_mode="r") for k in names}
        self.labels = np.load(cache.folder / f"{split}_labels.npy", mmap_mode="r")
        views = cache.meta["variants"]  # the cached views' names; a training sample draws among these indices
        self.variants = [i for i, view in enumerate(views) if hflip or not view.endswith("_hflip")]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        # Indexed by (index, epoch) (ResumableSampler), the flip variant and the latent draw come from a generator
        # seeded per sample, as image augmentations do: the same on 1 or N devices and after a mid-epoch resume.
        generator = None
        if isinstance(index, tuple):
            index, epoch = index
            generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch, index))
        v = 0  # the centre crop
        if self.random_variant and len(self.variants) > 1:
            v = self.variants[int(torch.randint(len(self.variants), (), generator=generator))]
        if "tokens" in self.arrays:
            tokens = torch.from_numpy(self.arrays["tokens"][index, v].astype(np.int64))  # (L_total,)
        else:
            tokens = torch.from_numpy(np.array(self.arrays["mean"][index, v]))  # (L, D)
            if self.sample:
                noise = torch.randn(tokens.shape, generator=generator, dtype=tokens.dtype)
                tokens = tokens + torch.from_numpy(np.array(self.arrays["std"][index, v])) * noise
        label = 0 if self.unconditional else int(self.labels[index])
        return {"tokens": tokens, "label": torch.tensor(label, dtype=torch.long)}
