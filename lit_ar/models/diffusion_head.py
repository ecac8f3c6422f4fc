"""MAR's diffusion head (Li et al. 2024, "DiffLoss"): the flow head's MLP trained as a per-token DDPM, so that a
lit_ar MAR trains either way and MAR's released generators run in lit_ar (lit_ar.released_weights).

Read top to bottom: the head (the flow head's SimpleMLPAdaLN with a doubled output), the noise schedule and its
respacing, the training loss, the sampler.

- The MLP takes (x_t, the step index t in [0, 1000), condition) and returns (N, 2 D): the noise eps, and where the
  step's log-variance lies between the posterior's and log(beta_t) (IDDPM's learned range, in [-1, 1]).
- Forward process: 1000 steps, IDDPM's cosine schedule: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.
- Loss per token: the mean squared eps error plus the variational bound's term (in bits) for the variance, with
  the mean's gradient stopped there (IDDPM's hybrid loss, as MAR's `learn_sigma=True`, unrescaled MSE).
- Sampling: ancestral DDPM over `steps` of the 1000, spaced evenly (IDDPM's respacing; MAR: 100); CFG mixes the
  conditional and unconditional eps and keeps the conditional variance; the temperature scales each step's noise,
  not the starting noise (MAR's).

The schedule is computed in float64 and read as fp32 tables, and every update runs in fp32 (as IDDPM's NumPy
tables are read); the MLP runs in the caller's precision, as the flow head's does.
"""

import math
from functools import lru_cache

import torch

from lit_ar.models.flow_head import FlowHead

TRAIN_STEPS = 1000  # MAR's diffusion_steps


class DiffusionHead(FlowHead):
    """MAR's DiffLoss network: x_t (N, token_dim), t (N,) or (1,) step indices, cond (N, cond_dim) ->
    (N, 2 token_dim) [eps; variance range]. The flow head's MLP, with the DDPM step index as its time."""

    kind = "diffusion"

    def __init__(self, token_dim: int, cond_dim: int, width: int = 1024, depth: int = 6, freq_dim: int = 256):
        super().__init__(token_dim, cond_dim, width, depth, freq_dim, out_dim=2 * token_dim, time_scale=1.0)

    # -- the head protocol (FlowHead.loss and FlowHead.sample call these) ----------------------------------------
    def draw_times(self, u: torch.Tensor) -> torch.Tensor:
        """Uniform draws -> DDPM step indices in [0, 1000), drawn uniformly (MAR)."""
        return (u * TRAIN_STEPS).long().clamp(max=TRAIN_STEPS - 1)

    def token_loss(self, target, noise, t, cond_embedding) -> torch.Tensor:
        return diffusion_loss(self, target, None, noise, t, cond_embedding)

    def check_sampling(self, settings) -> tuple[int, str]:
        flow_steps = 100 if settings.flow_steps is None else settings.flow_steps
        if settings.sampler not in (None, "ddpm"):
            raise ValueError(f"sampler={settings.sampler!r}: the diffusion head (head='diffusion') samples with 'ddpm' "
                             "only; leave sampler null")  # fmt: skip
        if tuple(settings.guidance_interval) != (0.0, 1.0):
            raise ValueError(f"guidance_interval={tuple(settings.guidance_interval)} is the flow head's; the diffusion "
                             "head guides every DDPM step (leave it (0.0, 1.0))")  # fmt: skip
        spaced_steps(flow_steps)  # refuses a count outside [1, 1000]
        return flow_steps, "ddpm"

    def sample_rows(self, c, u, settings, generator, scale: float) -> torch.Tensor:
        flow_steps, _ = self.check_sampling(settings)
        noise = torch.randn(c.shape[0], self.token_dim, generator=generator, device=c.device)
        return sample_diffusion(self, c, u, noise, flow_steps, scale, settings.temperature, generator)


CONTINUOUS_HEADS = ("flow", "diffusion")


