"""Token and latent caches: encode a dataset once with a frozen tokenizer, serve the codes instead of images.

    python -m lit_ar.data.token_cache --tokenizer_ckpt runs/tokenizer/vq_shapes/checkpoints/last.ckpt \\
        --output caches/vq_shapes --data.dataset shapes --data.image_size 64
    lit_ar fit --config configs/<generator>.yaml --data.token_cache caches/vq_shapes

Every image is encoded at its centre crop and, with `hflip`, mirrored (variant 1), as MAR caches its latents. With
`crops="ten"`, as LlamaGen's `extract_codes_c2i.py --ten-crop` does: the image resized by `data.resize_scale`
(LlamaGen's crop range, 1.1), then its centre and four corner crops, each also mirrored with `hflip` (10 variants).
Training picks one variant per sample at random (among the unmirrored ones when the datamodule's `hflip` is off);
validation takes the centre crop.

The folder's format, and its reading side (what `data.token_cache` serves), are `lit_ar.data.cached_tokens`.
"""

import json
from pathlib import Path

import numpy as np
import torch
from jsonargparse import ActionConfigFile, ArgumentParser
from torch.utils.data import DataLoader

# TokenCache and split_scales: imported from here by name too (tests, tutorials written before the reading side moved)
from lit_ar.data.cached_tokens import CACHE_VERSION, META, TokenCache, split_scales, tokenizer_fingerprint  # noqa: F401
from lit_ar.data.datamodule import ImageDataModule
from lit_ar.data.transforms import ImageTransform, TransformedDataset
from lit_ar.tokenizers import load_tokenizer

CROPS = ("center", "ten")
FIVE_CROPS = ("center", "top_left", "top_right", "bottom_left", "bottom_right")  # variant 0 is the centre


