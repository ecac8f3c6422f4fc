"""xAR: next-X prediction with flow matching (Ren et al. 2025; OliverRensu/xAR) over continuous tokens, the backbone
denoising each entity itself (lit_ar/models/xar.py).

The prediction unit X is a setting (`entities`): `token` (one token per entity: raster AR over continuous tokens),
`cell` (k x k cells in raster order of the cells, xAR's default), `subsample` (non-local: the tokens of one phase of
a stride-s lattice, s x s entities spread over the image) or `image` (one entity: a flow model of the whole grid).

Training, Noisy Context Learning (xAR's): every entity is noised at its own flow time t_e (logit-normal, xAR's, or
uniform), x_t = t x + (1 - t) noise; one block-causal pass over all the noisy entities predicts every token's
velocity x - noise, so each entity is denoised from noisy earlier entities (the MSE over all tokens).
`context: clean` is lit_ar's ablation, clean teacher forcing: the sequence is [clean entities 1 .. E-1] [noisy
entities 1 .. E], a noisy entity seeing the clean entities before it and itself; the MSE over the noisy ones.

Sampling, entity by entity: the entity starts as noise (times `temperature`) and is integrated from t = 0 to 1 with
the flow samplers (euler, heun, euler_maruyama; `flow_steps`), every call seeing the clean entities before it on the
KV cache (xAR feeds the context clean, t = 1); the first call of an entity also writes the entity before it, clean,
at the slots where it was denoised, so there are flow_steps calls per entity. CFG guides the velocity, ramped over
the entities by `cfg_schedule`.
"""

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from lit_ar.draws import Draws
from lit_ar.guidance import Guidance
from lit_ar.methods.base import ContinuousSampling, Method
from lit_ar.models.flow_head import check_flow_sampling, sample_flow

ENTITY_UNITS = ("token", "cell", "subsample", "image")


