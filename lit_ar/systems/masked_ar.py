"""MaskedARSystem: MaskGIT training (predict randomly masked tokens) and parallel iterative decoding.

Training: each sample draws a mask ratio through the mask schedule (MaskGIT: ratio = cos(pi/2 * u), u ~ U(0, 1)),
that many of its tokens are replaced by the mask token, and the loss is the cross-entropy on the masked positions.
Sampling: start from an all-masked grid; at each of `steps` steps predict every position, sample a token at each
masked one, and keep the most confident of them (log-probability of the sampled token plus Gumbel noise that cools
over the steps), as many as the mask schedule says; revealed tokens are never masked again. With
`order="random"` the tokens revealed at a step are the next chunk of a random permutation instead (MAR's order).
"""

from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
import torchmetrics

from lit_ar.models.masked_ar import PRESETS, MaskedTransformer
from lit_ar.sampling import (
    MASK_SCHEDULES,
    cfg_scale,
    check_cfg_schedule,
    check_sampling_args,
    filter_logits,
    guide,
    gumbel_noise,
    mask_ratio,
    sample_logits,
    tokens_to_reveal,
)
from lit_ar.systems.generator import GeneratorSystem, compile_blocks_in_place

ORDERS = ("confidence", "random")
_VAL_SEED = 20240917  # validation masks are the same at every validation run, so val/loss curves are comparable