def continuous_head(kind: str, token_dim: int, cond_dim: int, width: int, depth: int,
                    time_sampling: str = "uniform") -> FlowHead:  # fmt: skip
    """The per-token head of continuous tokens by name: `flow` (rectified flow, lit_ar's) or `diffusion` (MAR's
    DDPM, which draws its steps uniformly, so it takes no `time_sampling`)."""
    if kind not in CONTINUOUS_HEADS:
        raise ValueError(f"model.init_args.head={kind!r} is not known; use one of {CONTINUOUS_HEADS}")
    if kind == "flow":
        return FlowHead(token_dim, cond_dim, width, depth, time_sampling=time_sampling)
    if time_sampling != "uniform":
        raise ValueError(f"model.init_args.time_sampling={time_sampling!r} applies to head='flow' only; the "
                         "diffusion head draws its DDPM steps uniformly (leave it 'uniform')")  # fmt: skip
    return DiffusionHead(token_dim, cond_dim, width, depth)


# ---------------------------------------------------------------------------------------------------------------
# The noise schedule


def spaced_steps(steps: int, train_steps: int = TRAIN_STEPS) -> list[int]:
    """`steps` of the `train_steps` step indices, evenly spaced from 0 to train_steps - 1 (IDDPM's space_timesteps
    with one section, its rounding included)."""
    if not isinstance(steps, int) or not 1 <= steps <= train_steps:
        raise ValueError(f"flow_steps={steps} must be an integer in [1, {train_steps}] (DDPM steps of the diffusion "
                         "head; MAR samples with 100)")  # fmt: skip
    stride = (train_steps - 1) / (steps - 1) if steps > 1 else 1
    taken, index = [], 0.0
    for _ in range(steps):  # accumulated as IDDPM does, so that round() lands on the same indices
        taken.append(round(index))
        index += stride
    return sorted(set(taken))


@lru_cache(maxsize=16)
def schedule(steps: int = TRAIN_STEPS, device: torch.device | str = "cpu") -> dict:
    """The DDPM tables of `steps` evenly spaced steps of the 1000-step cosine schedule, as fp32 (steps,) tensors on
    `device` (made once per device: no copy a step), computed in float64; `timestep` (a list) maps a spaced index to
    the step index the MLP sees."""
    alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    n = TRAIN_STEPS
    betas = torch.tensor([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
                         dtype=torch.float64)  # fmt: skip
    abar_full = torch.cumprod(1.0 - betas, dim=0)
    kept = spaced_steps(steps)
    # respacing: the betas that jump between the kept steps with the same abar
    spaced, last = [], 1.0
    for i in kept:
        spaced.append(1.0 - float(abar_full[i]) / last)
        last = float(abar_full[i])
    betas = torch.tensor(spaced, dtype=torch.float64)  # (S,)
    abar = torch.cumprod(1.0 - betas, dim=0)
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    posterior_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    # its log clipped: the posterior variance is 0 at the first step (a lone step's is never used: no noise there)
    clipped = torch.cat([posterior_var[1:2], posterior_var[1:]]) if len(kept) > 1 else betas
    tables = {
        "sqrt_abar": abar.sqrt(),
        "sqrt_one_minus_abar": (1.0 - abar).sqrt(),
        "sqrt_recip_abar": (1.0 / abar).sqrt(),
        "sqrt_recipm1_abar": (1.0 / abar - 1).sqrt(),
        "posterior_mean_coef1": betas * abar_prev.sqrt() / (1.0 - abar),
        "posterior_mean_coef2": (1.0 - abar_prev) * (1.0 - betas).sqrt() / (1.0 - abar),
        "posterior_log_var": clipped.log(),
        "log_betas": betas.log(),
    }
    return {**{k: v.float().to(device) for k, v in tables.items()}, "timestep": kept}


def at(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """table (S,) read at step indices t (N,) on its device -> (N, 1)."""
    return table[t][:, None]


def model_step(tables: dict, xt: torch.Tensor, t: torch.Tensor, out: torch.Tensor):
    """The model's p(x_{t-1} | x_t) from its output (N, 2D) at x_t (N, D): its mean and log-variance (N, D)."""
    eps, var_range = out.chunk(2, dim=-1)  # (N, D) each
    frac = (var_range + 1) / 2
    log_var = frac * at(tables["log_betas"], t) + (1 - frac) * at(tables["posterior_log_var"], t)
    pred_x0 = at(tables["sqrt_recip_abar"], t) * xt - at(tables["sqrt_recipm1_abar"], t) * eps
    mean = at(tables["posterior_mean_coef1"], t) * pred_x0 + at(tables["posterior_mean_coef2"], t) * xt
    return mean, log_var


# ---------------------------------------------------------------------------------------------------------------
# Training: eps MSE + the variance's variational-bound term


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) of N(mean, exp(log_scale)^2) over bins of width 2/255 (IDDPM's decoder term at the first step)."""
    cdf = lambda v: 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v.pow(3))))  # noqa: E731
    centered, inv_std = x - mean, torch.exp(-log_scale)
    cdf_plus, cdf_min = cdf(inv_std * (centered + 1.0 / 255.0)), cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_min = (1.0 - cdf_min).clamp(min=1e-12).log()
    log_delta = (cdf_plus - cdf_min).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def diffusion_loss(
    head: DiffusionHead,
    target: torch.Tensor,
    cond: torch.Tensor | None,
    noise: torch.Tensor,
    t: torch.Tensor,
    cond_embedding: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """MAR's DiffLoss: target (N, D) tokens, cond (N, C) (or its `cond_embedding`, see FlowHead.forward), noise (N, D)
    and step indices t (N,) in [0, 1000) drawn by the caller -> the mean over tokens of (eps MSE + VB term), or per
    token with reduction="none"."""
    head.check_tokens(target)
    tables = schedule(TRAIN_STEPS, target.device)
    x0, eps, t = target.float(), noise.float(), t.long()
    xt = at(tables["sqrt_abar"], t) * x0 + at(tables["sqrt_one_minus_abar"], t) * eps  # (N, D)
    eps_pred, var_range = head(xt, t.float(), cond, cond_embedding).float().chunk(2, dim=1)  # (N, D) each
    mse = (eps - eps_pred).pow(2).mean(dim=1)  # (N,)
    # the variance learns through the bound alone: the eps half enters it with its gradient stopped
    frozen = torch.cat([eps_pred.detach(), var_range], dim=1)  # (N, 2D)
    mean, log_var = model_step(tables, xt, t, frozen)
    true_mean = at(tables["posterior_mean_coef1"], t) * x0 + at(tables["posterior_mean_coef2"], t) * xt
    kl = normal_kl(true_mean, at(tables["posterior_log_var"], t), mean, log_var).mean(dim=1) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).mean(dim=1) / math.log(2.0)
    loss = mse + torch.where(t == 0, nll, kl)  # (N,)
    return loss.mean() if reduction == "mean" else loss


