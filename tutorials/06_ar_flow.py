# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 06 — AR with a flow head: continuous tokens
#
# MAR, FlowAR and their kin drop the codebook: the tokenizer is a KL-VAE whose tokens are continuous vectors
# `(B, L, D)`, and the transformer's output for a token does not go through a softmax but conditions a small
# per-token network — the **flow head** — that turns Gaussian noise into the token by integrating a learned
# velocity field. This tutorial
# 1. trains the head alone on a 2D mixture of Gaussians and watches it move noise onto the data,
# 2. measures how many ODE steps the head needs (Euler vs Heun, and the SDE),
# 3. trains MAR-style and FlowAR-style generators through `cli_main` on the debug KL tokenizer and samples them,
# 4. measures what the head costs next to the backbone, at batch 1 and at a large batch,
# 5. runs MAR's own head, a per-token DDPM, beside it,
# 6. trains xAR, whose backbone denoises whole entities (cells) itself, and samples it entity by entity.
#
# Set `LIT_AR_SMALL=1` to run it in well under a minute (the tests do).

# %%
import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from benchmarks.flow_ar import head_fraction
from lit_ar.callbacks import make_grid
from lit_ar.cli import cli_main
from lit_ar.models.diffusion_head import DiffusionHead, diffusion_loss, sample_diffusion, schedule
from lit_ar.models.flow_head import FlowHead, flow_loss, head_velocity_fn, sample_flow
from lit_ar.systems import FlowARSystem

SMALL = os.environ.get("LIT_AR_SMALL", "0") == "1"
RUN_DIR = Path(os.environ.get("LIT_AR_RUN_DIR") or tempfile.mkdtemp(prefix="lit_ar_tutorial06_"))
if SMALL:
    torch.set_num_threads(1)  # tiny models: on a shared CPU, more threads only wait on each other
torch.manual_seed(0)
g = torch.Generator().manual_seed(0)

# %% [markdown]
# ## 1. How the head turns noise into a token
# The path is rectified flow's straight line from noise `x0 ~ N(0, I)` (t = 0) to a token `x1` (t = 1):
# `x_t = t x1 + (1 - t) x0`. The head `v(x_t, t, z)` regresses the velocity `x1 - x0` given the backbone's
# output `z` for that token; sampling integrates `dx/dt = v` from t = 0 to 1. Here the "tokens" are 2D points
# from two Gaussians, and `z` is a one-hot class: the head must learn one distribution per condition.

# %%
MEANS = torch.tensor([[-2.0, 0.0], [2.0, 1.0]])
STDS = torch.tensor([[0.3, 0.6], [0.5, 0.25]])


def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    cls = torch.randint(0, 2, (n,), generator=g)
    return MEANS[cls] + STDS[cls] * torch.randn(n, 2, generator=g), torch.nn.functional.one_hot(cls, 2).float()


head = FlowHead(token_dim=2, cond_dim=2, width=64, depth=2)
steps = 200 if SMALL else 1000
opt = torch.optim.Adam(head.parameters(), lr=5e-3)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
losses = []
for _ in range(steps):
    x1, z = draw(512)
    loss = flow_loss(head, x1, z, torch.randn(512, 2, generator=g), torch.rand(512, generator=g))
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    losses.append(loss.item())
head.eval()
print(f"velocity loss: first {losses[0]:.3f}, last {sum(losses[-20:]) / 20:.3f}")
assert sum(losses[-20:]) / 20 < losses[0]

# %% [markdown]
# Trajectories of the Euler ODE, 16 steps, for condition 0 (left mode) and condition 1 (right mode). The head was
# never told the means: it learned them from the pairs (condition, point).

# %%
n = 300
x0 = torch.randn(2 * n, 2, generator=g)
cond = torch.nn.functional.one_hot(torch.arange(2).repeat_interleave(n), 2).float()
path = [x0]
with torch.no_grad():
    x = x0
    for i in range(16):
        t = torch.full((2 * n,), i / 16)
        x = x + head(x, t, cond) / 16
        path.append(x)
path = torch.stack(path)  # (17, 2n, 2)
fig, ax = plt.subplots(figsize=(6, 4))
for j in range(0, 2 * n, 10):
    ax.plot(path[:, j, 0], path[:, j, 1], color="C0" if j < n else "C1", alpha=0.3, lw=0.8)
