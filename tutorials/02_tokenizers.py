# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 02 — Tokenizers
#
# Every lit_ar generator stands on a frozen tokenizer. `TokenizerSystem` trains all of them from one config
# field, `quantizer`:
#
# | quantizer | tokens | from |
# | --- | --- | --- |
# | `vq` | `(B, L)` codes of an l2-normalised (or EMA) codebook with dead-code restart | VQGAN, LlamaGen |
# | `fsq` | `(B, L)` codes of per-channel rounding to `levels` (+ optional entropy penalty) | FSQ (Mentzer et al.) |
# | `lfq` | `(B, L)` codes of binary channels with an entropy loss | MAGVIT-v2 |
# | `msvq` | a list of `(B, s*s)` codes, one per scale, residual over scales | VAR |
# | `kl` | `(B, L, D)` continuous latents | LDM / MAR's KL-16 |
#
# This tutorial
# 1. trains each tokenizer through `cli_main` (the function behind `lit_ar fit`),
# 2. compares their reconstructions and codebook usage side by side,
# 3. shows VAR's coarse-to-fine scales,
# 4. encodes the dataset once into a token cache that generators read instead of images.
#
# Set `LIT_AR_SMALL=1` to run it in seconds (the tests do): tiny models on 16x16 images for a few steps. Without
# it, each tokenizer trains with its `configs/tokenizer/<quantizer>_shapes.yaml` (64x64 shapes, 16x16 tokens,
# about 20 minutes each on 2 CPU cores).

# %%
import os
import tempfile

import matplotlib.pyplot as plt
import numpy as np
import torch

from lit_ar.callbacks import make_grid
from lit_ar.cli import cli_main
from lit_ar.data import ImageDataModule
from lit_ar.data.token_cache import TokenCache, split_scales, write_token_cache
from lit_ar.metrics import psnr
from lit_ar.tokenizers import load_tokenizer

SMALL = os.environ.get("LIT_AR_SMALL", "0") == "1"
RUN_DIR = os.environ.get("LIT_AR_RUN_DIR") or tempfile.mkdtemp(prefix="lit_ar_tutorial02_")
QUANTIZERS = ["vq", "fsq", "lfq", "msvq", "kl"]

# %% [markdown]
# ## Train the five tokenizers
# Each config pins its seed and run folder; here the run folders move under `RUN_DIR`. In TensorBoard
# (`tensorboard --logdir RUN_DIR`) each run shows `train/rec_loss`, `train/codebook_usage`, `train/perplexity`,
# `val/psnr`, `val/ssim` and, under Images, `val/reconstructions` (original and reconstruction side by side).

# %%
clis = {}
for q in QUANTIZERS:
    config = f"configs/debug/tokenizer_{q}.yaml" if SMALL else f"configs/tokenizer/{q}_shapes.yaml"
    small = ["--trainer.max_steps", "8", "--trainer.limit_val_batches", "1", "--data.num_train", "128"] if SMALL else []
    clis[q] = cli_main(
        ["fit", "--config", config, "--trainer.logger.init_args.save_dir", f"{RUN_DIR}/{q}",
         "--trainer.enable_progress_bar", "false", *small]
    )  # fmt: skip
    print(q, {k: round(float(v), 3) for k, v in clis[q].trainer.callback_metrics.items() if k.startswith("val/")})

# %% [markdown]
# ## Load them back as frozen tokenizers and compare
# `load_tokenizer(path)` is what generators call: it returns the `Autoencoder` core, frozen and in eval mode,
# with the interface every generator sizes itself from.

# %%
tokenizers = {q: load_tokenizer(f"{RUN_DIR}/{q}/checkpoints/last.ckpt") for q in QUANTIZERS}
dm = clis["vq"].datamodule
images = torch.stack([dm.val_set[i]["image"] for i in range(8)])  # (8, 3, H, W) in [-1, 1]
recs, rows = {}, []
for q, ae in tokenizers.items():
    tokens = ae.encode(images, sample=False)
    recs[q] = ae.decode(tokens)
    shape = [tuple(t.shape) for t in tokens] if isinstance(tokens, list) else tuple(tokens.shape)
    flat = torch.cat(tokens, 1) if isinstance(tokens, list) else tokens
    usage = len(flat.unique()) / ae.vocab_size if ae.vocab_size else float("nan")
    rows.append((q, ae.vocab_size, ae.grid_size, ae.latent_channels, float(psnr(recs[q], images).mean()), usage))
    print(f"{q:5s} tokens {shape}  vocab {ae.vocab_size}  grid {ae.grid_size}  latent {ae.latent_channels}")
    assert recs[q].shape == images.shape and recs[q].min() >= -1 and recs[q].max() <= 1

