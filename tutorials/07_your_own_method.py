# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 07 — Your own method: raster AR in a spiral order
#
# A generator in lit_ar is a **core** (the network), a **head** (what turns the core's output into a token), a
# **method** (the training draw and the sampling loop, in plain torch) and a **guidance** object, behind a thin
# LightningModule. A new generation method is usually a new method over an existing core and head. This tutorial
# 1. writes one: next-token AR in a fixed spiral order (from the top-left corner inwards, clockwise) instead of
#    raster order, on LlamaGen's core (`CausalTransformer`) and the categorical head, in under 100 lines;
# 2. checks its degenerate setting: with the identity order it is raster decoding, token for token;
# 3. trains it on `digits` through the CLI (`cli_main` = `lit_ar fit`), exactly as a shipped family;
# 4. puts it on the leaderboard beside LlamaGen, under the same budget and protocol.
#
# `docs/adding_a_method.md` says where each piece goes in the package and what a method owes (tests, parity, a
# leaderboard row). Set `LIT_AR_SMALL=1` to run it in seconds on the debug configs (the tests do).

# %%
import math
import os
import sys
import tempfile
import types
from pathlib import Path

import torch

from benchmarks.leaderboard import Method, register, run, unregister
from lit_ar.cli import cli_main
from lit_ar.draws import Draws
from lit_ar.guidance import Guidance
from lit_ar.methods.raster import RasterAR, RasterSampling
from lit_ar.models.categorical_head import CategoricalHead
from lit_ar.models.causal_ar import CausalTransformer
from lit_ar.systems import CausalARSystem

SMALL = os.environ.get("LIT_AR_SMALL", "0") == "1"
RUN_DIR = Path(os.environ.get("LIT_AR_RUN_DIR") or tempfile.mkdtemp(prefix="lit_ar_tutorial07_"))

# %% [markdown]
# ## 1. The method
# `RasterAR` (`lit_ar/methods/raster.py`) already holds what a fixed order needs: its training draw returns the
# tokens in the order they are predicted and that order, and the core places each fed token at its grid position
# (2D RoPE) through its `order` argument. A spiral method changes the order of the training draw and writes its
# own sampling loop. The loop recomputes the prefix at every token: the static KV cache of `CausalTransformer`
# rotates each slot by its raster position, so a cached spiral loop needs a cache keyed by the order (what the
# any-order methods add). Guidance is the object's: `rows` stacks the null class under CFG, `twice` doubles the fed
# tokens, and the head combines the two halves, filters and samples.


# %%
def spiral_order(side: int) -> torch.Tensor:
    """The grid positions (row * side + col) of a clockwise spiral from the top-left corner inwards: (side**2,)."""
    top, left, bottom, right, order = 0, 0, side - 1, side - 1, []
    while top <= bottom and left <= right:
        order += [top * side + c for c in range(left, right + 1)]
        order += [r * side + right for r in range(top + 1, bottom + 1)]
        if top < bottom:
            order += [bottom * side + c for c in range(right - 1, left - 1, -1)]
        if left < right:
            order += [r * side + left for r in range(bottom - 1, top, -1)]
        top, left, bottom, right = top + 1, left + 1, bottom - 1, right - 1
    return torch.tensor(order)


class SpiralAR(RasterAR):
    """Next-token AR in a fixed order of the grid (default: the spiral). Training: teacher forcing in that order.
    Sampling: one token a step in that order, the whole prefix recomputed each step."""

    def __init__(self, order_fn=spiral_order):
        super().__init__()
        self.order_fn = order_fn

    def train_inputs(self, tokens, draws):
        B, L = tokens.shape
        order = self.order_fn(math.isqrt(L)).to(tokens.device).expand(B, L)  # (B, L) grid position of each step
        ordered = tokens.gather(1, order)  # (B, L) the tokens in the order they are predicted
        return ordered[:, :-1], order, ordered

    @torch.no_grad()
    def sample(self, core, head, labels, guidance, settings, generator=None, **unused):
        B, L = labels.shape[0], core.num_tokens
        rows = guidance.rows(labels)  # (B,) or (2B,) [labels; null class]
        order = self.order_fn(core.grid_size).to(labels.device)  # (L,)
        seq = labels.new_zeros(B, 0)  # (B, i): the tokens so far, in the order
        for i in range(L):
            logits = core(guidance.twice(seq), rows, order.expand(rows.shape[0], L))[:, -1]  # (B', V)
            token = head.sample_logits(head.guided_logits(logits, guidance, i / L), settings, generator)  # (B,)
            seq = torch.cat([seq, token[:, None]], dim=1)
        return torch.empty_like(seq).scatter_(1, order.expand(B, L), seq)  # (B, L) back in raster positions