ax.scatter(*path[-1].T, s=3, c=["C0"] * n + ["C1"] * n)
ax.set_title("noise (t=0) -> tokens (t=1), two conditions")
plt.show()
for c in range(2):
    got = path[-1, c * n : (c + 1) * n]
    print(f"condition {c}: mean {got.mean(0).tolist()} (true {MEANS[c].tolist()}), "
          f"std {got.std(0).tolist()} (true {STDS[c].tolist()})")  # fmt: skip
    assert (got.mean(0) - MEANS[c]).abs().max() < 0.3

# %% [markdown]
# ## 2. Steps vs quality
# Each AR step of MAR calls the head `flow_steps` times (with Heun twice that, less one: its last step is Euler,
# since the velocity at t = 1 is singular). MAR's diffusion head used 100 DDPM steps; a rectified-flow head gets
# close with far fewer. Below: the distance of few-step samples to a
# 128-step Heun reference from the same noise, and the standard deviation of the condition-1 samples against
# the truth (0.5, 0.25). Few Euler steps shrink the spread: the first step follows the velocity averaged over
# everything the noise could become, pulling samples to the middle; Heun's corrector recovers the spread within a
# few steps, at two head calls per step.

# %%
x0 = torch.randn(2000, 2, generator=g)
z = torch.nn.functional.one_hot(torch.ones(2000, dtype=torch.long), 2).float()
velocity = head_velocity_fn(head, z)
reference = sample_flow(velocity, x0, 128, "heun")
rows = []
for sampler in ("euler", "heun"):
    for k in (1, 2, 4, 8, 16, 32):
        x = sample_flow(velocity, x0, k, sampler)
        rows.append((sampler, k, (x - reference).norm(dim=1).mean().item(), x.std(0).tolist()))
sde = sample_flow(velocity, x0, 32, "euler_maruyama", generator=torch.Generator().manual_seed(1))
print(f"{'sampler':8} {'steps':>5} {'dist to ref':>11}  std")
for sampler, k, dist, std in rows:
    print(f"{sampler:8} {k:5d} {dist:11.4f}  {std[0]:.3f} {std[1]:.3f}")
print(f"euler_maruyama (SDE) 32 steps: std {sde.std(0).tolist()}")
euler = {k: d for s, k, d, _ in rows if s == "euler"}
heun = {k: d for s, k, d, _ in rows if s == "heun"}
assert euler[32] < euler[4] < euler[1] and heun[8] < euler[8]

# %% [markdown]
# ## 3. MAR and FlowAR through the CLI
# Both generators read continuous tokens from a frozen KL tokenizer. First the debug tokenizer (16x16 shapes,
# a 4x4 grid of 4-wide tokens), then the two debug generators: `backbone: mar` (bidirectional transformer, random
# order, cosine schedule of N AR steps, linear CFG) and `backbone: flowar` (scales 1, 2, 4, block-causal, each
# scale's input the previous scale upsampled). `backbone: causal` is the same head on raster causal AR.
#
# Two things about how MAR trains here. Each step hides a random share of every image's tokens (at least 70%,
# MAR's truncated normal) and the loss counts the hidden tokens only, as MAR's mask weight does; so the decoder's
# last block and the head run at the hidden positions alone (the same loss, checked against MAR's weighted form in
# the tests; a sampling step likewise computes only the tokens it reveals). And under `bf16-mixed` the head's MLP
# trains in bf16, as MAR trains its diffusion head under autocast, while its time embedding and the loss stay fp32.
# Together they make a MAR-B-size training step several times faster on a CPU with bf16 matrix units
# (`python -m benchmarks.flow_ar`; benchmarks/RESULTS.md).


# %%
def fit(config: str, name: str, extra: list[str]) -> object:
    return cli_main(["fit", "--config", config, "--trainer.logger.init_args.save_dir", str(RUN_DIR / name),
                     "--trainer.enable_progress_bar", "false", *extra])  # fmt: skip


small_steps = ["--trainer.max_steps", "12"] if SMALL else []
tok = fit("configs/debug/tokenizer_kl.yaml", "tokenizer_kl", small_steps)
tok_ckpt = str(RUN_DIR / "tokenizer_kl" / "checkpoints" / "last.ckpt")
systems = {}
for backbone in ("mar", "flowar"):
    cli = fit(f"configs/debug/flow_{backbone}.yaml", f"flow_{backbone}",
              ["--model.init_args.tokenizer_ckpt", tok_ckpt, "--trainer.limit_val_batches", "0",
               *(["--trainer.max_steps", "16"] if SMALL else [])])  # fmt: skip
    systems[backbone] = cli.model.eval()
    print(backbone, "final train/loss", float(cli.trainer.callback_metrics["train/loss"]))