# ---------------------------------------------------------------------------------------------------------------
# Sampling: ancestral DDPM over spaced steps, CFG on eps


@torch.no_grad()
def sample_diffusion(
    head: DiffusionHead,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    noise: torch.Tensor,
    steps: int = 100,
    cfg: float = 1.0,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Conditions (N, C) (and null-class conditions (N, C) when cfg != 1), starting noise (N, D) -> tokens (N, D),
    in fp32. Each step draws fresh noise (N, D) from `generator`, the last one too (as MAR's sampler does, where it
    is multiplied by 0), so the random stream is MAR's."""
    if cfg != 1.0 and uncond is None:
        raise ValueError("cfg != 1 needs the unconditional (null-class) conditions")
    tables = schedule(steps, noise.device)
    guided = cfg != 1.0
    both = torch.cat([cond, uncond]) if guided else cond  # (N or 2N, C)
    embedded = head.cond_embed(both)  # once for all steps
    x, N, D = noise.float(), noise.shape[0], noise.shape[1]
    for i in reversed(range(len(tables["timestep"]))):
        t = torch.full((N,), i, device=x.device, dtype=torch.long)
        # the step index per row, as MAR passes it: the first steps divide by sqrt(abar), ~5e-5, which magnifies any
        # rounding 2e4-fold, so the time embedding runs on the same rows (the same kernels) as MAR's
        rows = torch.cat([x, x]) if guided else x  # (N or 2N, D)
        step = torch.full((rows.shape[0],), float(tables["timestep"][i]), device=x.device)  # (N or 2N,)
        out = head(rows, step, cond_embedding=embedded).float()  # (N or 2N, 2D)
        if guided:  # MAR's forward_with_cfg: guide eps; the variance is the conditional rows'
            (eps_c, var_c), (eps_u, _) = out[:N].chunk(2, dim=-1), out[N:].chunk(2, dim=-1)
            out = torch.cat([eps_u + cfg * (eps_c - eps_u), var_c], dim=-1)  # (N, 2D)
        mean, log_var = model_step(tables, x, t, out)
        fresh = torch.randn(N, D, generator=generator, device=x.device)
        x = mean + (0.0 if i == 0 else 1.0) * torch.exp(0.5 * log_var) * fresh * temperature
    return x
