# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 04 — Masked AR: MaskGIT's parallel decoding
#
# A causal model (tutorial 03) writes the L tokens of an image one at a time: L forward passes. MaskGIT trains a
# *bidirectional* transformer to fill in randomly masked tokens, then generates an image in a handful of steps:
# start from an all-masked grid, predict every position at once, keep the most confident predictions, re-mask
# the rest, repeat. This tutorial
# 1. trains a tokenizer, the masked model and a classifier through `cli_main` (the function behind `lit_ar fit`),
# 2. shows *where* each step reveals tokens (MaskGIT's confidence order vs MAR's random order),
# 3. measures the trade-off the method is about: decoding steps against sample quality (class accuracy of the
#    samples, judged by the classifier) and speed (images/s).
#
# Set `LIT_AR_SMALL=1` to run it in seconds on a CPU (the tests do); the numbers are then those of a model
# trained for a few seconds, so only the speed curve is meaningful.

# %%
import os
import tempfile
import time

import matplotlib.pyplot as plt
import torch

from lit_ar.callbacks import make_grid
from lit_ar.cli import cli_main
from lit_ar.sampling import MASK_SCHEDULES, mask_ratio
from lit_ar.systems import ClassifierSystem, MaskedARSystem

SMALL = os.environ.get("LIT_AR_SMALL", "0") == "1"
RUN_DIR = os.environ.get("LIT_AR_RUN_DIR") or tempfile.mkdtemp(prefix="lit_ar_tutorial04_")


def fit(config: str, name: str, *extra: str) -> str:
    """`lit_ar fit --config <config>` with the run folder moved under RUN_DIR; returns the last checkpoint."""
    run = os.path.join(RUN_DIR, name)
    cli_main(["fit", "--config", config, "--trainer.logger.init_args.save_dir", run,
              "--trainer.enable_progress_bar", "false", *extra])  # fmt: skip
    return os.path.join(run, "checkpoints", "last.ckpt")


# %% [markdown]
# ## Train: tokenizer, masked transformer, classifier
# The masked model is trained on the tokenizer's codes: every sample draws a mask ratio `cos(pi/2 * u)`,
# `u ~ U(0, 1)` (the `mask_schedule`), that many tokens are replaced by the mask token, and the loss is the
# cross-entropy on the masked positions only. `val/token_acc` is the accuracy on masked positions.