# %% [markdown]
# `sample()` takes the family's knobs: `steps` (MAR's AR steps), `flow_steps`, `sampler` (`euler`, `heun`,
# `euler_maruyama`), `cfg` with `cfg_schedule` (over AR steps) and `guidance_interval` (over flow time), and
# `temperature` (the head's noise scale). The same generator seed gives the same images.

# %%
labels = torch.arange(4).repeat_interleave(2)
fig, axes = plt.subplots(1, 2, figsize=(8, 4))
for ax, (backbone, system) in zip(axes, systems.items()):
    kw = dict(cfg=1.5, flow_steps=8, sampler="heun", guidance_interval=(0.0, 0.8))
    if backbone == "mar":
        kw["steps"] = 4
    images = system.sample(labels, generator=torch.Generator().manual_seed(0), **kw)
    again = system.sample(labels, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(images, again) and images.shape == (8, 3, 16, 16)
    ax.imshow(make_grid(images, nrow=2).permute(1, 2, 0))
    ax.set_title(f"{backbone} (debug, barely trained)")
    ax.axis("off")
plt.show()

# %% [markdown]
# ## 4. The cost of the head vs the backbone
# MAR calls the backbone once per AR step, and the head `flow_steps` times per step on the tokens it reveals.
# Summed over a sample, the head runs `flow_steps` times on each of the L tokens, the backbone `steps` times
# on all L (+ buffer) positions. So the split depends on the widths, on `steps` vs `flow_steps`, and — on
# a GPU — on the batch: at batch 1 each head call is a few tiny kernels whose launch cost dominates, at a large
# batch the backbone's attention and MLPs dominate. MAR users found the fraction flips between the two. Here on
# a MAR-style model with 16x16 tokens (`python -m benchmarks.flow_ar` prints the full table, and the MAR-B size).
# Precision moves the split too: under bf16 autocast (`bf16-mixed`) the head's MLP samples in bf16, as it trains,
# while its time embedding and every sampler update stay in fp32; on a CPU with bf16 matrix units this speeds up
# FlowAR's sampling, which the head dominates, with the same class accuracy and FID on digits
# (benchmarks/RESULTS.md).

# %%
mar = FlowARSystem(backbone="mar", token_dim=8, grid_size=8 if SMALL else 16, dim=128, depth=2, n_heads=4,
                   buffer_size=8, head_width=256, head_depth=3, num_classes=10, image_size=64).eval()  # fmt: skip
count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
print(f"parameters: backbone {count(mar.core):,}, head {count(mar.head):,}")
for batch in (1, 4 if SMALL else 64):
    seconds, frac = head_fraction(mar, batch, steps=8, flow_steps=10, cfg=2.0)
    print(f"batch {batch:3d}: {seconds:.2f} s per sample call, {100 * frac:.0f}% of it in the flow head")
    assert 0.0 < frac < 1.0

# %% [markdown]
# ## 5. MAR's own head: the DDPM (`head: diffusion`)
# MAR's paper head is not a flow but a per-token DDPM ("Diffusion Loss"): the same MLP predicts the noise `eps` of
# `x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps` over 1000 cosine-schedule steps, plus where each step's variance
# lies (IDDPM's learned range), and samples by ancestral steps over 100 of the 1000. lit_ar has it as
# `head: diffusion` on any backbone, checked against MAR's code to the last bit on a tiny MAR (`tests/fixtures/`), so
# that MAR's released generators run here (`python -m lit_ar.released_weights mar`, docs/released_weights.md).
#
# With the exact `eps` of a Gaussian, 100 DDPM steps land on it. A head trained on the mixture above for the same
# budget as the flow head learns `eps` well at every noise level, yet its samples go astray: MAR's schedule ends at
# `abar = 2.4e-9`, so the first sampling step divides the head's `eps` error by `sqrt(abar)`, about 2e4-fold. MAR's
# heads, trained for 400 epochs, learn that near-identity far better; the flow head has no such step. On digits, at
# the same 1000 training steps, a DDPM-head MAR made the asked-for digit as often as the flow-head one but with 6x its
# FID and far lower recall (benchmarks/RESULTS.md): one reason lit_ar's configs default to the flow head.

# %%
tables = schedule(1000)
print(f"1 / sqrt(abar) at the last of the 1000 steps: {float(tables['sqrt_recip_abar'][-1]):.0f}")
diffusion_head = DiffusionHead(token_dim=2, cond_dim=2, width=64, depth=2)
opt = torch.optim.Adam(diffusion_head.parameters(), lr=5e-3)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
for _ in range(steps):
    x1, z = draw(512)
    t = torch.randint(0, 1000, (512,), generator=g)
    loss = diffusion_loss(diffusion_head, x1, z, torch.randn(512, 2, generator=g), t)
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
diffusion_head.eval()
z1 = torch.nn.functional.one_hot(torch.ones(2000, dtype=torch.long), 2).float()
with torch.no_grad():
    x_last = torch.randn(2000, 2, generator=g)  # at step 999 x_t is the noise, to 5e-5
    eps_error = (diffusion_head(x_last, torch.full((2000,), 999.0), z1)[:, :2] - x_last).abs().mean().item()
ddpm = sample_diffusion(diffusion_head, z1, None, torch.randn(2000, 2, generator=g), 100, generator=g)
flow = sample_flow(head_velocity_fn(head, z1), torch.randn(2000, 2, generator=g), 16, "heun")
print(f"the trained head's eps error at step 999: {eps_error:.4f} -> the first step's x_0 error ~ "
      f"{eps_error * float(tables['sqrt_recip_abar'][-1]):.0f}")  # fmt: skip
for name, x in (("DDPM, 100 steps", ddpm), ("flow, Heun 16", flow)):
    print(f"{name:16}: condition-1 mean {x.mean(0).tolist()}, std {x.std(0).tolist()} (true {MEANS[1].tolist()}, "
          f"{STDS[1].tolist()})")  # fmt: skip
assert (flow.mean(0) - MEANS[1]).abs().max() < 0.3

# %% [markdown]
# The same switch trains MAR as published through the CLI: `--model.init_args.head diffusion` on a MAR config. A
# sampling call then takes `flow_steps` as the number of DDPM steps (100 by default, MAR's) and `temperature` scales
# each step's noise, as in MAR.

# %%
cli = fit("configs/debug/flow_mar.yaml", "flow_mar_diffusion",
          ["--model.init_args.tokenizer_ckpt", tok_ckpt, "--model.init_args.head", "diffusion",
           "--trainer.limit_val_batches", "0", *(["--trainer.max_steps", "16"] if SMALL else [])])  # fmt: skip
mar_ddpm = cli.model.eval()
images = mar_ddpm.sample(labels, cfg=1.5, steps=4, flow_steps=20, generator=torch.Generator().manual_seed(0))
assert images.shape == (8, 3, 16, 16) and torch.isfinite(images).all()
print("MAR with its DDPM head: final train/loss", float(cli.trainer.callback_metrics["train/loss"]))

# %% [markdown]
# ## 6. xAR: next-X prediction, the backbone denoising
# xAR drops the head: the transformer itself takes a noisy *entity* (a token, a k x k cell, a non-local subsample
# or the whole image) with its flow time (AdaLN, with the class) and predicts its velocity, attending
# block-causally to the entities before it. In training every entity is noised at its own time (noisy context
# learning); `context: clean` is lit_ar's ablation, clean teacher forcing. Sampling integrates one entity after
# the other from noise, the earlier ones fed clean from the KV cache: `flow_steps` backbone calls per entity.

# %%
from lit_ar.methods.xar import entities

print("2x2 cells of a 4x4 grid:", entities("cell", 4, 2).tolist())
print("stride-2 subsamples:    ", entities("subsample", 4, 2).tolist())
cli = fit("configs/debug/xar.yaml", "xar", ["--model.init_args.tokenizer_ckpt", tok_ckpt,
          "--trainer.limit_val_batches", "0", *(["--trainer.max_steps", "16"] if SMALL else [])])  # fmt: skip
xar = cli.model.eval()
images = xar.sample(labels, cfg=1.5, flow_steps=8, generator=torch.Generator().manual_seed(0))
assert images.shape == (8, 3, 16, 16) and torch.isfinite(images).all()
plt.figure(figsize=(4, 4))
plt.imshow(make_grid(images, nrow=2).permute(1, 2, 0))
plt.title("xAR, 2x2 cells (debug, barely trained)")
plt.axis("off")
plt.show()