fig, axes = plt.subplots(2, 1, figsize=(12, 8), gridspec_kw={"height_ratios": [3, 1]})
panel = torch.cat([images, *recs.values()])  # rows: originals, then one row per quantizer
axes[0].imshow(make_grid(panel, nrow=8).permute(1, 2, 0))
axes[0].set_title("rows: original, " + ", ".join(QUANTIZERS))
axes[0].axis("off")
names = [r[0] for r in rows[:-1]]  # kl has no codebook
axes[1].bar(names, [r[5] for r in rows[:-1]])
axes[1].set_ylabel("codes used by these 8 images")
fig.savefig(f"{RUN_DIR}/quantizers.png")
for r in rows:
    print(f"{r[0]:5s} PSNR {r[4]:.1f} dB")

# %% [markdown]
# ## VAR's scales, coarse to fine
# A multi-scale tokenizer's codes are residuals: decoding the running sum `f_hat` of the first k scales gives the
# coarse-to-fine images a scale-wise generator produces. `next_scale_input` is the step a VAR sampler takes after
# predicting scale k; `teacher_forcing_inputs` builds all those inputs at once for training.

# %%
msvq = tokenizers["msvq"]
indices = msvq.encode(images[:4])  # list of (4, s*s), coarse to fine
f_hat, steps = None, []
for k in range(len(msvq.scales)):
    f_hat, next_input = msvq.quantizer.next_scale_input(k, f_hat, indices[k])
    steps.append(msvq.decode_from_fhat(f_hat))
teacher = msvq.quantizer.teacher_forcing_inputs(indices)
print("scales", msvq.scales, "teacher-forcing inputs", tuple(teacher.shape))
assert teacher.shape == (4, sum(s * s for s in msvq.scales[1:]), msvq.latent_channels)
torch.testing.assert_close(steps[-1], msvq.decode(indices))
plt.figure(figsize=(12, 4))
plt.imshow(make_grid(torch.stack(steps, 1).flatten(0, 1), nrow=len(steps)).permute(1, 2, 0))
plt.title("each row: one image decoded after scales " + ", ".join(map(str, msvq.scales)) + " (left to right)")
plt.axis("off")
plt.savefig(f"{RUN_DIR}/msvq_scales.png")

# %% [markdown]
# ## Encode the dataset once: a token cache
# Generators spend most of their time waiting for the tokenizer's encoder unless the tokens are cached (MAR's
# users cut days this way). The cache holds each image's centre crop and its mirror, and records the tokenizer's
# fingerprint: a generator whose `tokenizer_ckpt` is another tokenizer is refused. From the shell:
#
# ```bash
# python -m lit_ar.data.token_cache --tokenizer_ckpt runs/tokenizer/vq_shapes/checkpoints/last.ckpt \
#     --output caches/vq_shapes --data.dataset shapes --data.image_size 64
# lit_ar fit --config <a generator config> --data.token_cache caches/vq_shapes
# ```

# %%
ckpt = f"{RUN_DIR}/vq/checkpoints/last.ckpt"
data = ImageDataModule(**{k: dm.hparams[k] for k in ("dataset", "image_size", "num_train", "num_val")})
folder = write_token_cache(ckpt, f"{RUN_DIR}/cache_vq", data, hflip=True)
print(TokenCache(str(folder)).meta)
cached = ImageDataModule(
    dataset="shapes", image_size=dm.hparams.image_size, batch_size=8, token_cache=str(folder), shuffle=False
)
cached.setup("fit")
batch = next(iter(cached.val_dataloader()))
print({k: (tuple(v.shape), v.dtype) for k, v in batch.items()})
assert torch.equal(batch["tokens"], tokenizers["vq"].encode(images))  # the cache holds what encode returns
mirrored = torch.from_numpy(np.load(folder / "val_tokens.npy")[:8, 1].astype(np.int64))
assert torch.equal(mirrored, tokenizers["vq"].encode(images.flip(-1)))
# multi-scale caches store the scales concatenated; split_scales cuts them back
assert [t.shape[1] for t in split_scales(torch.cat(indices, 1), msvq.scales)] == [s * s for s in msvq.scales]
