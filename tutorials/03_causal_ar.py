# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 03 — Causal AR: LlamaGen, RAR, any order, speculative and parallel decoding
#
# A causal AR model predicts an image's tokens one after the other in raster order, each from the class and
# the tokens before it. lit_ar's `CausalARSystem` is LlamaGen's class-conditional GPT (a class-token prefix with a
# null class for classifier-free guidance, 2D RoPE over the token grid, RMSNorm + SwiGLU blocks, a zero-initialised
# output layer; presets GPT-B/L/XL/XXL with LlamaGen's exact layout) and, with `rar: true`, RAR's random-order
# training. This tutorial
# 1. trains a VQ tokenizer and a causal AR model on its tokens through `cli_main` (= `lit_ar fit`),
# 2. samples with and without CFG,
# 3. shows what top-k and temperature do to the samples,
# 4. times sampling on the static KV cache against recomputing the whole prefix at every token,
# 5. trains RAR and checks that, once its random-order probability has been annealed to 0, it is raster training,
# 6. trains in another generation order (RandAR's random, DAR's diagonal, PAR's region-interleaved) and samples in it,
# 7. decodes with speculative Jacobi decoding (SJD) and with LANTERN's trained drafter: fewer model calls, the same
#    distribution,
# 8. trains ARPG and decodes several tokens per model call (randomized parallel decoding),
# 9. trains LPD: position queries decoding locality-aware groups of tokens in parallel.
#
# Set `LIT_AR_SMALL=1` to run it in seconds on the debug configs (16x16 images, 4x4 tokens; the tests do). Without
# it, it trains the shapes configs (64x64 images, 16x16 tokens) and measures how often a shapes classifier
# recognises the class of the samples.

# %%
import os
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from lit_ar.callbacks import make_grid
from lit_ar.cli import cli_main
from lit_ar.systems import CausalARSystem

SMALL = os.environ.get("LIT_AR_SMALL", "0") == "1"
RUN_DIR = Path(os.environ.get("LIT_AR_RUN_DIR") or tempfile.mkdtemp(prefix="lit_ar_tutorial03_"))
QUIET = ["--trainer.enable_progress_bar", "false"]


def fit(config: str, name: str, *extra: str) -> Path:
    """`lit_ar fit --config <config>` with the run folder moved under RUN_DIR; returns the last checkpoint."""
    cli_main(["fit", "--config", config, "--trainer.logger.init_args.save_dir", str(RUN_DIR / name), *QUIET, *extra])
    return RUN_DIR / name / "checkpoints" / "last.ckpt"


def show(images: torch.Tensor, title: str, nrow: int) -> None:
    plt.figure(figsize=(6, 6 * images.shape[0] / nrow / nrow))
    plt.imshow(make_grid(images, nrow=nrow).permute(1, 2, 0))
    plt.title(title)
    plt.axis("off")


# %% [markdown]
# ## Train a tokenizer, then the generator on its tokens
# The generator's config names the tokenizer checkpoint (`model.init_args.tokenizer_ckpt`); the system loads it
# frozen and checks that its vocabulary, grid, image size and channels agree with the generator and the data.

# %%
tokenizer_config = "configs/debug/tokenizer_vq.yaml" if SMALL else "configs/tokenizer/vq_shapes.yaml"
generator_config = "configs/debug/causal.yaml" if SMALL else "configs/causal/llamagen_shapes.yaml"
tokenizer_ckpt = fit(tokenizer_config, "tokenizer")
start = time.perf_counter()
ckpt = fit(generator_config, "llamagen", "--model.init_args.tokenizer_ckpt", str(tokenizer_ckpt),
           *(["--trainer.max_steps", "60"] if SMALL else []))  # fmt: skip
train_seconds = time.perf_counter() - start
print(f"trained in {train_seconds:.0f} s")

model = CausalARSystem.load_from_checkpoint(ckpt, weights_only=True).eval()
print("preset:", model.hparams.preset, "| grid:", model.model.grid_size, "| vocab:", model.model.vocab_size,
      "| parameters:", sum(p.numel() for p in model.model.parameters()))  # fmt: skip

# %% [markdown]
# ## Samples with and without classifier-free guidance
# Each row is a class. With `cfg > 1` the batch is doubled with null-class rows and the logits are pushed away
# from the unconditional ones: `uncond + cfg * (cond - uncond)`. `cfg_schedule` ramps the scale over the tokens
# (`linear`), applies it inside an interval of them (`interval`), or follows a power-cosine. The same generator
# seed gives the same images.

# %%
per_class = 4
labels = torch.arange(model.hparams.num_classes).repeat_interleave(per_class)  # (C * per_class,)


