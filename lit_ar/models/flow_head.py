"""The flow-matching head of continuous-token AR (MAR, FlowAR, causal + flow): a small per-token MLP that turns
Gaussian noise into one continuous token, conditioned on the backbone's output for that token.

Read top to bottom: the time embedding, the AdaLN residual block and final layer (MAR's SimpleMLPAdaLN shape),
the head, then the rectified-flow loss and the ODE/SDE samplers.

The path is the linear interpolant (rectified flow) with t = 0 at the noise and t = 1 at the data:
    x_t = t * x_1 + (1 - t) * x_0,   x_0 ~ N(0, I),   x_1 = the token,   velocity v = x_1 - x_0.
The head regresses v; sampling integrates dx/dt = v(x, t) from t = 0 to t = 1.

Numerics: the sinusoidal time embedding and its MLP, the loss and every sampler update run in fp32 (bf16
t * 1000 has 3 significant digits, and the ODE/SDE updates accumulate), so bf16-mixed training and sampling do not
produce NaNs; the residual MLP itself runs in whatever precision the Trainer chose, in training and in sampling.
"""

import math
from typing import Literal

import torch
from torch import nn

SAMPLERS = ("euler", "heun", "euler_maruyama")
TIME_SAMPLINGS = ("uniform", "logit_normal")


def fp32(device: torch.device):
    """A context that turns autocast off on `device`, so the arithmetic inside stays in the inputs' fp32."""
    return torch.autocast(device_type=device.type, enabled=False)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


# ---------------------------------------------------------------------------------------------------------------
# Layers


class TimeEmbedding(nn.Module):
    """Time t -> (N, width): sinusoids of scale * t (DiT's frequencies) and a 2-layer MLP, in fp32. The flow head's t
    lies in [0, 1] (scale 1000); the diffusion head's is the DDPM step index in [0, 1000) (scale 1)."""

    def __init__(self, width: int, freq_dim: int = 256, max_period: float = 10000.0, scale: float = 1000.0):
        super().__init__()
        self.freq_dim, self.max_period, self.scale = freq_dim, max_period, scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        with fp32(t.device):
            half = self.freq_dim // 2
            freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device) / half)  # (half,)
            args = self.scale * t.float()[:, None] * freqs[None]  # (N, half)
            emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, freq_dim)
            return self.mlp(emb.to(self.mlp[0].weight.dtype))  # (N, width), fp32 unless the weights are not