def five_crops(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    """(B, C, H, W) -> the centre and four corner crops (B, C, size, size), in FIVE_CROPS order (the centre offset
    rounds as torchvision's TenCrop, which LlamaGen's ten-crop codes use)."""
    H, W = x.shape[-2:]
    top, left = int(round((H - size) / 2.0)), int(round((W - size) / 2.0))
    corners = [(top, left), (0, 0), (0, W - size), (H - size, 0), (H - size, W - size)]
    return [x[..., i : i + size, j : j + size] for i, j in corners]


@torch.no_grad()
def write_token_cache(
    tokenizer_ckpt: str, output: str, data, hflip: bool = True, batch_size: int = 64, device: str = "cpu",
    crops: str = "center",
) -> Path:  # fmt: skip
    """Encode `data` (an ImageDataModule; its train and validation splits at the centre crop, or with crops="ten" at
    five crops of the image enlarged by data.resize_scale) with the tokenizer checkpoint into `output`, each view
    also mirrored with `hflip`. Returns the cache folder."""
    ae = load_tokenizer(tokenizer_ckpt).to(device)
    h = data.hparams
    if (h.image_size, h.channels) != (ae.image_size, ae.channels):
        raise ValueError(
            f"data.image_size={h.image_size}, data.channels={h.channels} differ from the tokenizer's "
            f"{ae.image_size}x{ae.image_size}x{ae.channels} ({tokenizer_ckpt}); encode at the tokenizer's resolution"
        )
    if crops not in CROPS:
        raise ValueError(f"crops={crops!r} is not known; use one of {CROPS}")
    enlarged = max(h.image_size, round(h.image_size * h.resize_scale))
    if crops == "ten" and enlarged == h.image_size:
        raise ValueError(
            f"crops='ten' with data.resize_scale={h.resize_scale} gives five identical crops of a "
            f"{h.image_size}x{h.image_size} image; set data.resize_scale above 1 (LlamaGen's crop range: 1.1)"
        )
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / META).unlink(missing_ok=True)  # a half-written cache has no meta and is refused
    if crops == "ten":  # the whole enlarged square; its five crops are cut per batch below
        transform = ImageTransform(enlarged, h.channels, 1.0, "center", False)
        names = list(FIVE_CROPS)
    else:
        transform = ImageTransform(h.image_size, h.channels, h.resize_scale, "center", False)
        names = ["center"]
    names += [f"{n}_hflip" for n in names] if hflip else []
    splits = {}
    for split, source in (("train", data.splits.train), ("val", data.splits.val)):
        dataset = TransformedDataset(source, transform, h.unconditional)
        n, arrays = len(dataset), None
        labels = np.lib.format.open_memmap(folder / f"{split}_labels.npy", "w+", np.int64, (n,))
        start = 0
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=h.num_workers):
            x, b = batch["image"].to(device), len(batch["label"])
            views = five_crops(x, h.image_size) if crops == "ten" else [x]  # [(b, C, size, size)]
            views += [v.flip(-1) for v in views] if hflip else []
            if ae.is_continuous:
                per_view = [ae.quantizer.moments(ae.quant_conv(ae.encoder(v))) for v in views]
                mean = torch.stack([m.flatten(2).transpose(1, 2) for m, _ in per_view], 1)  # (b, V, L, D)
                std = torch.stack([lv.mul(0.5).exp().flatten(2).transpose(1, 2) for _, lv in per_view], 1)
                out = {"mean": mean * ae.quantizer.scale_factor, "std": std * ae.quantizer.scale_factor}
            else:
                codes = [ae.encode(v) for v in views]
                codes = [torch.cat(c, 1) if isinstance(c, list) else c for c in codes]  # (b, L_total)
                out = {"tokens": torch.stack(codes, 1)}  # (b, V, L_total)
            if arrays is None:
                dtype = {"tokens": np.uint16 if (ae.vocab_size or 0) <= 2**16 else np.int32}
                arrays = {
                    k: np.lib.format.open_memmap(
                        folder / f"{split}_{k}.npy", "w+", dtype.get(k, np.float32), (n, *v.shape[1:])
                    )
                    for k, v in out.items()
                }
            for k, v in out.items():
                arrays[k][start : start + b] = v.cpu().numpy()
            labels[start : start + b] = batch["label"].numpy()
            start += b
        for array in [*arrays.values(), labels]:
            array.flush()
        splits[split] = n
    meta = {
        "version": CACHE_VERSION,
        "tokenizer_fingerprint": tokenizer_fingerprint(ae),
        "tokenizer_ckpt": str(tokenizer_ckpt),
        "quantizer": ae.quantizer_type,
        "vocab_size": ae.vocab_size,
        "grid_size": ae.grid_size,
        "scales": list(ae.scales) if ae.scales else None,
        "latent_channels": ae.latent_channels,
        "is_continuous": ae.is_continuous,
        "image_size": ae.image_size,
        "channels": ae.channels,
        "num_classes": data.num_classes,
        "variants": names,
        "resize_scale": h.resize_scale,
        "splits": splits,
        "data": {k: h[k] for k in ("dataset", "data_dir", "data_files", "split_seed", "num_train", "num_val")},
    }
    (folder / META).write_text(json.dumps(meta, indent=2))
    return folder


def main(args: list[str] | None = None) -> Path:
    """`python -m lit_ar.data.token_cache --tokenizer_ckpt CKPT --output DIR [--data.* ...]`."""
    parser = ArgumentParser(description="Encode a dataset once with a frozen tokenizer into a token cache.")
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--tokenizer_ckpt", type=str, required=True, help="TokenizerSystem checkpoint.")
    parser.add_argument("--output", type=str, required=True, help="Cache folder to write.")
    parser.add_argument("--hflip", type=bool, default=True, help="Also encode each view mirrored.")
    crops_help = ("center: the centre crop; ten: LlamaGen's ten-crop, the centre and four corners of the image "
                  "enlarged by --data.resize_scale (e.g. 1.1), each also mirrored with --hflip.")  # fmt: skip
    parser.add_argument("--crops", type=str, default="center", choices=CROPS, help=crops_help)
    parser.add_argument("--batch_size", type=int, default=64, help="Encoding batch size.")
    parser.add_argument("--device", type=str, default="cpu", help="Device to encode on, e.g. cuda.")
    parser.add_class_arguments(ImageDataModule, "data")
    cfg = parser.parse_args(args)
    data = parser.instantiate_classes(cfg).data
    folder = write_token_cache(cfg.tokenizer_ckpt, cfg.output, data, cfg.hflip, cfg.batch_size, cfg.device, cfg.crops)
    print(f"token cache written to {folder}: {json.loads((folder / META).read_text())['splits']}")
    return folder


if __name__ == "__main__":
    main()
