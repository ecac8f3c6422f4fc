# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 05 — Scale-wise AR: VAR's next-scale prediction
#
# VAR (Tian et al. 2024) does not predict an image token by token. Its tokenizer, a multi-scale residual VQ, writes
# the latent map as a pyramid of K token maps, 1x1, 2x2, ..., 16x16, each coding what the coarser ones left out.
# The transformer predicts the pyramid one *scale* at a time: all s_k x s_k tokens of scale k at once, from the
# class and the scales below. So an image costs K = 10 forward passes instead of 256, and each is a wide
# batch-parallel one. lit_ar's `ScaleARSystem` is VAR's layout on the shared layers (AdaLN on the class,
# cosine attention, learned position and level embeddings; `depth: 16` is VAR-d16, 310M parameters). This tutorial
# 1. trains a multi-scale VQ tokenizer and a VAR model on its tokens through `cli_main` (= `lit_ar fit`),
# 2. shows the block-causal attention mask that makes one training forward predict every scale,
# 3. samples coarse to fine and shows the image after each scale,
# 4. compares sampling speed with the causal (raster, token-by-token) family at the same size.
#
# Set `LIT_AR_SMALL=1` to run it in seconds on the debug configs (16x16 images, scales 1,2,3,4; the tests do).
# Without it, it trains the shapes configs (64x64 images, scales 1..16).

# %%
import os
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from lit_ar.callbacks import make_grid
from lit_ar.cli import cli_main
from lit_ar.systems import ScaleARSystem

SMALL = os.environ.get("LIT_AR_SMALL", "0") == "1"
RUN_DIR = Path(os.environ.get("LIT_AR_RUN_DIR") or tempfile.mkdtemp(prefix="lit_ar_tutorial05_"))
QUIET = ["--trainer.enable_progress_bar", "false"]


def fit(config: str, name: str, *extra: str) -> Path:
    """`lit_ar fit --config <config>` with the run folder moved under RUN_DIR; returns the last checkpoint."""
    cli_main(["fit", "--config", config, "--trainer.logger.init_args.save_dir", str(RUN_DIR / name), *QUIET, *extra])
    return RUN_DIR / name / "checkpoints" / "last.ckpt"


def show(images: torch.Tensor, title: str, nrow: int) -> None:
    plt.figure(figsize=(nrow, images.shape[0] / nrow * 1.1))
    plt.imshow(make_grid(images, nrow=nrow).permute(1, 2, 0))
    plt.title(title)
    plt.axis("off")


# %% [markdown]
# ## Train the multi-scale tokenizer, then VAR on its pyramids
# The generator's config names the tokenizer checkpoint (`model.init_args.tokenizer_ckpt`). The system loads it
# frozen, refuses a tokenizer without scales (a plain VQ, FSQ, ...), and takes its vocabulary, code width and
# scales (given `scales` must match them).

# %%
tokenizer_config = "configs/debug/tokenizer_msvq.yaml" if SMALL else "configs/tokenizer/msvq_shapes.yaml"
generator_config = "configs/debug/scale.yaml" if SMALL else "configs/scale/var_shapes.yaml"
tokenizer_ckpt = fit(tokenizer_config, "tokenizer", *(["--trainer.max_steps", "12"] if SMALL else []))
start = time.perf_counter()
ckpt = fit(generator_config, "var", "--model.init_args.tokenizer_ckpt", str(tokenizer_ckpt))
print(f"trained in {time.perf_counter() - start:.0f} s")

model = ScaleARSystem.load_from_checkpoint(ckpt, weights_only=True).eval()
scales = model.scales
print("scales:", scales, "| tokens:", model.model.seq_len, "| vocab:", model.model.vocab_size,
      "| parameters:", sum(p.numel() for p in model.model.parameters()))  # fmt: skip

# %% [markdown]
# ## One forward predicts every scale: the block-causal mask
# In training the whole pyramid is one sequence: the start token (class embedding + a learned start position)
# for scale 1, then for each scale k+1 the tokenizer's cumulative latent after scales 1..k, downsampled to
# s_{k+1} x s_{k+1} (teacher forcing). Each token may attend to every token of its own scale and of the coarser
# ones (white below), never to a finer one: the logits of scale k only depend on what sampling will have when it
# predicts scale k.