class ResBlock(nn.Module):
    """x + gate * MLP(AdaLN(x; y)): LayerNorm, shift/scale/gate from the condition y (zero-initialised gate)."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.ada(y).chunk(3, dim=-1)  # (N, W) each
        return x + gate * self.mlp(modulate(self.norm(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


# ---------------------------------------------------------------------------------------------------------------
# The head


class FlowHead(nn.Module):
    """MAR's SimpleMLPAdaLN predicting a velocity: x_t (N, token_dim), t (N,), cond (N, cond_dim) -> v (N, token_dim).
    t may also be (1,), one time for every row (as in sampling), whose embedding is then computed once.

    token_dim is the tokenizer's latent width; cond_dim the backbone's width; `width`, `depth` the MLP's size
    (MAR-B: width 1024, depth 6). out_dim (default token_dim) and time_scale are the diffusion head's
    (lit_ar.models.diffusion_head), which shares this MLP."""

    kind = "flow"

    def __init__(self, token_dim: int, cond_dim: int, width: int = 1024, depth: int = 6, freq_dim: int = 256,
                 out_dim: int | None = None, time_scale: float = 1000.0,
                 time_sampling: str = "uniform"):  # fmt: skip
        super().__init__()
        flow_times(torch.zeros(1), time_sampling)  # refuses an unknown law now
        self.token_dim, self.cond_dim, self.time_sampling = token_dim, cond_dim, time_sampling
        self.time_embed = TimeEmbedding(width, freq_dim, scale=time_scale)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(token_dim, width)
        self.blocks = nn.ModuleList([ResBlock(width) for _ in range(depth)])
        self.final = FinalLayer(width, out_dim or token_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # MAR's initialisation: xavier linears, N(0, 0.02) time MLP, zero AdaLN and output (the head starts at v = 0)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for layer in [*(b.ada[-1] for b in self.blocks), self.final.ada[-1], self.final.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def check_tokens(self, x: torch.Tensor, name: str = "tokens") -> None:
        if x.shape[-1] != self.token_dim:
            raise ValueError(
                f"{name} have width {x.shape[-1]} but the {self.kind} head was built for token_dim={self.token_dim} "
                "(the tokenizer's latent_channels); a tokenizer or token cache with another latent width needs a "
                "new model"
            )

    # -- the head protocol: loss(cond, target, draws) and sample(cond, guidance, settings, generator, progress) --------
    def draw_times(self, u: torch.Tensor) -> torch.Tensor:
        """Uniform draws -> this head's training times (flow times in (0, 1))."""
        return flow_times(u, self.time_sampling)

    def token_loss(self, target, noise, t, cond_embedding) -> torch.Tensor:
        return flow_loss(self, target, None, noise, t, cond_embedding)

    def loss(self, cond: torch.Tensor, target: torch.Tensor, draws, batch_mul: int = 1,
             positions: torch.Tensor | None = None, num_positions: int | None = None) -> torch.Tensor:  # fmt: skip
        """Conditions (B, T, C) and target tokens (B, T, D) -> the mean loss over `batch_mul` (noise, time) draws per
        token (MAR's diffusion_batch_mul: the head is cheap, the core's pass is shared). The draws are made per
        global sample from `draws`; with `positions` (B, T), the tokens' places among `num_positions`, they are
        made for every place and read at the given ones (MAR: the random stream does not depend on how many tokens
        are hidden)."""
        B, T, D = target.shape
        m = batch_mul
        drawn = T if positions is None else num_positions
        noise = draws.randn(B, m, drawn, D)  # (B, m, drawn, D)
        t = self.draw_times(draws.rand(B, m, drawn))  # (B, m, drawn)
        if positions is not None:
            noise = noise.gather(2, positions[:, None, :, None].expand(B, m, T, D))  # (B, m, T, D)
            t = t.gather(2, positions[:, None].expand(B, m, T))  # (B, m, T)
        rep = lambda x: x[:, None].expand(B, m, *x.shape[1:]).reshape(B * m * T, *x.shape[2:])  # noqa: E731
        embedded = self.cond_embed(cond)  # (B, T, W): once per token, not once per draw
        return self.token_loss(rep(target), noise.reshape(-1, D), t.reshape(-1), rep(embedded))

    def token_buffer(self, batch: int, num_tokens: int, device: torch.device) -> torch.Tensor:
        """Room for a sampler's tokens: vectors (batch, num_tokens, D) in fp32, zeros."""
        return torch.zeros(batch, num_tokens, self.token_dim, device=device)

    def check_sampling(self, settings) -> tuple[int, str]:
        """The head's steps and sampler of `settings`, defaults filled in; refuses what this head does not take."""
        flow_steps, sampler = 25 if settings.flow_steps is None else settings.flow_steps, settings.sampler or "euler"
        check_flow_sampling(flow_steps, sampler, settings.guidance_interval)
        return flow_steps, sampler

    def sample_rows(self, c, u, settings, generator, scale: float) -> torch.Tensor:
        """Conditions (N, C) (and the negative branch's (N, C) when guided) -> tokens (N, D)."""
        flow_steps, sampler = self.check_sampling(settings)
        noise = settings.temperature * torch.randn(c.shape[0], self.token_dim, generator=generator, device=c.device)
        return sample_flow(head_velocity_fn(self, c, u), noise, flow_steps, sampler, scale, settings.guidance_interval,
                           generator)  # fmt: skip

    def sample(self, cond: torch.Tensor, guidance, settings, generator: torch.Generator | None,
               progress: float) -> torch.Tensor:  # fmt: skip
        """Conditions (B', n, C) of a (guided) batch -> tokens (B, n, D) in fp32, guided at the scale of `progress`
        and then passed through the guidance's `post` hook."""
        B = cond.shape[0] // 2 if guidance.active else cond.shape[0]
        n, C = cond.shape[1], cond.shape[2]
        c = cond[:B].reshape(B * n, C)
        u = cond[B:].reshape(B * n, C) if guidance.active else None
        scale = guidance.scale_at(progress) if guidance.active else 1.0
        x = self.sample_rows(c, u, settings, generator, scale).view(B, n, self.token_dim)
        return x if guidance.post is None else guidance.post(x)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
                cond_embedding: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """cond (N, cond_dim), or cond_embedding (N, W): `self.cond_embed(cond)` made once by a caller that reuses it
        (every flow step of a sampling call, MAR's repeated noise draws in training)."""
        if (cond is None) == (cond_embedding is None):
            raise ValueError("the flow head takes cond or cond_embedding, exactly one of them")
        c = self.cond_embed(cond) if cond_embedding is None else cond_embedding  # (N, W)
        y = self.time_embed(t) + c  # (N, W); (1, W) + (N, W) when t is one time for all rows
        h = self.input_proj(x.to(self.input_proj.weight.dtype))  # (N, W); noise arrives in fp32
        for block in self.blocks:
            h = block(h, y)
        return self.final(h, y)  # (N, token_dim)