@contextmanager
def eval_mode(module: torch.nn.Module):
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def _mix(*keys: int) -> int:
    """A 63-bit seed from integer keys (splitmix-style), so neighbouring steps get unrelated generators."""
    h = 0x9E3779B97F4A7C15
    for k in keys:
        h = (h ^ (int(k) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class MaskedARSystem(GeneratorSystem):
    def __init__(
        self,
        preset: Literal["tiny", "small", "base"] = "tiny",
        vocab_size: int | None = None,
        grid_size: int | None = None,
        dim: int | None = None,
        n_layers: int | None = None,
        n_heads: int | None = None,
        mlp: Literal["gelu", "swiglu"] = "gelu",
        norm: Literal["rms", "layer"] = "layer",
        qk_norm: bool = False,
        pos_embed: Literal["rope2d", "learned"] = "rope2d",
        dropout: float = 0.1,
        drop_path: float = 0.0,
        mask_schedule: str = "cosine",
        mask_power: float = 2.0,
        label_smoothing: float = 0.1,
        **kwargs,
    ):
        """
        Args:
            preset: Transformer size: tiny (CPU tests), small (shapes on one GPU), base (MaskGIT: 24 layers, width
                768, 16 heads). `dim`, `n_layers`, `n_heads` override it.
            vocab_size: Codebook size; None takes the tokenizer's (if given it must equal the tokenizer's).
            grid_size: Token grid side (L = grid_size**2 tokens); None takes the tokenizer's.
            dim: Width (overrides the preset).
            n_layers: Number of transformer blocks (overrides the preset).
            n_heads: Attention heads (overrides the preset).
            mlp: MLP type: gelu (MaskGIT, 4x width) or swiglu (LLaMA).
            norm: Normalisation: layer (MaskGIT) or rms.
            qk_norm: RMS-normalise queries and keys (stabilises large models in bf16).
            pos_embed: Positions: rope2d (2D rotary, row/column) or learned (MaskGIT's absolute embedding).
            dropout: Dropout on embeddings and residual branches (MaskGIT: 0.1).
            drop_path: Stochastic depth rate of the last block (grows linearly from 0 over depth).
            mask_schedule: Schedule mapping u ~ U(0, 1) to each training sample's mask ratio; one of cosine
                (MaskGIT), arccos, linear, power, sigmoid.
            mask_power: Exponent of the `power` schedule (ratio = 1 - u**mask_power).
            label_smoothing: Label smoothing of the cross-entropy on masked tokens (MaskGIT: 0.1).
        """
        super().__init__(**kwargs)
        if preset not in PRESETS:
            raise ValueError(f"model.init_args.preset={preset!r} is not known; known presets: {tuple(PRESETS)}")
        if mask_schedule not in MASK_SCHEDULES:
            raise ValueError(
                f"model.init_args.mask_schedule={mask_schedule!r} is not known; known schedules: {MASK_SCHEDULES}"
            )
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"model.init_args.label_smoothing={label_smoothing} must be in [0, 1)")
        vocab_size, grid_size = self._token_space(vocab_size, grid_size)
        self.model = MaskedTransformer.from_preset(
            preset, vocab_size, grid_size, self.hparams.num_classes, dim=dim, n_layers=n_layers, n_heads=n_heads,
            mlp=mlp, norm=norm, qk_norm=qk_norm, pos_embed=pos_embed, dropout=dropout, drop_path=drop_path,
        )  # fmt: skip
        if self.hparams.compile:
            compile_blocks_in_place(self.model.blocks)
        self.val_token_acc = torchmetrics.MeanMetric()
        self._train_seed: int | None = None
        self._checked_token_range = False

    def _token_space(self, vocab_size: int | None, grid_size: int | None) -> tuple[int, int]:
        """The vocabulary and grid, from the tokenizer when there is one (and then checked against the settings)."""
        tok = self.tokenizer
        if tok is None:
            if vocab_size is None or grid_size is None:
                raise ValueError(
                    "model.init_args.tokenizer_ckpt is not set, so model.init_args.vocab_size and "
                    f"model.init_args.grid_size must be (got vocab_size={vocab_size}, grid_size={grid_size})"
                )
            return vocab_size, grid_size
        if tok.is_continuous or tok.vocab_size is None or getattr(tok, "scales", None):
            raise ValueError(
                f"model.init_args.tokenizer_ckpt={self.hparams.tokenizer_ckpt!r} is a "
                f"{'continuous' if tok.is_continuous else 'multi-scale'} tokenizer; the masked family models one "
                "grid of discrete tokens (use a vq, fsq or lfq tokenizer)"
            )
        if vocab_size is not None and vocab_size != tok.vocab_size:
            raise ValueError(
                f"model.init_args.vocab_size={vocab_size} differs from the tokenizer's vocab_size {tok.vocab_size}; "
                "leave it unset to take the tokenizer's"
            )
        if grid_size is not None and grid_size != tok.grid_size:
            raise ValueError(
                f"model.init_args.grid_size={grid_size} differs from the tokenizer's grid_size {tok.grid_size}; "
                "leave it unset to take the tokenizer's"
            )
        return tok.vocab_size, tok.grid_size

    # -- randomness that does not depend on the number of devices ------------------------------------------------
    def _world(self) -> tuple[int, int]:
        trainer = self._trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        # one base seed for every rank (rank 0's), whatever each process's own seeding was
        self._train_seed = int(self.trainer.strategy.broadcast(torch.initial_seed() & 0x7FFFFFFFFFFFFFFF))

    def _noise(self, seed: int, local_batch: int) -> dict[str, torch.Tensor]:
        """The training randomness of this rank's samples, drawn for the whole global batch from one generator and
        sliced: with N ranks, local sample i of rank r is global sample i*N + r (the interleaving of the
        datamodule's DistributedSampler), so 1 process at batch N*B and N processes at batch B draw the same
        mask and class dropout for the same sample."""
        world, rank = self._world()
        B, L = local_batch * world, self.model.num_tokens
        g = torch.Generator(device=self.device).manual_seed(seed)
        draws = {
            "ratio": torch.rand(B, generator=g, device=self.device),  # mask ratio, through the schedule
            "drop": torch.rand(B, generator=g, device=self.device),  # class dropout
            "order": torch.rand(B, L, generator=g, device=self.device),  # which positions get masked
        }
        n_masked = self._num_masked(draws["ratio"])  # (B,)
        local = {k: v[rank::world] for k, v in draws.items()}
        local["n_masked"] = n_masked[rank::world]
        local["global_masked"] = n_masked.sum()  # every rank knows the global count without communication
        return local

    def _num_masked(self, u: torch.Tensor) -> torch.Tensor:
        """(B,) uniforms -> (B,) masked-token counts in [1, L] (MaskGIT: ceil(cos(pi/2 * u) * L))."""
        L = self.model.num_tokens
        ratio = mask_ratio(self.hparams.mask_schedule, u, power=self.hparams.mask_power)
        return torch.ceil(ratio * L).long().clamp(1, L)

    # -- training ----------------------------------------------------------------------------------------------
    def _tokens(self, batch: dict) -> torch.Tensor:
        tokens = self.tokens_from_batch(batch)  # (B, L)
        L, V = self.model.num_tokens, self.model.vocab_size
        if tokens.ndim != 2 or tokens.shape[1] != L:
            raise ValueError(f"expected tokens of shape (B, {L}) for grid_size={self.model.grid_size}, got "
                             f"{tuple(tokens.shape)}")  # fmt: skip
        if not self._checked_token_range:  # once: a .max() per step would synchronise the device every step
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= V:
                raise ValueError(f"token ids from {lo} to {hi} fall outside the vocabulary [0, {V})")
            self._checked_token_range = True
        return tokens.long()

    def _masked_states(self, tokens: torch.Tensor, labels: torch.Tensor, noise: dict):
        """Mask and run the core -> its last-layer states at the masked positions (M, C) and their targets (M,)."""
        rank_in_row = noise["order"].argsort(-1).argsort(-1)  # (B, L): a random permutation per sample
        masked = rank_in_row < noise["n_masked"][:, None]  # (B, L) bool, n_masked[i] True per row
        hidden = self.model.hidden(tokens.masked_fill(masked, self.model.mask_token), labels)  # (B, L, C)
        return hidden[masked], tokens[masked]  # (M, C), (M,): the head runs where the loss is taken, nowhere else

    def _global_mean(self, ce_sum: torch.Tensor, noise: dict) -> torch.Tensor:
        # Mean over the masked tokens of the GLOBAL batch: DDP averages the ranks' gradients, so each rank divides
        # its sum by (global count / world); the result equals one process's mean over the same samples.
        world, _ = self._world()
        return ce_sum * world / noise["global_masked"]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        tokens, labels = self._tokens(batch), batch["label"]
        seed = self._train_seed if self._train_seed is not None else torch.initial_seed()
        noise = self._noise(_mix(seed, self.current_epoch, batch_idx), tokens.shape[0])
        labels = torch.where(noise["drop"] < self.hparams.class_dropout, self.hparams.num_classes, labels)
        hidden, targets = self._masked_states(tokens, labels, noise)
        ce = self.token_loss(hidden, targets, reduction="sum", label_smoothing=self.hparams.label_smoothing)
        loss = self._global_mean(ce, noise)
        # sync_dist: the logged loss is the global-batch loss, the same figure on 1 or N devices
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        tokens, labels = self._tokens(batch), batch["label"]
        noise = self._noise(_mix(_VAL_SEED, batch_idx), tokens.shape[0])
        hidden, targets = self._masked_states(tokens, labels, noise)
        logits = self.model.logits(hidden).float()  # (M, V)
        loss = self._global_mean(F.cross_entropy(logits, targets, reduction="sum"), noise)
        self.val_token_acc.update((logits.argmax(-1) == targets).float())
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/token_acc", self.val_token_acc)

    # -- sampling ----------------------------------------------------------------------------------------------
    def check_sample_args(self, labels, cfg, temperature, top_k, top_p, steps, mask_schedule, mask_power,
                          choice_temperature, cfg_schedule, cfg_interval, order):  # fmt: skip
        """Refuse bad settings before any work; returns the number of tokens each step reveals and `sampling_labels`'
        (labels, conditioning rows)."""
        check_sampling_args(temperature, top_k, top_p, cfg)
        labels, rows = self.sampling_labels(labels, cfg, allow_null=self.hparams.class_dropout > 0)
        check_cfg_schedule(cfg_schedule, tuple(cfg_interval))
        if order not in ORDERS:
            raise ValueError(f"order={order!r} is not known; known orders: {ORDERS}")
        if not choice_temperature >= 0:
            raise ValueError(f"choice_temperature={choice_temperature} must be >= 0 (0: no Gumbel noise)")
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise ValueError(f"steps={steps!r} must be an integer between 1 and the number of tokens")
        # raises on steps outside [1, L] and on an unknown mask_schedule (listing the known ones)
        return tokens_to_reveal(mask_schedule, self.model.num_tokens, steps, power=mask_power), labels, rows

    @torch.no_grad()
    def generate(
        self,
        labels: torch.Tensor,
        cfg: float = 1.0,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        steps: int = 8,
        mask_schedule: str = "cosine",
        mask_power: float = 2.0,
        choice_temperature: float = 4.5,
        cfg_schedule: str = "constant",
        cfg_interval: tuple[float, float] = (0.0, 1.0),
        cfg_power: float = 1.0,
        order: Literal["confidence", "random"] = "confidence",
        return_trace: bool = False,
    ):
        """labels (B,) -> tokens (B, L). See `sample` for the settings. With return_trace, also a dict of the grid
        before each step and after the last: `masked` (steps + 1, B, L) bool (True = not yet revealed) and
        `tokens` (steps + 1, B, L) long (mask_token where masked)."""
        counts, labels, rows = self.check_sample_args(labels, cfg, temperature, top_k, top_p, steps, mask_schedule,
                                                      mask_power, choice_temperature, cfg_schedule, cfg_interval,
                                                      order)  # fmt: skip
        # dropout off, the previous mode back even on error; the blocks' linear weights cast once for the call
        # (exact; see linears_in_autocast_dtype)
        with eval_mode(self.model), self.linears_cast_for_sampling(self.model.blocks):
            B, L = labels.shape[0], self.model.num_tokens
            tokens = torch.full((B, L), self.model.mask_token, dtype=torch.long, device=self.device)  # (B, L)
            masked = torch.ones(B, L, dtype=torch.bool, device=self.device)  # (B, L) True = not yet revealed
            if order == "random":  # MAR: a random generation order per sample, revealed chunk by chunk
                perm = torch.rand(B, L, generator=generator, device=self.device).argsort(-1)  # (B, L) positions
            trace, done = {"masked": [masked], "tokens": [tokens]}, 0
            for step, k in enumerate(counts):
                progress = (done + k) / L  # fraction revealed once this step is done (MAR's CFG progress)
                if cfg != 1.0:  # one batch of 2B: conditional and unconditional
                    cond, uncond = self.model(tokens.repeat(2, 1), rows).float().chunk(2)
                    logits = guide(cond, uncond, cfg_scale(cfg_schedule, cfg, progress, tuple(cfg_interval), cfg_power))
                else:
                    logits = self.model(tokens, labels).float()  # (B, L, V)
                # Sample only where it can matter (every sample has the same count M of masked tokens, so the
                # shapes stay static): the next chunk of the permutation (random order) or every masked position.
                M = k if order == "random" else L - done
                where = perm[:, done : done + k] if order == "random" else masked.float().topk(M, dim=-1).indices
                logits = logits.gather(1, where[..., None].expand(-1, -1, logits.shape[-1]))  # (B, M, V)
                logits = filter_logits(logits / temperature, top_k, top_p)
                sampled = sample_logits(logits, generator=generator)  # (B, M)
                if order == "random":
                    chosen, picked = where, sampled  # (B, k)
                else:
                    logp = logits.log_softmax(-1).gather(-1, sampled[..., None])[..., 0]  # (B, M)
                    # MaskGIT: Gumbel noise on the confidence, its temperature annealed to 0 at the last step
                    noise_temp = choice_temperature * (1.0 - (step + 1) / len(counts))
                    gumbel = gumbel_noise((B, M), generator, self.device)  # (B, M)
                    top = (logp + noise_temp * gumbel).topk(k, dim=-1).indices  # (B, k) the most confident
                    chosen, picked = where.gather(1, top), sampled.gather(1, top)  # positions, tokens (B, k)
                tokens = tokens.scatter(1, chosen, picked)  # chosen positions are masked: nothing is overwritten
                masked = masked.scatter(1, chosen, False)
                done += k
                trace["masked"].append(masked)
                trace["tokens"].append(tokens)
        return (tokens, {k: torch.stack(v) for k, v in trace.items()}) if return_trace else tokens

    def sample(
        self,
        labels: torch.Tensor,
        cfg: float = 1.0,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        steps: int = 8,
        mask_schedule: str = "cosine",
        mask_power: float = 2.0,
        choice_temperature: float = 4.5,
        cfg_schedule: str = "constant",
        cfg_interval: tuple[float, float] = (0.0, 1.0),
        cfg_power: float = 1.0,
        order: Literal["confidence", "random"] = "confidence",
    ) -> torch.Tensor:
        """labels (B,) -> images (B, C, H, W) in [-1, 1] by MaskGIT parallel decoding.

        Args:
            labels: Class of each image, in [0, num_classes) (num_classes = the null class: unconditional).
            cfg: Classifier-free guidance scale on the logits (1 = off; runs a batch of 2B).
            temperature: Softmax temperature of the token sampling.
            top_k: Keep the k most likely tokens (None: all).
            top_p: Keep the smallest set of tokens whose probability reaches top_p (None: all).
            generator: Seeded generator of every random draw (same seed, same samples).
            steps: Decoding steps, between 1 and L = grid_size**2 (L steps reveal one token per step).
            mask_schedule: How many tokens stay masked after each step: cosine (MaskGIT), arccos, linear, power,
                sigmoid.
            mask_power: Exponent of the `power` schedule.
            choice_temperature: Gumbel-noise temperature on the confidence at step 0, annealed linearly to 0
                (MaskGIT: 4.5).
            cfg_schedule: Guidance over the revealed fraction p (counted after the step, as MAR does): constant
                (cfg), linear (1 + (cfg - 1) * p, MAR), interval (cfg inside cfg_interval, 1 outside), power_cosine
                (1 + (cfg - 1) * (1 - cos(pi * p**cfg_power)) / 2, MUSE).
            cfg_interval: (low, high) revealed fractions where the `interval` schedule guides.
            cfg_power: Exponent of the `power_cosine` schedule.
            order: Which masked tokens a step reveals: confidence (MaskGIT) or random (a random permutation's next
                chunk, MAR).
        """
        if self.tokenizer is None:
            raise ValueError("sample() decodes with the tokenizer: set model.init_args.tokenizer_ckpt")
        tokens = self.generate(labels, cfg, temperature, top_k, top_p, generator, steps, mask_schedule, mask_power,
                               choice_temperature, cfg_schedule, cfg_interval, cfg_power, order)  # fmt: skip
        return self.decode(tokens)
