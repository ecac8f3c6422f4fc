"""FlowARSystem: continuous-token AR with a per-token flow-matching head (or MAR's diffusion head), over one of three
backbones.

- `mar`: MAR (Li et al. 2024): a bidirectional encoder-decoder, random order, a truncated-normal mask ratio in
  training; sampling reveals the tokens in N steps with a cosine schedule and a linear CFG ramp.
- `flowar`: FlowAR (Ren et al. 2024): scales that double, block-causal attention, each scale's input the previous
  scale upsampled; sampling decodes a scale at a time with a KV cache, CFG ramped over the scales (VAR's ramp).
- `causal`: continuous raster AR (causal attention, one token at a time, KV cache): the same head on a causal core.

One system, not three: the three share the tokenizer, the head, the loss, the per-step randomness and sample(),
and differ only in how the backbone makes a condition per token; a config picks the backbone. The head is the
rectified-flow one (`head: flow`, lit_ar's default) or MAR's DDPM (`head: diffusion`, lit_ar.models.diffusion_head),
with which MAR's released generators run in lit_ar.

Randomness in training (class dropout, MAR's order and mask ratio, the flow noise and times) is drawn from a
generator seeded by (the run seed, global step, batch index) for the whole global batch, and each rank keeps the
rows of its own samples (the DistributedSampler deals sample r + i * world to rank r). So 2 processes at batch B/2
draw exactly what 1 process at batch B draws, and the loss curves agree (tests/test_flow_ar.py).
"""

import math
from typing import Literal

import torch

from lit_ar.models.diffusion_head import TRAIN_STEPS, DiffusionHead, diffusion_loss, sample_diffusion, spaced_steps
from lit_ar.models.flow_head import (
    FlowHead,
    check_flow_sampling,
    flow_loss,
    head_velocity_fn,
    sample_flow,
)
from lit_ar.models.flowar import FlowARTransformer
from lit_ar.models.mar import MARTransformer
from lit_ar.sampling import cfg_scale, check_cfg_schedule, check_sampling_args, tokens_to_reveal
from lit_ar.systems.generator import GeneratorSystem, compile_blocks_in_place

BACKBONES = ("mar", "flowar", "causal")
HEADS = ("flow", "diffusion")
FLOW_CFG_SCHEDULES = ("constant", "linear", "power_cosine")


def flow_times(u: torch.Tensor, kind: str) -> torch.Tensor:
    """Uniform draws u in [0, 1) -> flow times: uniform, or logit-normal (SD3: sigmoid of a standard normal)."""
    if kind == "uniform":
        return u
    if kind == "logit_normal":
        return torch.sigmoid(math.sqrt(2) * torch.erfinv(2 * u.clamp(1e-6, 1 - 1e-6) - 1))
    raise ValueError(f"model.init_args.time_sampling={kind!r} is not known; use 'uniform' or 'logit_normal'")


def truncated_normal(u: torch.Tensor, low: float, high: float, mean: float, std: float) -> torch.Tensor:
    """Inverse-CDF draw of N(mean, std) truncated to [low, high] from uniforms u (MAR's mask-ratio law)."""
    cdf = lambda x: 0.5 * (1 + math.erf((x - mean) / (std * math.sqrt(2))))  # noqa: E731
    p = cdf(low) + u * (cdf(high) - cdf(low))
    return (mean + std * math.sqrt(2) * torch.erfinv(2 * p - 1)).clamp(low, high)


