"""Raster (next-token) AR over discrete tokens: LlamaGen, and RAR's random-order training.

Training (teacher forcing): the class prefix and tokens 0..L-2 predict tokens 0..L-1, cross-entropy on every token.
RAR trains each sample in a random order with probability r(step), annealed from 1 to 0 between two steps; the core's
target-aware position embedding tells each slot which position it predicts. Sampling stays raster.

Sampling: prefill the class prefix (and, under guidance, the null class) into a static KV cache, then L - 1
one-token decode steps with fixed shapes; each step's logits are guided, filtered and sampled by the head.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lit_ar.draws import Draws
from lit_ar.guidance import Guidance
from lit_ar.methods.base import Method, SamplingSettings
from lit_ar.models.categorical_head import CategoricalHead


@dataclass
class RasterSampling(SamplingSettings):
    """Sampling settings of raster AR (LlamaGen, RAR)."""

    use_cache: bool = True
    """Decode on the static KV cache; False recomputes the whole prefix at every token (timing, parity checks)."""


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
    trains raster only (LlamaGen)."""

    Sampling = RasterSampling

    def __init__(self, random_order: Callable[[int], float] | None = None):
        self.random_order = random_order

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

    def loss(self, core, head: CategoricalHead, tokens: torch.Tensor, labels: torch.Tensor,
             draws: Draws) -> dict[str, torch.Tensor]:  # fmt: skip
        fed, order, targets = self.train_inputs(tokens, draws)
        loss = head.loss(core.hidden(fed, labels, order), targets)
        if self.random_order is None:
            return {"loss": loss}
        return {"loss": loss, "rar_ratio": self.random_order(draws.step)}  # logged: the annealed ratio

    def validation(self, core, head: CategoricalHead, tokens: torch.Tensor, labels: torch.Tensor,
                   draws: Draws) -> dict[str, torch.Tensor]:  # fmt: skip
        """Raster order and the true labels, what sampling sees (not RAR's training orders)."""
        logits = head.logits(core.hidden(tokens[:, :-1], labels))  # (B, L, V)
        return {"loss": F.cross_entropy(logits.flatten(0, 1), tokens.flatten()),
                "token_acc": (logits.argmax(-1) == tokens).float().mean()}  # fmt: skip

    @torch.no_grad()
    def sample(self, core, head: CategoricalHead, labels: torch.Tensor, guidance: Guidance, settings: RasterSampling,
               generator: torch.Generator | None = None, num_tokens: int | None = None,
               decode_step: Callable | None = None,
               cache_dtype: torch.dtype | None = None) -> torch.Tensor:  # fmt: skip
        """labels (B,) -> tokens (B, num_tokens) in raster order (default: the whole grid). `decode_step` is the
        core's one-token step, or a compiled copy of it; `cache_dtype` the KV cache's (the autocast dtype, where
        sampling runs under autocast; default the output layer's)."""
        L = core.num_tokens
        n = L if num_tokens is None else num_tokens
        rows = guidance.rows(labels)  # (B,) or (2B,) [labels; null]
        step = decode_step or core.decode_step
        if settings.use_cache:
            core.setup_caches(rows.shape[0], cache_dtype or core.output.weight.dtype)
        try:
            if settings.use_cache:
                core.check_decode_length(n)
            elif not 1 <= n <= L:
                raise ValueError(f"num_tokens={n}: a {core.grid_size}x{core.grid_size} grid holds between 1 and {L} "
                                 "tokens")  # fmt: skip
            tokens = labels.new_zeros(labels.shape[0], n)  # (B, n), filled left to right
            slots = torch.arange(core.cls_token_num, core.cls_token_num + n, device=labels.device)  # token i: P + i
            for i in range(n):
                if not settings.use_cache:  # the whole prefix again, as a model without a cache must
                    logits = core(guidance.twice(tokens[:, :i]), rows)[:, -1]  # (B', V)
                elif i == 0:
                    logits = core.prefill(rows)  # (B', V)
                else:
                    fed = guidance.twice(tokens[:, i - 1 : i].clone())  # (B', 1), a fresh contiguous tensor
                    logits = step(fed, slots[i - 1 : i].clone())  # (B', V); no host-to-device copy per step
                tokens[:, i] = head.sample_logits(head.guided_logits(logits, guidance, i / L), settings, generator)
        finally:
            core.clear_caches()
        return tokens