def draw(seed: int = 0, **kw) -> torch.Tensor:
    return model.sample(labels, generator=torch.Generator().manual_seed(seed), **kw)


plain, guided = draw(), draw(cfg=3.0)
show(plain, "cfg 1 (no guidance)", per_class)
show(guided, "cfg 3", per_class)
changed = (model.generate(labels, cfg=3.0, generator=torch.Generator().manual_seed(0))
           != model.generate(labels, generator=torch.Generator().manual_seed(0))).float().mean()  # fmt: skip
print(f"guidance changed {changed:.0%} of the tokens drawn with the same seed")
assert torch.equal(guided, draw(cfg=3.0)) and not torch.equal(plain, guided)
show(draw(cfg=3.0, cfg_schedule="linear"), "cfg 1 -> 3 linearly over the tokens", per_class)

# %% [markdown]
# ## Top-k and temperature
# Temperature divides the logits; top-k keeps the k likeliest tokens at each step (top-p the smallest set reaching
# probability p). Low temperature or small k gives cleaner, more repetitive samples; high temperature noisier
# ones. We count the distinct tokens each setting uses as a crude measure of diversity.

# %%
one_class = torch.zeros(8, dtype=torch.long)
grid, diversity = [], {}
for temperature in (0.5, 1.0, 1.5):
    for top_k in (1, 8, None):
        kw = dict(temperature=temperature, top_k=top_k, cfg=2.0, generator=torch.Generator().manual_seed(0))
        tokens = model.generate(one_class, **kw)
        diversity[(temperature, top_k)] = tokens.unique().numel()
        grid.append(model.decode(tokens[:3]))
show(torch.cat(grid), "rows: (temperature, top_k) in (0.5, 1.0, 1.5) x (1, 8, all)", 9)
print("distinct tokens per setting:", diversity)
assert diversity[(1.5, None)] > diversity[(0.5, 1)]

# %% [markdown]
# ## The static KV cache
# With the cache, sampling writes the class prefix once (prefill), then feeds one token per step into
# preallocated key/value buffers: every decode step has the same shapes, so it compiles once (`compile: true`
# wraps it in `torch.compile(fullgraph=True)`) and costs the same at every position. Without it, each step
# recomputes the whole prefix. Both give the same tokens.

# %%
timing = {}
for use_cache in (True, False):
    start = time.perf_counter()
    tokens = model.generate(labels, cfg=2.0, generator=torch.Generator().manual_seed(0), use_cache=use_cache)
    timing[use_cache] = (time.perf_counter() - start, tokens)
cached, uncached = timing[True], timing[False]
print(f"{len(labels)} images: KV cache {cached[0]:.2f} s, recomputing the prefix {uncached[0]:.2f} s "
      f"({uncached[0] / cached[0]:.1f}x); {model.model.num_tokens} tokens each")  # fmt: skip
assert torch.equal(cached[1], uncached[1])

# %% [markdown]
# ## RAR: random orders, annealed to raster
# With `rar: true` each training image is permuted with probability r, which falls linearly from 1 to 0 between
# `rar_anneal_start` and `rar_anneal_end`. Every slot also gets a learned embedding of the grid position it must
# predict next (RAR's target-aware position), so the model knows what to predict in any order. Once r = 0
# the random-order forward, fed the raster order, is exactly the raster forward, and sampling is raster as above.