class FlowARSystem(GeneratorSystem):
    continuous_tokens = True

    def __init__(
        self,
        backbone: Literal["mar", "flowar", "causal"] = "mar",
        token_dim: int | None = None,
        grid_size: int | None = None,
        dim: int = 768,
        depth: int = 12,
        n_heads: int = 12,
        mlp_ratio: float = 4.0,
        attn_dropout: float = 0.0,
        proj_dropout: float = 0.0,
        decoder_depth: int | None = None,
        buffer_size: int = 64,
        mask_ratio_min: float = 0.7,
        scales: list[int] | None = None,
        head_width: int = 1024,
        head_depth: int = 6,
        head_batch_mul: int = 4,
        time_sampling: Literal["uniform", "logit_normal"] = "uniform",
        posterior_sample: bool = True,
        head: Literal["flow", "diffusion"] = "flow",
        **kwargs,
    ):
        """
        Args:
            backbone: `mar` (bidirectional, random order, MAR), `flowar` (scale-wise, FlowAR) or `causal`
                (raster order, causal attention).
            token_dim: Width D of a continuous token; null takes the tokenizer's `latent_channels` (when both are
                set they must agree). Needed only without a tokenizer (tests on plain tensors).
            grid_size: Side of the latent token grid; null takes the tokenizer's `grid_size`.
            dim: Transformer width (MAR-B: 768).
            depth: Transformer blocks; for `mar` the encoder's blocks (MAR-B: 12 + 12 decoder blocks).
            n_heads: Attention heads.
            mlp_ratio: MLP hidden width as a multiple of `dim`.
            attn_dropout: Attention dropout (MAR: 0.1).
            proj_dropout: Dropout after attention and MLP projections (MAR: 0.1).
            decoder_depth: `mar` only: decoder blocks; null means `depth`.
            buffer_size: `mar` only: class (buffer) tokens in front of the sequence (MAR: 64).
            mask_ratio_min: `mar` only: the training mask ratio is drawn from a normal centred at 1 with std 0.25,
                truncated to [mask_ratio_min, 1] (MAR: 0.7).
            scales: `flowar` only: token-grid sides of the scales, increasing to the grid side; null means
                doubling (1, 2, 4, ..., grid_size).
            head_width: Width of the flow head's residual MLP (MAR-B: 1024).
            head_depth: Residual AdaLN blocks of the flow head (MAR-B: 6).
            head_batch_mul: Each token is trained with this many independent (noise, time) draws per step
                (MAR's diffusion_batch_mul: the head is cheap, the backbone's pass is shared).
            time_sampling: Law of the flow time in training: `uniform` or `logit_normal` (SD3); the diffusion head
                draws its steps uniformly (MAR).
            posterior_sample: Train on a sample of the KL tokenizer's posterior (MAR) rather than its mean. The
                tokenizer draws that noise from each process's own random state, so with it on, N DDP processes
                match one process in law but not bit for bit (every other random draw here is per global sample).
            head: `flow` (rectified flow, few ODE steps) or `diffusion` (MAR's DiffLoss: a DDPM over 1000 cosine
                steps predicting the noise and a learned variance; samples with 100 steps in MAR).
        """
        super().__init__(**kwargs)
        if backbone not in BACKBONES:
            raise ValueError(f"model.init_args.backbone={backbone!r} is not known; use one of {BACKBONES}")
        if scales is not None and backbone != "flowar":
            raise ValueError(f"model.init_args.scales={scales} applies to backbone='flowar' only, not {backbone!r}")
        if not 0.0 <= mask_ratio_min <= 1.0:
            raise ValueError(f"model.init_args.mask_ratio_min={mask_ratio_min} must be in [0, 1]")
        if head_batch_mul < 1:
            raise ValueError(f"model.init_args.head_batch_mul={head_batch_mul} must be >= 1")
        flow_times(torch.zeros(1), time_sampling)  # refuses an unknown law now
        if head not in HEADS:
            raise ValueError(f"model.init_args.head={head!r} is not known; use one of {HEADS}")
        if head == "diffusion" and time_sampling != "uniform":
            raise ValueError(f"model.init_args.time_sampling={time_sampling!r} applies to head='flow' only; the "
                             "diffusion head draws its DDPM steps uniformly (leave it 'uniform')")  # fmt: skip
        token_dim, grid_size = self.resolve_token_shape(token_dim, grid_size)
        self.token_dim, self.grid_size = token_dim, grid_size
        num_classes = self.hparams.num_classes
        common = dict(dim=dim, depth=depth, n_heads=n_heads, mlp_ratio=mlp_ratio, attn_dropout=attn_dropout,
                      proj_dropout=proj_dropout)  # fmt: skip
        if backbone == "mar":
            self.core = MARTransformer(token_dim, grid_size**2, num_classes, decoder_depth=decoder_depth,
                                       buffer_size=buffer_size, **common)  # fmt: skip
        else:
            order = "scale" if backbone == "flowar" else "raster"
            self.core = FlowARTransformer(token_dim, grid_size, num_classes, order=order, scales=scales, **common)
        # MAR's decoder width is its encoder's (dim), the head's condition
        self.head = (DiffusionHead if head == "diffusion" else FlowHead)(token_dim, dim, head_width, head_depth)
        if self.hparams.compile:
            # MAR's encoder length and head rows change at every step (the mask ratio is drawn per batch)
            dynamic = True if backbone == "mar" else None
            compile_blocks_in_place(self.core.blocks, dynamic)
            # the whole head, not its blocks: sampling calls it flow_steps times per AR step on a few rows, where
            # one graph a call beats a dozen eager ops around compiled blocks (MAR small, bf16: 1.12x)
            self.head.compile(dynamic=dynamic)  # in place, so checkpoint keys carry no `_orig_mod.`
        self._run_seed: int | None = None

    def resolve_token_shape(self, token_dim: int | None, grid_size: int | None) -> tuple[int, int]:
        tok = self.tokenizer
        if tok is None:
            if token_dim is None or grid_size is None:
                raise ValueError(
                    "without model.init_args.tokenizer_ckpt, set model.init_args.token_dim and "
                    "model.init_args.grid_size (the continuous tokens' width and grid side)"
                )
            return token_dim, grid_size
        if token_dim is not None and token_dim != tok.latent_channels:
            raise ValueError(
                f"model.init_args.token_dim={token_dim} differs from the tokenizer's latent width "
                f"latent_channels={tok.latent_channels}; leave token_dim null to take the tokenizer's"
            )
        if grid_size is not None and grid_size != tok.grid_size:
            raise ValueError(f"model.init_args.grid_size={grid_size} differs from the tokenizer's grid_size="
                             f"{tok.grid_size}; leave grid_size null to take the tokenizer's")  # fmt: skip
        return tok.latent_channels, tok.grid_size

    # -- randomness drawn per global sample ----------------------------------------------------------------------
    def step_generator(self, batch_idx: int, stage: str) -> torch.Generator:
        """A generator seeded by (run seed, stage, global step, batch index): the same on every rank."""
        if self._run_seed is None:
            self._run_seed = torch.initial_seed()  # seed_everything's seed, identical on every rank
        offset = 0 if stage == "train" else 1 << 40
        seed = (self._run_seed * 1_000_003 + offset + self.global_step * 65_537 + batch_idx) % (1 << 63)
        return torch.Generator(device=self.device).manual_seed(seed)

    def draw(self, fn, g: torch.Generator, batch: int, *shape: int) -> torch.Tensor:
        """fn(size, generator=g) for the whole global batch; this rank's rows (sample r + i * world)."""
        trainer = self._trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        out = fn((batch * world, *shape), generator=g, device=self.device)
        return out[rank::world]

    # -- training ------------------------------------------------------------------------------------------------
    def tokens_from_batch(self, batch: dict) -> torch.Tensor:
        """Continuous tokens (B, L, D): from a token cache, or encoded now (a posterior sample or the mean)."""
        if "tokens" in batch:
            return batch["tokens"]
        if self.tokenizer is None:
            raise ValueError("this generator has no tokenizer: set model.init_args.tokenizer_ckpt")
        self.tokenizer.eval()
        with torch.no_grad():
            return self.tokenizer.encode(batch["image"], sample=self.hparams.posterior_sample)

    def loss(self, batch: dict, g: torch.Generator) -> torch.Tensor:
        tokens = self.tokens_from_batch(batch).float()  # (B, L, D)
        self.head.check_tokens(tokens, "the tokenizer's tokens")
        labels = batch["label"]
        B, L, D = tokens.shape
        if self.training and self.hparams.class_dropout > 0:
            drop = self.draw(torch.rand, g, B) < self.hparams.class_dropout  # (B,)
            labels = torch.where(drop, torch.full_like(labels, self.hparams.num_classes), labels)

        if self.hparams.backbone == "mar":
            order = self.draw(torch.rand, g, B, L).argsort(dim=1)  # (B, L) a random order per sample
            u = torch.rand((), generator=g, device=self.device)  # one mask ratio per step, as MAR
            ratio = truncated_normal(u, self.hparams.mask_ratio_min, 1.0, 1.0, 0.25)
            # at least one (a ratio of 0 would leave nothing to learn from)
            num_masked = max(1, int(math.ceil(L * float(ratio))))
            rank_of = order.argsort(dim=1)  # (B, L) position -> its rank in the order
            mask = rank_of < num_masked  # (B, L) True = hidden: the first num_masked tokens of the order
            hidden = order[:, :num_masked]  # (B, n) the hidden positions
            # MAR's loss counts the hidden tokens only (its mask weight), so the backbone's last block and the
            # head run there alone (the same loss as weighting every position, without the head's work on the
            # known ones: about 13% of it at MAR's mean mask ratio, 0.87)
            cond = self.core(tokens, mask, labels, positions=hidden)  # (B, n, C)
            target = tokens.gather(1, hidden[..., None].expand(-1, -1, D))  # (B, n, D)
        else:
            hidden = None
            target = self.core.targets(tokens)  # (B, T, D)
            cond = self.core(self.core.teacher_inputs(target), labels)  # (B, T, C)

        # MAR's diffusion_batch_mul: m (noise, time) draws per token share one backbone pass
        m, T = self.hparams.head_batch_mul, cond.shape[1]
        # MAR: drawn for every position, so the random stream does not depend on how many are hidden
        drawn = T if hidden is None else L
        noise = self.draw(torch.randn, g, B, m, drawn, D)  # (B, m, drawn, D)
        u = self.draw(torch.rand, g, B, m, drawn)  # (B, m, drawn)
        diffusion = self.hparams.head == "diffusion"
        # the diffusion head's DDPM step indices in [0, 1000), or flow times in (0, 1)
        if diffusion:
            t = (u * TRAIN_STEPS).long().clamp(max=TRAIN_STEPS - 1)
        else:
            t = flow_times(u, self.hparams.time_sampling)
        if hidden is not None:
            noise = noise.gather(2, hidden[:, None, :, None].expand(B, m, T, D))  # (B, m, n, D)
            t = t.gather(2, hidden[:, None].expand(B, m, T))  # (B, m, n)
        rep = lambda x: x[:, None].expand(B, m, *x.shape[1:]).reshape(B * m * T, *x.shape[2:])  # noqa: E731
        embedded = self.head.cond_embed(cond)  # (B, T, W): once per token, not once per draw
        loss_fn = diffusion_loss if diffusion else flow_loss
        return loss_fn(self.head, rep(target), None, noise.reshape(-1, D), t.reshape(-1), rep(embedded))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch, self.step_generator(batch_idx, "train"))
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch, self.step_generator(batch_idx, "val"))
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    # -- sampling ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        labels: torch.Tensor,
        cfg: float = 1.0,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        steps: int | None = None,
        flow_steps: int | None = None,
        sampler: Literal["euler", "heun", "euler_maruyama", "ddpm"] | None = None,
        cfg_schedule: Literal["constant", "linear", "power_cosine"] = "linear",
        guidance_interval: tuple[float, float] = (0.0, 1.0),
    ) -> torch.Tensor:
        """labels (B,) -> images (B, C, H, W) in [-1, 1]. See sample_tokens for the arguments."""
        tokens = self.sample_tokens(labels, cfg, temperature, top_k, top_p, generator, steps, flow_steps, sampler,
                                    cfg_schedule, guidance_interval)  # fmt: skip
        return self.decode(tokens)

    @torch.no_grad()
    def sample_tokens(
        self,
        labels: torch.Tensor,
        cfg: float = 1.0,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        steps: int | None = None,
        flow_steps: int | None = None,
        sampler: Literal["euler", "heun", "euler_maruyama", "ddpm"] | None = None,
        cfg_schedule: Literal["constant", "linear", "power_cosine"] = "linear",
        guidance_interval: tuple[float, float] = (0.0, 1.0),
    ) -> torch.Tensor:
        """labels (B,) -> continuous tokens (B, L, D).

        cfg: guidance scale (1 = none), applied to the head's velocity in flow time (the diffusion head's noise
        prediction); `cfg_schedule` ramps it over the AR steps (`linear`: 1 -> cfg, MAR's and VAR's). temperature:
        scales the flow head's starting noise (the diffusion head's noise at each DDPM step, as MAR). top_k / top_p:
        discrete-token filters; refused here. steps: AR steps of `mar` (default min(64, L), cosine schedule);
        `flowar` and `causal` take one step per scale or token (leave null).
        flow_steps: ODE/SDE steps of the flow head (default 25), DDPM steps of the diffusion head (default 100,
        MAR's). sampler: the flow head's `euler` (default), `heun` (2 head calls a step, 1 in the last) or
        `euler_maruyama` (SDE); the diffusion head's `ddpm` (its only one). guidance_interval: flow times
        [low, high] where the flow head applies CFG (1 outside)."""
        labels, rows = self.sampling_labels(labels, cfg)  # (B,), (B,) or (2B,) [labels; null] under CFG
        check_sampling_args(temperature, cfg=cfg)
        if top_k is not None or top_p is not None:
            raise ValueError(f"top_k={top_k}, top_p={top_p}: filters of discrete logits; continuous tokens take "
                             "temperature (the head's noise scale) only")  # fmt: skip
        flow_steps, sampler = self.check_head_sampling(flow_steps, sampler, guidance_interval)
        if cfg_schedule not in FLOW_CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule={cfg_schedule!r} is not supported here; use one of {FLOW_CFG_SCHEDULES} "
                             "(guidance_interval limits CFG in flow time)")  # fmt: skip
        check_cfg_schedule(cfg_schedule)
        flow = dict(temperature=temperature, flow_steps=flow_steps, sampler=sampler,
                    guidance_interval=tuple(guidance_interval), generator=generator)  # fmt: skip
        # the backbone blocks' and the head's linear weights cast once for the call (exact; see
        # linears_in_autocast_dtype), but not the head's time embedding: an fp32 island, which casts nothing
        head_linears = [m for name, m in self.head.named_children() if name != "time_embed"]
        with self.linears_cast_for_sampling([*self.core.blocks, *head_linears]):
            if self.hparams.backbone == "mar":
                return self.sample_mar(rows, cfg, cfg_schedule, steps, flow)
            return self.sample_groups(rows, cfg, cfg_schedule, steps, flow)

    def check_head_sampling(self, flow_steps: int | None, sampler: str | None,
                            guidance_interval: tuple[float, float]) -> tuple[int, str]:  # fmt: skip
        """The head's steps and sampler, defaults filled in; refuses what this head does not take."""
        if self.hparams.head == "flow":
            flow_steps, sampler = 25 if flow_steps is None else flow_steps, sampler or "euler"
            check_flow_sampling(flow_steps, sampler, guidance_interval)
            return flow_steps, sampler
        flow_steps = 100 if flow_steps is None else flow_steps
        if sampler not in (None, "ddpm"):
            raise ValueError(f"sampler={sampler!r}: the diffusion head (head='diffusion') samples with 'ddpm' only; "
                             "leave sampler null")  # fmt: skip
        if tuple(guidance_interval) != (0.0, 1.0):
            raise ValueError(f"guidance_interval={tuple(guidance_interval)} is the flow head's; the diffusion head "
                             "guides every DDPM step (leave it (0.0, 1.0))")  # fmt: skip
        spaced_steps(flow_steps)  # refuses a count outside [1, 1000]
        return flow_steps, "ddpm"

    def head_sample(self, cond: torch.Tensor, B: int, cfg: float, flow: dict) -> torch.Tensor:
        """Conditions (B, n, C), or (2B, n, C) rows [cond; uncond] under CFG -> tokens (B, n, D) (fp32)."""
        n, C = cond.shape[1], cond.shape[2]
        c = cond[:B].reshape(B * n, C)
        u = cond[B:].reshape(B * n, C) if cond.shape[0] > B else None
        g = flow["generator"]
        if flow["sampler"] == "ddpm":
            noise = torch.randn(B * n, self.token_dim, generator=g, device=cond.device)
            x = sample_diffusion(self.head, c, u, noise, flow["flow_steps"], cfg, flow["temperature"], g)
            return x.view(B, n, self.token_dim)
        noise = flow["temperature"] * torch.randn(B * n, self.token_dim, generator=g, device=cond.device)
        x = sample_flow(head_velocity_fn(self.head, c, u), noise, flow["flow_steps"], flow["sampler"], cfg,
                        flow["guidance_interval"], g)  # fmt: skip
        return x.view(B, n, self.token_dim)

    def sample_mar(self, rows: torch.Tensor, cfg: float, schedule: str, steps: int | None, flow: dict):
        """rows: the conditioning labels, (B,) or (2B,) [labels; null class] under CFG."""
        B, L, D = rows.shape[0] // (2 if cfg != 1.0 else 1), self.grid_size**2, self.token_dim
        steps = min(64, L) if steps is None else steps
        counts = tokens_to_reveal("cosine", L, steps)  # refuses steps outside [1, L]
        tokens = torch.zeros(B, L, D, device=self.device)  # (B, L, D)
        mask = torch.ones(B, L, dtype=torch.bool, device=self.device)  # True = still unknown
        g = flow["generator"]
        order = torch.rand(B, L, generator=g, device=self.device).argsort(dim=1)  # (B, L)
        done = 0
        for n in counts:
            twice = (lambda x: torch.cat([x, x])) if cfg != 1.0 else (lambda x: x)
            # (B, n) the next n tokens: as MAR, the last n of the order still hidden (its first stay hidden longest),
            # by position, the order of the rows MAR draws its noise for
            pos = order[:, L - done - n : L - done].sort(dim=1).values
            done += n
            cond = self.core(twice(tokens), twice(mask), rows, positions=twice(pos))  # (B or 2B, n, C)
            # MAR: 1 + (cfg - 1) * (L - tokens left hidden) / L, where at least 1 is counted as left even after the
            # last step
            scale = cfg_scale(schedule, cfg, min(done, L - 1) / L)
            new = self.head_sample(cond, B, scale, flow)  # (B, n, D)
            tokens = tokens.scatter(1, pos[..., None].expand(-1, -1, D), new)
            mask = mask.scatter(1, pos, False)
        return tokens

    def sample_groups(self, rows: torch.Tensor, cfg: float, schedule: str, steps: int | None, flow: dict):
        """rows: the conditioning labels, (B,) or (2B,) [labels; null class] under CFG."""
        core, B = self.core, rows.shape[0] // (2 if cfg != 1.0 else 1)
        K = len(core.sizes)
        if steps is not None and steps != K:
            raise ValueError(f"steps={steps}: backbone={self.hparams.backbone!r} takes one step per "
                             f"{'scale' if core.order == 'scale' else 'token'} ({K}); leave steps null")  # fmt: skip
        use_autocast = torch.is_autocast_enabled(self.device.type)
        dtype = torch.get_autocast_dtype(self.device.type) if use_autocast else core.pos.dtype
        core.setup_cache(rows.shape[0], dtype, self.device)
        try:
            groups, inputs = [], None
            for k in range(K):
                cond = core.step(k, inputs, rows)  # (B or 2B, size_k, C)
                # VAR's ramp over scales (k / (K - 1)); in raster order the fraction of tokens drawn
                progress = k / max(K - 1, 1) if core.order == "scale" else (k + 1) / K
                x = self.head_sample(cond, B, cfg_scale(schedule, cfg, progress), flow)  # (B, size_k, D)
                groups.append(x)
                if k + 1 < K:
                    inputs = core.next_input(k, x)
                    inputs = torch.cat([inputs, inputs]) if cfg != 1.0 else inputs
        finally:
            core.clear_cache()
        return groups[-1] if core.order == "scale" else torch.cat(groups, dim=1)  # (B, L, D)