class SpiralARSystem(CausalARSystem):
    """LlamaGen's system with the spiral method: every setting, the tokenizer contract, the optimizer, predict and
    test are CausalARSystem's."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.method = SpiralAR()


# In a project of your own these classes live in a file on the Python path (e.g. `my_methods.py`), and configs name
# them by import path. Here the notebook registers its cell as that module.
my_methods = types.ModuleType("my_methods")
for cls in (SpiralAR, SpiralARSystem):
    cls.__module__ = "my_methods"
    setattr(my_methods, cls.__name__, cls)
sys.modules["my_methods"] = my_methods
print(spiral_order(4).argsort().view(4, 4))  # the step at which each position of a 4x4 grid is drawn

# %% [markdown]
# ## 2. Parity: the identity order is raster decoding
# The degenerate setting of a new method must reduce to an existing one. With the identity order, `SpiralAR`'s
# training loss is `RasterAR`'s and its samples are raster decoding's (`use_cache=False`, the same recomputation),
# draw for draw, with and without guidance.

# %%
torch.manual_seed(0)
core = CausalTransformer(vocab_size=16, grid_size=4, num_classes=3, dim=32, depth=2, n_heads=2).eval()
with torch.no_grad():
    for p in core.parameters():
        p.normal_(0.0, 0.3)
head, labels = CategoricalHead(core), torch.tensor([0, 1, 2])
identity = SpiralAR(order_fn=lambda side: torch.arange(side * side))
for cfg in (1.0, 2.0):
    guidance, settings = Guidance(cfg, null_class=3), RasterSampling(cfg=cfg, use_cache=False)
    mine = identity.sample(core, head, labels, guidance, settings, torch.Generator().manual_seed(0))
    raster = RasterAR().sample(core, head, labels, guidance, settings, torch.Generator().manual_seed(0))
    assert torch.equal(mine, raster), f"cfg={cfg}: identity-order sampling differs from raster decoding"
tokens = torch.randint(0, 16, (3, 16), generator=torch.Generator().manual_seed(0))
assert torch.equal(identity.loss(core, head, tokens, labels, Draws(0))["loss"],
                   RasterAR().loss(core, head, tokens, labels, Draws(0))["loss"])  # fmt: skip
print("identity order == raster training and decoding, with and without CFG")

# %% [markdown]
# ## 3. Train it through the CLI
# The config is LlamaGen's, with the model's class path swapped for the new system: its settings keep their values.

# %%
if SMALL:
    tokenizer = RUN_DIR / "tokenizer"
    cli_main(["fit", "--config", "configs/debug/tokenizer_vq.yaml", "--trainer.logger.init_args.save_dir",
              str(tokenizer), "--trainer.max_steps", "1"])  # fmt: skip
    config, extra = "configs/debug/causal.yaml", ["--model.init_args.tokenizer_ckpt", str(tokenizer / "checkpoints" /
                                                                                        "last.ckpt")]  # fmt: skip
else:
    tokenizer = RUN_DIR / "tokenizer"
    cli_main(["fit", "--config", "configs/tokenizer/vq_digits.yaml", "--trainer.logger.init_args.save_dir",
              str(tokenizer)])  # fmt: skip
    config, extra = "configs/causal/llamagen_digits.yaml", ["--model.init_args.tokenizer_ckpt",
                                                            str(tokenizer / "checkpoints" / "last.ckpt")]  # fmt: skip
spiral_run = RUN_DIR / "spiral"
cli_main(["fit", "--config", config, "--model.class_path", "my_methods.SpiralARSystem", *extra,
          "--trainer.logger.init_args.save_dir", str(spiral_run), "--trainer.enable_progress_bar", "false",
          *(["--trainer.max_steps", "8"] if SMALL else [])])  # fmt: skip
system = SpiralARSystem.load_from_checkpoint(spiral_run / "checkpoints" / "last.ckpt", weights_only=True)
images = system.sample(torch.arange(4), generator=torch.Generator().manual_seed(0))
print("samples", tuple(images.shape), "in", (float(images.min()), float(images.max())))

# %% [markdown]
# ## 4. On the leaderboard, beside LlamaGen
# A row is one `register` call: the method's name, its paper (here, this tutorial), its config and the tokenizer
# kind it needs. `run` trains every listed method at the tier's budget on the tier's shared tokenizer and data, and
# evaluates each through `lit_ar test` (class-balanced, seeded): the same command as
# `python -m benchmarks.leaderboard --tier digits --methods LlamaGen "Spiral AR" --register my_methods.py`.

# %%
from benchmarks.leaderboard import METHODS  # noqa: E402

spiral = register(Method(
    name="Spiral AR", paper="tutorials/07_your_own_method.py", config="configs/causal/llamagen_{data}.yaml",
    debug_config="configs/debug/causal.yaml", tokenizer="vq",
    overrides={"*": ["--model.class_path", "my_methods.SpiralARSystem"]},  # LlamaGen's config, the spiral system
), replace=True)  # fmt: skip
try:
    board = run("debug" if SMALL else "digits", [METHODS["LlamaGen"], spiral], out=RUN_DIR / "leaderboard")
finally:
    unregister("Spiral AR")
rows = {row["method"]: row for row in board["rows"]}
assert {"LlamaGen", "Spiral AR"} <= set(rows)
for name, row in rows.items():
    print(
        f"{name}: class accuracy {row['class_accuracy']}, FID {row['fid']}, {row['images_per_s']} images/s, "
        f"{row.get('core_calls_per_image')} core calls per image"
    )
