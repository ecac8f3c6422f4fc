"""ARPG: randomized parallel decoding (Li et al. 2025) over the decoupled decoder of lit_ar/models/arpg.py.

Training: every sample in a fresh uniform random order (from the step's Draws); the self-decoder reads the class
and the tokens in that order, the mask-token queries carry the positions of tokens 0..L-1 of the order, and the
cross-entropy is taken on every token.

Sampling: a random order per sample and a step schedule (`tokens_to_reveal`: arccos, ARPG's default, or cosine,
...) that says how many tokens each of `steps` steps decodes. Each step is one model call: the tokens decoded by
the previous step enter the self-decoder's cache (causally among themselves, as in training) and add their keys and
values to the shared set; then the step's targets are queried at once against every key written, and their tokens
are sampled independently (guided logits, temperature, top-k / top-p). One token per step is random-order
sequential decoding; the keys are never recomputed.
"""

from dataclasses import dataclass
from typing import Literal

import torch

from lit_ar.draws import Draws
from lit_ar.guidance import CfgSchedule, Guidance
from lit_ar.methods.base import Method, SamplingSettings
from lit_ar.sampling import MASK_SCHEDULES, tokens_to_reveal


@dataclass
class ARPGSampling(SamplingSettings):
    """Sampling settings of ARPG."""

    cfg_schedule: CfgSchedule = "linear"
    """Guidance over the tokens decoded: linear (1 -> cfg, ARPG's), constant, interval or power_cosine."""
    steps: int | None = None
    """Model calls per image (default: a quarter of the tokens, ARPG's 64 steps for 256 tokens); L is sequential."""
    schedule: Literal["arccos", "cosine", "linear", "power", "sigmoid"] = "arccos"
    """How many tokens each step decodes: arccos (ARPG's), cosine, linear, power or sigmoid mask schedules."""
    use_cache: bool = True
    """Decode on the static caches; False recomputes every key at every step (parity checks)."""

    def __post_init__(self):
        super().__post_init__()
        if self.schedule not in MASK_SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is not known; known schedules: {MASK_SCHEDULES}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps={self.steps} must be >= 1 (and at most the number of tokens)")


class ARPG(Method):
    Sampling = ARPGSampling

    def loss(self, core, head, tokens: torch.Tensor, labels: torch.Tensor, draws: Draws) -> dict[str, torch.Tensor]:
        B, L = tokens.shape
        order = draws.rand(B, L).argsort(dim=-1)  # (B, L) a uniform random order per sample
        targets = tokens.gather(1, order)  # (B, L) in the order generated
        return {"loss": head.loss(core.hidden(targets[:, :-1], labels, order), targets, draws)}

    @torch.no_grad()
    def sample(self, core, head, labels: torch.Tensor, guidance: Guidance, settings: ARPGSampling,
               generator: torch.Generator | None = None, order: torch.Tensor | None = None,
               cache_dtype: torch.dtype | None = None) -> torch.Tensor:  # fmt: skip
        """labels (B,) -> ids (B, L) at raster positions. `order` (B, L): the generation order (default: uniform
        random per sample, from `generator`)."""
        B, L, device = labels.shape[0], core.num_tokens, labels.device
        steps = settings.steps or max(1, L // 4)
        counts = tokens_to_reveal(settings.schedule, L, steps)  # refuses steps outside 1..L by name
        if order is None:
            order = torch.rand(B, L, generator=generator, device=device).argsort(dim=-1)  # (B, L)
        rows, order2 = guidance.rows(labels), guidance.twice(order)  # (B',), (B', L)
        tokens = head.token_buffer(B, L, device)  # (B, L) in the order generated
        if settings.use_cache:
            core.setup_caches(rows.shape[0], cache_dtype or next(core.parameters()).dtype)
        try:
            prev = done = 0  # the previous step decoded order positions prev .. done - 1
            for n in counts:
                targets = order2[:, done : done + n]  # (B', n) the positions this step decodes
                if not settings.use_cache:  # every key again, from the prefix and all tokens so far
                    states = self.uncached_queries(core, guidance.twice(tokens[:, :done]), rows, order2, done, n)
                elif done == 0:
                    x = core.prefix(rows)  # (B', 1, C)
                    states = core.decode(x, torch.zeros(1, dtype=torch.long, device=device),
                                         torch.full_like(order2[:, :1], -1), targets)  # fmt: skip
                else:
                    x = core.tok_embeddings(guidance.twice(tokens[:, prev:done]))  # (B', done - prev, C)
                    slots = torch.arange(1 + prev, 1 + done, device=device)  # token i sits at slot 1 + i
                    states = core.decode(x, slots, order2[:, prev:done], targets)  # (B', n, C)
                tokens[:, done : done + n] = head.sample(states, guidance, settings, generator, (done + n) / L)
                prev, done = done, done + n
        finally:
            if settings.use_cache:
                core.clear_caches()
        return torch.empty_like(tokens).scatter_(1, order, tokens)  # (B, L) at raster positions

    @staticmethod
    def uncached_queries(core, fed: torch.Tensor, rows: torch.Tensor, order: torch.Tensor, done: int,
                         n: int) -> torch.Tensor:  # fmt: skip
        """The step's query states without caches: the self-decoder over the prefix and all `done` tokens (B', done)
        in `order`, then the targets done .. done + n - 1 queried against every key (B', n, C)."""
        B = fed.shape[0]
        x = torch.cat([core.prefix(rows), core.tok_embeddings(fed)], 1)  # (B', 1 + done, C)
        rope = torch.cat([core.rope[:1].expand(B, -1, -1, -1), core.rope[1 + order[:, :done]]], 1)
        for layer in core.self_layers:
            x = layer(x, rope, is_causal=True)
        k, v = core.keys_values(x, rope)
        q, q_rope = core.queries(order[:, done : done + n])
        for layer in core.cross_layers:
            q = layer(q, k, v, q_rope)
        return q