# ---------------------------------------------------------------------------------------------------------------
# Training: the rectified-flow velocity loss


def flow_times(u: torch.Tensor, kind: str) -> torch.Tensor:
    """Uniform draws u in [0, 1) -> flow times: uniform, or logit-normal (SD3: sigmoid of a standard normal)."""
    if kind == "uniform":
        return u
    if kind == "logit_normal":
        return torch.sigmoid(math.sqrt(2) * torch.erfinv(2 * u.clamp(1e-6, 1 - 1e-6) - 1))
    raise ValueError(f"model.init_args.time_sampling={kind!r} is not known; use 'uniform' or 'logit_normal'")


def sample_time(n: int, kind: str, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """n flow times in (0, 1): uniform, or logit-normal (SD3; more weight on the middle of the path)."""
    if kind == "uniform":
        return torch.rand(n, generator=generator, device=device)
    if kind == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=generator, device=device))
    raise ValueError(f"time_sampling={kind!r} is not known; use one of {TIME_SAMPLINGS}")


def flow_loss(
    head: FlowHead,
    target: torch.Tensor,
    cond: torch.Tensor | None,
    noise: torch.Tensor,
    t: torch.Tensor,
    cond_embedding: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared velocity error. target (N, D) tokens, cond (N, C) (or its `cond_embedding` (N, W), see
    FlowHead.forward), noise (N, D) and t (N,) drawn by the caller (so that they can be drawn per global sample:
    identical on 1 or N devices). MAR's diffusion_batch_mul is the caller repeating target and the condition with
    fresh noise and times; its mask weight is the caller passing only the hidden tokens."""
    head.check_tokens(target)
    # No fp32 island around the head: its MLP trains in the caller's precision (bf16 under bf16-mixed, as MAR trains
    # its diffusion head under autocast), and its time embedding is an fp32 island of its own. x1, x0, t and the
    # error are fp32 tensors, and autocast leaves elementwise arithmetic and reductions alone, so they stay fp32.
    x1, x0, t = target.float(), noise.float(), t.float()
    xt = t[:, None] * x1 + (1 - t[:, None]) * x0  # (N, D)
    v = head(xt, t, cond, cond_embedding).float()  # (N, D)
    return (v - (x1 - x0)).pow(2).mean()


# ---------------------------------------------------------------------------------------------------------------
# Sampling: ODE (Euler, Heun) and SDE (Euler-Maruyama) from t = 0 (noise) to t = 1 (token), CFG in flow time


def check_flow_sampling(steps: int, sampler: str, guidance_interval: tuple[float, float] = (0.0, 1.0)) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"flow_steps={steps} must be an integer >= 1 (ODE/SDE steps of the flow head)")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not known; use one of {SAMPLERS}")
    lo, hi = guidance_interval
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(
            f"guidance_interval={tuple(guidance_interval)} must satisfy 0 <= low <= high <= 1 "
            "(flow times, 0 = noise, 1 = data, where CFG is applied)"
        )


def guided_velocity(velocity_fn, x: torch.Tensor, t: float, cfg: float, guidance_interval: tuple[float, float]):
    """v(x, t) in fp32, with classifier-free guidance when cfg != 1 and t lies in the guidance interval.
    velocity_fn(x (N, D), t (1,) the time of every row, guided: bool) returns (N, D), or (2N, D) rows [cond; uncond]
    when guided."""
    lo, hi = guidance_interval
    guided = cfg != 1.0 and lo <= t <= hi
    # (1,): one time for all rows, so the head embeds it once rather than once per row (a sizeable share of a narrow
    # head's FLOPs)
    tt = torch.full((1,), t, device=x.device, dtype=torch.float32)
    v = velocity_fn(x, tt, guided).float()
    if not guided:
        return v
    v_cond, v_uncond = v.chunk(2, dim=0)  # (N, D) each
    return v_uncond + cfg * (v_cond - v_uncond)


@torch.no_grad()
def sample_flow(
    velocity_fn,
    noise: torch.Tensor,
    steps: int,
    sampler: Literal["euler", "heun", "euler_maruyama"] = "euler",
    cfg: float = 1.0,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Integrate the head's velocity from noise (N, D) at t = 0 to tokens (N, D) at t = 1, in fp32 (the head's MLP in
    the caller's precision: bf16 under bf16 autocast, as in training).

    Temperature is the caller scaling `noise` (MAR's temperature scales the sampling noise too).
    euler: x += dt v. heun: Euler predictor, trapezoidal corrector (2 evaluations a step, 2nd order), but an Euler
    last step, which ends at the data (so N steps make 2N - 1 evaluations).
    euler_maruyama: dx = [v + w/2 s] dt + sqrt(w) dW with the score s = (t v - x) / (1 - t) of the linear path
    and w = 1 - t (the noise vanishes at the data end); the SDE has the ODE's marginals, its noise corrects errors.
    The last SDE step is deterministic, so no fresh noise lands on the returned token."""
    check_flow_sampling(steps, sampler, guidance_interval)
    # No fp32 island around the loop: x and v are fp32 tensors, and autocast leaves elementwise arithmetic alone,
    # so every update is fp32 while the head's MLP runs in the caller's precision, as it does in training.
    x = noise.float()  # (N, D)
    ts = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64).tolist()
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        dt = t_next - t
        v = guided_velocity(velocity_fn, x, t, cfg, guidance_interval)
        # Every sampler's last step is Euler. Heun's corrector would read the velocity at t = 1, where the true
        # field (E[x1 | x] - x) / (1 - t) is singular and a trained head is far off (EDM's sampler skips it at
        # sigma = 0 too; FlowAR on digits: 2 Heun steps made 26% class accuracy against 99.8% with 2 Euler
        # steps); the SDE adds no fresh noise to the returned token.
        if sampler == "euler" or i == steps - 1:
            x = x + dt * v
        elif sampler == "heun":
            x_pred = x + dt * v
            v_next = guided_velocity(velocity_fn, x_pred, t_next, cfg, guidance_interval)
            x = x + dt * 0.5 * (v + v_next)
        else:  # euler_maruyama
            w = 1.0 - t
            score = (t * v - x) / (1.0 - t)
            dw = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
            x = x + dt * (v + 0.5 * w * score) + math.sqrt(w * dt) * dw
    return x


def head_velocity_fn(head: FlowHead, cond: torch.Tensor, uncond: torch.Tensor | None = None):
    """The velocity_fn of `sample_flow` for a head and its conditions (N, C) (and null-class conditions for CFG).
    The conditions are embedded once here, not at every flow step."""
    both = cond if uncond is None else torch.cat([cond, uncond])  # (N, C) or (2N, C) [cond; uncond]
    embedded = head.cond_embed(both)  # (N, W) or (2N, W)
    embedded_cond = embedded[: cond.shape[0]]  # (N, W)

    def velocity(x: torch.Tensor, t: torch.Tensor, guided: bool) -> torch.Tensor:
        if not guided:
            return head(x, t, cond_embedding=embedded_cond)
        if uncond is None:
            raise ValueError("cfg != 1 needs the unconditional (null-class) conditions")
        return head(torch.cat([x, x]), t, cond_embedding=embedded)  # t (1,) serves both halves

    return velocity