# %%
rar_config = "configs/debug/rar.yaml" if SMALL else "configs/causal/rar_shapes.yaml"
rar_ckpt = fit(rar_config, "rar", "--model.init_args.tokenizer_ckpt", str(tokenizer_ckpt))
rar = CausalARSystem.load_from_checkpoint(rar_ckpt, weights_only=True).eval()
h = rar.hparams
print("r at steps", [0, h.rar_anneal_start, (h.rar_anneal_start + h.rar_anneal_end) // 2, h.rar_anneal_end], ":",
      [rar.rar_ratio(s) for s in (0, h.rar_anneal_start, (h.rar_anneal_start + h.rar_anneal_end) // 2,
                                  h.rar_anneal_end)])  # fmt: skip
tokens = rar.generate(torch.arange(4), generator=torch.Generator().manual_seed(0))
raster = torch.arange(rar.model.num_tokens).expand(4, -1)
with torch.no_grad():
    assert torch.equal(rar.model(tokens[:, :-1], torch.arange(4), raster), rar.model(tokens[:, :-1], torch.arange(4)))
show(rar.decode(tokens), "RAR samples (raster order)", 4)

# %% [markdown]
# ## Any order: RandAR, DAR, PAR
# `order: random` trains each image in a fresh random order (RandAR); `diagonal` and `zigzag` are DAR's anti-diagonal
# orders, `par` PAR's region-interleaved one (the grid cut into 2x2 blocks: each block's first token in turn, then
# the same position across the blocks), `spiral` one more. Any order but raster gives the slots target-position
# queries (the target-aware embedding), since a causal model must be told which position it predicts next. Sampling
# follows the training order unless `predict_kwargs.order` names another; a model trained raster only refuses any
# other order.

# %%
from lit_ar.methods.any_order import grid_order

any_config = "configs/debug/any_order.yaml" if SMALL else "configs/causal/randar_shapes.yaml"
randar_ckpt = fit(any_config, "randar", "--model.init_args.tokenizer_ckpt", str(tokenizer_ckpt))
randar = CausalARSystem.load_from_checkpoint(randar_ckpt, weights_only=True).eval()
G = randar.model.grid_size
for name in ("diagonal", "zigzag", "par", "spiral"):
    step = torch.empty(G * G, dtype=torch.long)
    step[grid_order(name, G)] = torch.arange(G * G)  # the step at which each cell is generated
    print(f"{name}:\n{step.view(G, G)}")
for name in ("random", "diagonal", "raster"):  # a random-order model samples in any order
    show(randar.sample(torch.arange(4), order=name, generator=torch.Generator().manual_seed(0)),
         f"RandAR sampled in {name} order", 4)  # fmt: skip
try:
    model.sample(torch.arange(4), order="diagonal")
except ValueError as e:
    print("LlamaGen (raster only):", e)

# %% [markdown]
# With `parallel: true`, PAR's order is decoded PAR's way: the regions' first tokens one call at a time, then one
# token in every region per call, through learnable transition tokens and group-wise full attention.

# %%
par_ckpt = fit(any_config, "par", "--model.init_args.tokenizer_ckpt", str(tokenizer_ckpt),
               "--model.init_args.order", "par", "--model.init_args.parallel", "true")  # fmt: skip
par = CausalARSystem.load_from_checkpoint(par_ckpt, weights_only=True).eval()
calls = []
hook = par.model.layers[0].register_forward_hook(lambda *_: calls.append(1))
show(par.sample(torch.arange(4), generator=torch.Generator().manual_seed(0)), "PAR, parallel groups", 4)
hook.remove()
print(f"PAR: {len(calls)} model calls for {par.model.num_tokens} tokens")

# %% [markdown]
# ## Speculative Jacobi decoding: fewer calls, the same distribution
# `decoding: sjd` reads a window of `window` tokens per call: the last accepted token and drafts after it. A draft is
# accepted with probability min(1, p/q) (p the model's distribution given the accepted tokens, q the one the draft
# was drawn from); at the first rejection the token comes from the residual max(p - q, 0), so every token keeps the
# model's distribution, at any temperature, without retraining. The drafts are the Jacobi iteration: redrawn from
# the last call's p where it reached. Each image accepts its own number of tokens per call. Greedy (`top_k: 1`), SJD
# gives exactly the raster tokens; `benchmarks/fewer_calls.py` measures calls and speed, docs/fewer_calls.md holds
# the figures.

# %%
for kw in (dict(top_k=1), dict(cfg=2.0)):
    stats, seeded = {}, torch.Generator().manual_seed(0)
    sjd = model.run_sampler(labels, seeded, dict(kw, decoding="sjd", window=8), stats=stats)
    calls = stats["model_calls"].float().mean().item()
    print(f"{kw}: SJD {calls:.1f} model calls per image against {model.model.num_tokens} sequential "
          f"({stats['tokens_per_call'].mean():.2f} tokens per call)")  # fmt: skip
    if kw == dict(top_k=1):
        assert torch.equal(sjd, model.generate(labels, top_k=1))
show(model.decode(sjd), "SJD samples (cfg 2)", per_class)

# %% [markdown]
# SJD's drafts are the model's own guesses from the last call. LANTERN trains a small drafter instead (EAGLE's
# design: one block that reads the model's last state and the token just drawn, and predicts the next state, read by
# the model's own head). `drafter_only: true` trains it alone on the frozen model, here from the checkpoint above;
# `decoding: speculative` then verifies its drafts with the same rule, so the distribution is the model's.

# %%
drafter_ckpt = fit(generator_config, "drafter", "--model.init_args.tokenizer_ckpt", str(tokenizer_ckpt),
                   "--model.init_args.drafter", "true", "--model.init_args.drafter_only", "true",
                   "--model.init_args.init_weights", str(ckpt),
                   *(["--trainer.max_steps", "60"] if SMALL else []))  # fmt: skip
drafted = CausalARSystem.load_from_checkpoint(drafter_ckpt, weights_only=True).eval()
for decoding in ("sjd", "speculative"):
    stats = {}
    drafted.run_sampler(labels, torch.Generator().manual_seed(0), dict(cfg=2.0, decoding=decoding, window=6),
                        stats=stats)  # fmt: skip
    print(f"{decoding}, window 6: {stats['model_calls'].float().mean():.1f} model calls per image")

# %% [markdown]
# ## ARPG: several tokens per model call
# ARPG splits the network in two: causal self-attention over the tokens generated so far (in a random order), whose
# output gives one set of keys and values, and cross-attention blocks whose queries are all one mask-token embedding,
# told apart by the rotary encoding of the position each must predict. A query sees only the tokens before it, so
# several positions can be asked for at once: `steps` model calls decode the whole grid (`schedule: arccos` says how
# many tokens each step takes). One token per step is random-order sequential decoding.

# %%
from lit_ar.systems import ARPGSystem

arpg_config = "configs/debug/arpg.yaml" if SMALL else "configs/causal/arpg_shapes.yaml"
arpg = ARPGSystem.load_from_checkpoint(fit(arpg_config, "arpg", "--model.init_args.tokenizer_ckpt",
                                           str(tokenizer_ckpt)), weights_only=True).eval()  # fmt: skip
L = arpg.model.num_tokens
for steps in (L, L // 4):
    start = time.perf_counter()
    images = arpg.sample(labels, steps=steps, generator=torch.Generator().manual_seed(0))
    print(f"ARPG, {steps} model calls for {L} tokens: {time.perf_counter() - start:.2f} s for {len(labels)} images")
show(images, f"ARPG samples in {L // 4} steps", per_class)

# %% [markdown]
# ## LPD: position queries, locality-aware groups
# LPD keeps LlamaGen's one causal network and adds *position queries*: one learned mask-query embedding plus the
# target's position embedding, rotated by the target's RoPE. A step feeds the group generated last and the queries of
# the next group; the queries see the generated tokens and each other (tokens decoded together stay consistent), and
# no generated token ever sees a query. Training draws a group-size schedule per step (`train_steps`), so one model
# samples at any of those step counts. Its order is locality-aware: each group's positions touch what is generated
# and keep apart from each other (`order: lpd`; `random` and `raster` for comparison).

# %%
from lit_ar.methods.lpd import lpd_order
from lit_ar.sampling import tokens_to_reveal
from lit_ar.systems import LPDSystem

lpd_config = "configs/debug/lpd.yaml" if SMALL else "configs/causal/lpd_shapes.yaml"
lpd = LPDSystem.load_from_checkpoint(fit(lpd_config, "lpd", "--model.init_args.tokenizer_ckpt", str(tokenizer_ckpt)),
                                     weights_only=True).eval()  # fmt: skip
L, side = lpd.model.num_tokens, lpd.model.grid_size
counts = tokens_to_reveal("cosine", L, L // 4)
step_of = torch.empty(L, dtype=torch.long)
step_of[lpd_order(side, counts, 1, torch.Generator().manual_seed(0))[0]] = torch.repeat_interleave(
    torch.arange(len(counts)), torch.tensor(counts))  # fmt: skip
print(f"group sizes {counts}; the step that decodes each cell:\n{step_of.view(side, side)}")
for order in ("lpd", "random"):
    images = lpd.sample(labels, steps=L // 4, order=order, generator=torch.Generator().manual_seed(0))
    show(images, f"LPD samples in {L // 4} steps, {order} order", per_class)

# %% [markdown]
# ## Do the samples show their class?
# A classifier trained on real shapes (tutorial 01's) labels the samples; the fraction it labels with the class
# they were sampled for is the class accuracy. What a method reaches at a given budget is measured by the
# leaderboard under one protocol (`python -m benchmarks.leaderboard`, docs/leaderboard.md), not here.

# %%
classifier_config = "configs/debug/classifier.yaml" if SMALL else "configs/classifier/shapes.yaml"
from lit_ar.systems import ClassifierSystem

classifier_ckpt = fit(classifier_config, "classifier", *(["--trainer.max_steps", "10"] if SMALL else []))
classifier = ClassifierSystem.load_from_checkpoint(classifier_ckpt, weights_only=True).eval()
n = 2 if SMALL else 50
eval_labels = torch.arange(model.hparams.num_classes).repeat_interleave(n)
with torch.no_grad():
    images = torch.cat([model.sample(chunk, cfg=2.0, generator=torch.Generator().manual_seed(i))
                        for i, chunk in enumerate(eval_labels.split(100))])  # fmt: skip
    predicted = classifier(images).argmax(-1)
accuracy = (predicted == eval_labels).float().mean().item()
print(f"class accuracy of {len(eval_labels)} samples (cfg 2): {accuracy:.1%} (generator trained {train_seconds:.0f} s)")