# %%
def quick(steps: int) -> list[str]:
    return ["--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "1"] if SMALL else []


tokenizer = fit("configs/debug/tokenizer_vq.yaml" if SMALL else "configs/tokenizer/vq_shapes.yaml", "tokenizer",
                *quick(8))  # fmt: skip
masked_ckpt = fit("configs/debug/masked.yaml" if SMALL else "configs/masked/maskgit_shapes.yaml", "masked",
                  "--model.init_args.tokenizer_ckpt", tokenizer, *quick(12))  # fmt: skip
classifier_ckpt = fit("configs/debug/classifier.yaml" if SMALL else "configs/classifier/shapes.yaml", "classifier",
                      *quick(10))  # fmt: skip

model = MaskedARSystem.load_from_checkpoint(masked_ckpt, weights_only=True).eval()
judge = ClassifierSystem.load_from_checkpoint(classifier_ckpt, weights_only=True).eval()
L = model.model.num_tokens
print(f"{model.model.grid_size}x{model.model.grid_size} = {L} tokens, vocabulary {model.model.vocab_size}")

# %% [markdown]
# ## The mask schedule
# After step `s` of `S`, a fraction `mask_ratio((s + 1) / S)` of the tokens is still masked. Cosine (MaskGIT's
# choice) reveals few tokens first, when the model knows least, and many at the end.

# %%
r = torch.linspace(0, 1, 101)
fig, ax = plt.subplots(figsize=(4, 3))
for name in MASK_SCHEDULES:
    ax.plot(r, mask_ratio(name, r), label=name)
ax.set_xlabel("decoding progress")
ax.set_ylabel("fraction still masked")
ax.legend()

# %% [markdown]
# ## Where each step reveals tokens
# `generate(..., return_trace=True)` returns the grid before every step. Below, each position is coloured by the
# step that revealed it. In MaskGIT's *confidence* order the model picks its surest predictions (plus Gumbel noise
# whose temperature `choice_temperature` cools to 0 over the steps); in MAR's *random* order the positions come
# from a seeded random permutation, whatever the model thinks.

# %%
labels = torch.arange(4)
fig, axes = plt.subplots(2, 4, figsize=(9, 4.5))
for row, order in enumerate(["confidence", "random"]):
    g = torch.Generator().manual_seed(0)
    tokens, trace = model.generate(labels, steps=8, order=order, generator=g, return_trace=True)
    masked = trace["masked"]  # (steps + 1, B, L): True = still masked
    revealed_at = (masked[:-1] & ~masked[1:]).float().argmax(0)  # (B, L): the step that revealed each token
    assert (masked[1:] <= masked[:-1]).all() and not masked[-1].any()  # never re-masked; all revealed at the end
    for b in range(4):
        ax = axes[row, b]
        ax.imshow(revealed_at[b].view(model.model.grid_size, -1), cmap="viridis", vmin=0, vmax=7)
        ax.set_title(f"{order}, class {b}", fontsize=8)
        ax.axis("off")
fig.suptitle("step at which each token was revealed (8 steps)")

# %% [markdown]
# ## Steps against quality and speed
# More steps mean more forward passes (each over the whole grid) and fewer tokens decided at once. Quality here
# is the class accuracy of class-conditional samples as judged by the classifier (what MaskGIT reaches at a
# budget: docs/leaderboard.md); speed is images/s of the whole `sample()` call, decoding included.

# %%
steps_list = [1, 2, 4, 8, 16] if SMALL else [1, 2, 4, 8, 12, 16, 32]
steps_list = [s for s in steps_list if s <= L]
n_per_class = 2 if SMALL else 20
eval_labels = torch.arange(model.hparams.num_classes).repeat_interleave(n_per_class)
results, grids = [], {}
model.sample(eval_labels[:2], steps=1)  # warm-up: the first call pays one-off costs
for steps in steps_list:
    seconds = float("inf")
    for _ in range(2):  # best of two: timings on a shared machine are noisy
        g = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        with torch.no_grad():
            images = model.sample(eval_labels, steps=steps, cfg=2.0, cfg_schedule="linear", generator=g)
        seconds = min(seconds, time.perf_counter() - start)
    with torch.no_grad():
        accuracy = (judge(images).argmax(-1) == eval_labels).float().mean().item()
    results.append({"steps": steps, "images/s": len(eval_labels) / seconds, "accuracy": accuracy})
    grids[steps] = images[::n_per_class][:8]
    print(results[-1])

fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3))
a1.plot([r["steps"] for r in results], [r["accuracy"] for r in results], marker="o")
a1.set_xscale("log", base=2)
a1.set_xlabel("decoding steps")
a1.set_ylabel("class accuracy of samples")
a2.plot([r["steps"] for r in results], [r["images/s"] for r in results], marker="o", color="C1")
a2.set_xscale("log", base=2)
a2.set_xlabel("decoding steps")
a2.set_ylabel("images/s")
fig.tight_layout()
assert results[0]["images/s"] > results[-1]["images/s"], "one step is faster than many"
assert all(0.0 <= r["accuracy"] <= 1.0 for r in results)

# %% [markdown]
# The samples, one row per step count (first images of the first classes):

# %%
fig, axes = plt.subplots(len(grids), 1, figsize=(8, 1.4 * len(grids)))
for ax, (steps, images) in zip(axes, grids.items()):
    ax.imshow(make_grid(images, nrow=8).permute(1, 2, 0))
    ax.set_title(f"{steps} steps", fontsize=8)
    ax.axis("off")
fig.tight_layout()

# %% [markdown]
# ## From the command line
# Every setting of `sample()` is a `predict_kwargs` entry, so the same sweep is a loop over
# `lit_ar predict --config configs/masked/maskgit_shapes.yaml --ckpt_path <last.ckpt>
# --model.init_args.predict_kwargs '{steps: 8, cfg: 2.0, order: random}'`, which writes `samples.npz` and
# `grid.png` into the run folder.