# %%
mask = model.model.attn_mask.cpu()
levels = model.model.levels.cpu()
plt.figure(figsize=(4, 4))
plt.imshow(mask, cmap="gray")
plt.title("block-causal mask (row attends to column)")
assert torch.equal(mask, levels[:, None] >= levels[None, :])

# %% [markdown]
# ## Coarse to fine
# Sampling runs the K scales with a KV cache per block: each step writes a whole scale's keys and values and
# attends to those of the coarser scales. The sampled indices go back through the tokenizer's quantizer
# (`next_scale_input`, the function that also builds the training inputs) to make the next scale's input.
# `return_scales=True` also decodes the cumulative latent after each scale: every row below is one sample, and
# the columns are scales 1..K. Guidance ramps linearly over the scales (`cfg_schedule="linear"`, VAR's choice:
# no guidance on the first scale, full `cfg` on the last); `cfg_schedule="constant"` keeps it fixed.

# %%
labels = torch.arange(min(model.hparams.num_classes, 6))
images, per_scale = model.sample(labels, cfg=2.0, top_p=0.95, generator=torch.Generator().manual_seed(0),
                                 return_scales=True)  # fmt: skip
steps = torch.stack(per_scale, dim=1).flatten(0, 1)  # (B * K, C, H, W): row b holds sample b after each scale
show(steps, f"each row: one sample after scales {scales}", nrow=len(scales))
assert len(per_scale) == len(scales) and torch.equal(per_scale[-1], images)
change = [(per_scale[k + 1] - per_scale[k]).abs().mean().item() for k in range(len(scales) - 1)]
print("mean change each scale adds:", [round(c, 3) for c in change])

# %%
same = model.sample(labels, cfg=2.0, top_p=0.95, generator=torch.Generator().manual_seed(0))
assert torch.equal(same, images), "the same seed gives the same images"
show(images, "cfg 2 (linear ramp), top-p 0.95", nrow=len(labels))

# %% [markdown]
# ## Speed against the causal family
# A raster model at the same size needs one forward pass per token (plus its KV cache); VAR one per scale. We build
# a causal model of about the same parameter count for the same final token grid and time both samplers (with
# CFG, token generation only, no decoding). `python -m benchmarks.scale_ar` does this at larger sizes and for
# VAR-d16 against VAR's own sampler.

# %%
try:
    from lit_ar.systems import CausalARSystem
except ImportError:  # the causal family is a separate branch until it is merged
    CausalARSystem = None

var_params = sum(p.numel() for p in model.model.parameters())
grid, vocab, width = scales[-1], model.model.vocab_size, model.model.dim
batch = torch.arange(8) % model.hparams.num_classes


def seconds(fn) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


var_s = seconds(lambda: model.sample_tokens(batch, cfg=2.0, generator=torch.Generator().manual_seed(0)))
print(f"VAR: {len(scales)} forward passes, {len(batch) / var_s:.1f} images/s ({var_params:,} parameters)")
if CausalARSystem is not None:
    best = None  # same width, as many layers as gets closest to VAR's parameter count
    for n_layer in range(1, 8 * model.model.depth):
        torch.manual_seed(0)
        candidate = CausalARSystem(vocab_size=vocab, grid_size=grid, dim=width, depth=n_layer, n_heads=4,
                                   image_size=model.hparams.image_size)  # fmt: skip
        gap = abs(sum(p.numel() for p in candidate.model.parameters()) - var_params)
        if best is not None and gap > best[0]:
            break
        best = (gap, candidate)
    causal = best[1].eval()
    causal_params = sum(p.numel() for p in causal.model.parameters())
    causal_s = seconds(lambda: causal.generate(batch, cfg=2.0, generator=torch.Generator().manual_seed(0)))
    print(f"causal: {grid * grid} forward passes, {len(batch) / causal_s:.1f} images/s ({causal_params:,} "
          f"parameters); VAR is {causal_s / var_s:.1f}x faster")  # fmt: skip
    assert len(scales) < grid * grid
else:
    print("the causal family (lit_ar.systems.CausalARSystem) is not installed in this checkout")
