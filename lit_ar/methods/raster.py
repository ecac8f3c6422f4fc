"""Raster (next-token) AR: LlamaGen and RAR's random-order training over discrete tokens, and causal AR over
continuous tokens (GIVT, MAR's causal baseline) with a flow or diffusion head: one loop, whichever head.

Training (teacher forcing): the class prefix and tokens 0..L-2 predict tokens 0..L-1; the head's loss on every token
(cross-entropy; the flow or diffusion loss). RAR trains each sample in a random order with probability r(step),
annealed from 1 to 0 between two steps; the core's target-aware position embedding tells each slot which position it
predicts. Sampling stays raster.

Sampling: prefill the class prefix (and, under guidance, the null class) into a static KV cache, then L - 1
one-token decode steps with fixed shapes; the head turns each step's states into the token (guided logits filtered
and sampled; or a guided ODE from noise). The core provides the raster-decoding protocol: `cls_token_num`,
`num_tokens`, `setup_caches` / `clear_caches`, `check_decode_length`, `prefill_hidden`, `decode_hidden`, `hidden`.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from lit_ar.draws import Draws
from lit_ar.guidance import Guidance
from lit_ar.methods.base import Method, SamplingSettings, check_head_batch_mul
from lit_ar.methods.speculative_jacobi import JACOBI_INITS, speculative_jacobi_sample
from lit_ar.models.categorical_head import CategoricalHead


@dataclass
class RasterSampling(SamplingSettings):
    """Sampling settings of raster AR (LlamaGen, RAR)."""

    use_cache: bool = True
    """Decode on the static KV cache; False recomputes the whole prefix at every token (timing, parity checks)."""
    decoding: Literal["sequential", "sjd", "speculative"] = "sequential"
    """sequential: one model call per token; sjd: speculative Jacobi decoding (lit_ar/methods/speculative_jacobi.py),
    fewer calls, the same distribution, on any causal model without retraining; speculative: the same verification
    of drafts from a trained drafter (LANTERN's; a model trained with `drafter: true`)."""
    window: int = 16
    """SJD and speculative: tokens the model reads per call (the last accepted one and window - 1 drafts); 1 is
    sequential."""
    jacobi_init: Literal["uniform", "last_token"] = "uniform"
    """SJD: drafts at positions no call has reached: uniform random tokens (SJD's) or the latest accepted token."""
    acceptance: Literal["strict", "lantern"] = "strict"
    """SJD: strict keeps the model's distribution; lantern is LANTERN's relaxed acceptance, which pools the
    probability of a draft's nearest codes in the tokenizer's latent space (more tokens per call, each within
    lantern_delta in total variation)."""
    lantern_k: int = 1000
    """LANTERN: nearest codes considered per draft (LANTERN's default; capped at the vocabulary - 1)."""
    lantern_delta: float = 0.1
    """LANTERN: the most probability pooled onto a draft, its total-variation bound (0 is strict SJD)."""

    def __post_init__(self):
        super().__post_init__()
        if self.decoding not in DECODINGS:
            raise ValueError(f"decoding={self.decoding!r} is not known; known: {DECODINGS}")
        if self.window < 1:
            raise ValueError(f"window={self.window} must be >= 1 (the tokens read per model call; 1 is sequential)")
        if self.jacobi_init not in JACOBI_INITS:
            raise ValueError(f"jacobi_init={self.jacobi_init!r} is not known; known: {JACOBI_INITS}")
        if self.acceptance not in ACCEPTANCES:
            raise ValueError(f"acceptance={self.acceptance!r} is not known; known: {ACCEPTANCES}")
        if self.acceptance == "lantern" and self.decoding not in SPECULATIVE:
            raise ValueError("acceptance='lantern' relaxes speculative decoding's acceptance: set decoding='sjd' or "
                             "'speculative'")  # fmt: skip
        if self.lantern_k < 1:
            raise ValueError(f"lantern_k={self.lantern_k} must be >= 1 (nearest codes pooled per draft)")
        if not 0.0 <= self.lantern_delta <= 1.0:
            raise ValueError(f"lantern_delta={self.lantern_delta} must be in [0, 1] (a total-variation bound)")
        if self.decoding in SPECULATIVE and not self.use_cache:
            raise ValueError(f"decoding={self.decoding!r} verifies its drafts on the KV cache; set use_cache=True")


DECODINGS = ("sequential", "sjd", "speculative")
SPECULATIVE = ("sjd", "speculative")  # the decodings that verify drafts
ACCEPTANCES = ("strict", "lantern")


def random_order_ratio(step: int, start: int, end: int) -> float:
    """RAR: the probability that a sample is trained in a random order at `step`: 1 until `start`, 0 from `end`,
    linear in between."""
    if step >= end:
        return 0.0
    if step < start:
        return 1.0
    return 1.0 - (step - start) / (end - start)


class RasterAR(Method):
    """`random_order` (RAR): a function of the global step giving the probability of a random training order; None
    trains raster only. `head_batch_mul`: (noise, time) draws per token for a flow or diffusion head (None: the
    categorical head, which draws nothing). `progress_after_token`: the CFG schedule's progress at token i is i / L
    (LlamaGen's and RAR's), or, when True, (i + 1) / L, the fraction drawn once token i is (MAR's convention, which
    the continuous family keeps)."""

    Sampling = RasterSampling

    def __init__(self, random_order: Callable[[int], float] | None = None, head_batch_mul: int | None = None,
                 progress_after_token: bool = False):  # fmt: skip
        if head_batch_mul is not None:
            check_head_batch_mul(head_batch_mul)
        self.random_order, self.progress_after_token = random_order, progress_after_token
        self.head_loss_args = () if head_batch_mul is None else (head_batch_mul,)

    def train_inputs(self, tokens: torch.Tensor, draws: Draws):
        """The training draw: tokens (B, L) -> the fed tokens (B, L - 1), the order (B, L) or None (raster), and the
        targets (B, L) in the order they are predicted."""
        order = None
        if self.random_order is not None:
            B, L = tokens.shape
            r = self.random_order(draws.step)
            shuffled = draws.rand(B) < r  # (B,) which samples get a random order
            random_order = draws.rand(B, L).argsort(dim=-1)  # (B, L) uniform random permutations
            raster = torch.arange(L, device=tokens.device).expand(B, L)
            order = torch.where(shuffled[:, None], random_order, raster)  # at r = 0: the raster order everywhere
            tokens = tokens.gather(1, order)  # (B, L)
        return tokens[:, :-1], order, tokens

    def loss(self, core, head, tokens: torch.Tensor, labels: torch.Tensor, draws: Draws) -> dict[str, torch.Tensor]:
        """tokens (B, L) ids or (B, L, D) vectors (raster order only)."""
        fed, order, targets = self.train_inputs(tokens, draws)
        states = core.hidden(fed, labels) if order is None else core.hidden(fed, labels, order)  # (B, L, C)
        loss = head.loss(states, targets, draws, *self.head_loss_args)
        if self.random_order is None:
            return {"loss": loss}
        return {"loss": loss, "rar_ratio": self.random_order(draws.step)}  # logged: the annealed ratio

    def validation(self, core, head, tokens: torch.Tensor, labels: torch.Tensor,
                   draws: Draws) -> dict[str, torch.Tensor]:  # fmt: skip
        """Raster order and the true labels, what sampling sees (not RAR's training orders); over discrete tokens
        also the next-token accuracy."""
        if not isinstance(head, CategoricalHead):
            return super().validation(core, head, tokens, labels, draws)
        logits = head.logits(core.hidden(tokens[:, :-1], labels))  # (B, L, V)
        return {"loss": F.cross_entropy(logits.flatten(0, 1), tokens.flatten()),
                "token_acc": (logits.argmax(-1) == tokens).float().mean()}  # fmt: skip

    @torch.no_grad()
    def sample(self, core, head, labels: torch.Tensor, guidance: Guidance, settings: SamplingSettings,
               generator: torch.Generator | None = None, num_tokens: int | None = None,
               decode_step: Callable | None = None,
               cache_dtype: torch.dtype | None = None, stats: dict | None = None, neighbours=None,
               drafter=None) -> torch.Tensor:  # fmt: skip
        """labels (B,) -> tokens in raster order (default: the whole grid): ids (B, n) from the categorical head,
        vectors (B, n, D) from a flow or diffusion head. `decode_step` is the core's `decode_hidden`, or a compiled
        copy of it; `cache_dtype` the KV cache's (the autocast dtype, where sampling runs under autocast; default the
        core's weights'). With `decoding='sjd'`, speculative Jacobi decoding instead (its `stats`: model calls and
        tokens per call of each sequence; `neighbours`: the tokenizer's code neighbours, for LANTERN); with
        `decoding='speculative'`, the same with the trained `drafter`'s drafts."""
        if getattr(settings, "decoding", "sequential") in SPECULATIVE:
            return speculative_jacobi_sample(core, head, labels, guidance, settings, generator, num_tokens,
                                             self.progress_after_token, cache_dtype, stats, neighbours,
                                             drafter)  # fmt: skip
        L = core.num_tokens
        n = L if num_tokens is None else num_tokens
        use_cache = getattr(settings, "use_cache", True)  # continuous settings have no such field: always cached
        if getattr(settings, "steps", None) not in (None, L):
            raise ValueError(f"steps={settings.steps}: raster decoding takes one step per token ({L}); leave steps "
                             "null")  # fmt: skip
        rows = guidance.rows(labels)  # (B,) or (2B,) [labels; null]
        step = decode_step or core.decode_hidden
        if use_cache:
            core.setup_caches(rows.shape[0], cache_dtype or next(core.parameters()).dtype)
        try:
            if use_cache:
                core.check_decode_length(n)
            elif not 1 <= n <= L:
                raise ValueError(f"num_tokens={n}: a {core.grid_size}x{core.grid_size} grid holds between 1 and {L} "
                                 "tokens")  # fmt: skip
            tokens = head.token_buffer(labels.shape[0], n, labels.device)  # (B, n) ids or (B, n, D), left to right
            slots = torch.arange(core.cls_token_num, core.cls_token_num + n, device=labels.device)  # token i: P + i
            for i in range(n):
                if not use_cache:  # the whole prefix again, as a model without a cache must
                    states = core.hidden(guidance.twice(tokens[:, :i]), rows)[:, -1:]  # (B', 1, C)
                elif i == 0:
                    states = core.prefill_hidden(rows)  # (B', 1, C)
                else:
                    fed = guidance.twice(tokens[:, i - 1 : i].clone())  # (B', 1) or (B', 1, D): a fresh tensor
                    states = step(fed, slots[i - 1 : i].clone())  # (B', 1, C); no host-to-device copy per step
                progress = (i + self.progress_after_token) / L
                tokens[:, i : i + 1] = head.sample(states, guidance, settings, generator, progress)
        finally:
            core.clear_caches()
        return tokens