def entities(unit: str, grid_size: int, size: int = 1) -> torch.Tensor:
    """The raster positions of each entity, (E, n), in generation order: `token` (L, 1); `cell` of size k: the
    (G/k)**2 cells of k x k tokens, raster inside and across cells; `subsample` of stride s: the s**2 phases (a, b)
    in raster order, each the (G/s)**2 tokens (a + s i, b + s j); `image`: (1, L)."""
    G = grid_size
    grid = torch.arange(G * G).view(G, G)
    if unit == "token":
        return grid.reshape(-1, 1)
    if unit == "image":
        return grid.reshape(1, -1)
    if unit not in ENTITY_UNITS:
        raise ValueError(f"entities={unit!r} is not known; known units: {', '.join(ENTITY_UNITS)}")
    if size < 1 or G % size:
        raise ValueError(f"entity_size={size} must be >= 1 and divide the token grid side {G} ({unit} unit)")
    k = size
    if unit == "cell":  # (G/k, k, G/k, k) -> cells (G/k * G/k, k * k)
        return grid.view(G // k, k, G // k, k).permute(0, 2, 1, 3).reshape(-1, k * k)
    return grid.view(G // k, k, G // k, k).permute(1, 3, 0, 2).reshape(-1, (G // k) ** 2)  # subsample: phases


def block_causal(E: int, n: int, device) -> torch.Tensor:
    """(E n, E n) True = may attend: an entity sees itself and the entities before it."""
    entity = torch.arange(E, device=device).repeat_interleave(n)
    return entity[None, :] <= entity[:, None]


def clean_context_mask(E: int, n: int, device) -> torch.Tensor:
    """The clean-teacher-forcing sequence [clean 1 .. E-1] [noisy 1 .. E]: clean entity j sees clean entities <= j;
    noisy entity i sees the clean entities before it and itself. ((2E - 1) n, (2E - 1) n)."""
    entity = torch.arange(E, device=device).repeat_interleave(n)
    clean, noisy = entity[: (E - 1) * n], entity
    top = torch.cat([clean[None, :] <= clean[:, None], torch.zeros(len(clean), len(noisy), dtype=torch.bool,
                     device=device)], 1)  # fmt: skip
    bottom = torch.cat([clean[None, :] < noisy[:, None], noisy[None, :] == noisy[:, None]], 1)
    return torch.cat([top, bottom], 0)


@dataclass
class XARSampling(ContinuousSampling):
    """Sampling settings of xAR: the flow sampler of each entity (`flow_steps`, `sampler` euler, heun or
    euler_maruyama, `guidance_interval`), CFG ramped over the entities, `temperature` scaling the starting noise."""

    flow_steps: int | None = None
    """Flow steps per entity (default 25), each one call of the backbone."""
    use_cache: bool = True
    """Sample on the KV cache; False runs the whole sequence again at every flow step (parity checks)."""

    def __post_init__(self):
        super().__post_init__()
        if self.steps is not None:
            raise ValueError(f"steps={self.steps}: xAR takes one AR step per entity; set flow_steps (per entity)")
        if self.sampler == "ddpm":
            raise ValueError("sampler='ddpm' is the diffusion head's; xAR's backbone is a flow: euler, heun or "
                             "euler_maruyama")  # fmt: skip


class XAR(Method):
    Sampling = XARSampling

    def __init__(self, unit: str = "cell", size: int = 2, context: Literal["noisy", "clean"] = "noisy",
                 time_sampling: Literal["logit_normal", "uniform"] = "logit_normal"):  # fmt: skip
        if context not in ("noisy", "clean"):
            raise ValueError(f"context={context!r} is not known; use 'noisy' (xAR's noisy context learning) or "
                             "'clean' (clean teacher forcing)")  # fmt: skip
        if time_sampling not in ("logit_normal", "uniform"):
            raise ValueError(f"time_sampling={time_sampling!r} is not known; use 'logit_normal' or 'uniform'")
        self.unit, self.size, self.context, self.time_sampling = unit, size, context, time_sampling

    def layout(self, core) -> torch.Tensor:
        return entities(self.unit, core.grid_size, self.size).to(core.rope.device)  # (E, n)

    def loss(self, core, head, tokens: torch.Tensor, labels: torch.Tensor, draws: Draws) -> dict[str, torch.Tensor]:
        """tokens (B, L, D) at raster positions."""
        groups = self.layout(core)
        (E, n), B = groups.shape, tokens.shape[0]
        order = groups.flatten()  # (L,) entity-major
        x = tokens[:, order]  # (B, L, D)
        u = draws.randn(B, E) if self.time_sampling == "logit_normal" else draws.rand(B, E)
        t_entity = torch.sigmoid(u) if self.time_sampling == "logit_normal" else u  # (B, E)
        t = t_entity.repeat_interleave(n, dim=1)  # (B, L)
        noise = draws.randn(B, E * n, tokens.shape[-1])
        xt = t[..., None] * x + (1 - t[..., None]) * noise
        target = x - noise
        if self.context == "noisy":
            v = core(xt, order, labels, t, block_causal(E, n, x.device))
        else:
            ctx = (E - 1) * n
            seq = torch.cat([x[:, :ctx], xt], 1)
            times = torch.cat([torch.ones_like(t[:, :ctx]), t], 1)
            v = core(seq, torch.cat([order[:ctx], order]), labels, times, clean_context_mask(E, n, x.device))[:, ctx:]
        return {"loss": F.mse_loss(v.float(), target.float())}

    @torch.no_grad()
    def sample(self, core, head, labels: torch.Tensor, guidance: Guidance, settings: XARSampling,
               generator: torch.Generator | None = None,
               cache_dtype: torch.dtype | None = None) -> torch.Tensor:  # fmt: skip
        """labels (B,) -> tokens (B, L, D) at raster positions, entity by entity."""
        steps, sampler = settings.flow_steps or 25, settings.sampler or "euler"
        check_flow_sampling(steps, sampler, settings.guidance_interval)
        groups = self.layout(core)
        (E, n), B, D, device = groups.shape, labels.shape[0], core.token_dim, labels.device
        order = groups.flatten()
        rows = guidance.rows(labels)  # (B',)
        out = torch.zeros(B, E * n, D, device=device)  # entity-major, filled entity by entity
        if settings.use_cache:
            core.setup_caches(rows.shape[0], cache_dtype or next(core.parameters()).dtype)
            core.prefill(rows)
        try:
            for e in range(E):
                here = order[e * n : (e + 1) * n]
                clean_pending = settings.use_cache and e > 0  # the entity's first call writes the one before, clean

                def velocity(x: torch.Tensor, tt: torch.Tensor, guided: bool) -> torch.Tensor:
                    nonlocal clean_pending
                    xb = guidance.twice(x.view(B, n, D))  # (B', n, D)
                    t = tt.expand(rows.shape[0], n)
                    if not settings.use_cache:  # the clean entities before and this one, from scratch
                        seq = torch.cat([guidance.twice(out[:, : e * n]), xb], 1)
                        times = torch.cat([torch.ones(rows.shape[0], e * n, device=device), t], 1)
                        v = core(seq, order[: (e + 1) * n], rows, times, block_causal(e + 1, n, device))[:, -n:]
                    elif clean_pending:
                        clean_pending = False
                        seq = torch.cat([guidance.twice(out[:, (e - 1) * n : e * n]), xb], 1)
                        times = torch.cat([torch.ones_like(t), t], 1)
                        slots = torch.arange((e - 1) * n, (e + 1) * n, device=device)
                        upto = torch.cat([torch.full((n,), e * n - 1, device=device),
                                          torch.full((n,), (e + 1) * n - 1, device=device)])  # fmt: skip
                        v = core.decode(seq, order[(e - 1) * n : (e + 1) * n], rows, times, slots, upto)[:, -n:]
                    else:
                        slots = torch.arange(e * n, (e + 1) * n, device=device)
                        v = core.decode(xb, here, rows, t, slots, torch.full((n,), (e + 1) * n - 1, device=device))
                    v = v.float()  # (B', n, D)
                    if guided:
                        return torch.cat([v[:B].reshape(B * n, D), v[B:].reshape(B * n, D)])
                    return v[:B].reshape(B * n, D)

                noise = torch.randn(B * n, D, generator=generator, device=device) * settings.temperature
                scale = guidance.scale_at((e + 1) / E) if guidance.active else 1.0
                x = sample_flow(velocity, noise, steps, sampler, scale, settings.guidance_interval, generator)
                out[:, e * n : (e + 1) * n] = x.view(B, n, D)
        finally:
            if settings.use_cache:
                core.clear_caches()
        return torch.empty_like(out).index_copy_(1, order, out)  # (B, L, D) at raster positions
