"""Masked generation: MaskGIT (Chang et al. 2022) over discrete tokens, and MAR (Li et al. 2024) over continuous ones.

MaskGIT:

Training: each sample draws a mask ratio through the mask schedule (MaskGIT: ratio = cos(pi/2 * u), u ~ U(0, 1)),
that many of its tokens, chosen at random, are replaced by the mask token, and the loss is the cross-entropy on the
masked positions, averaged over the masked tokens of the global batch.

Sampling: start from an all-masked grid; at each of `steps` steps predict every position, sample a token at each
masked one, and keep the most confident of them (log-probability of the sampled token plus Gumbel noise that cools
over the steps), as many as the mask schedule says; revealed tokens are never masked again. With
`order="random"` the tokens revealed at a step are the next chunk of a random permutation instead (MAR's order).

MAR: a bidirectional encoder-decoder core makes a condition per hidden token and a flow or diffusion head turns it
into the token. Training: one random order per sample and one mask ratio per step from a normal centred at 1 (std
0.25) truncated to [mask_ratio_min, 1]; the loss is taken at the hidden tokens only. Sampling: the tokens are
revealed in N steps with a cosine schedule, the last of the order still hidden first, CFG ramped over the steps.
"""

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from lit_ar.draws import Draws
from lit_ar.guidance import Guidance
from lit_ar.methods.base import ContinuousSampling, Method, SamplingSettings, check_head_batch_mul
from lit_ar.models.categorical_head import CategoricalHead
from lit_ar.sampling import filter_logits, gumbel_noise, mask_ratio, sample_logits, tokens_to_reveal

ORDERS = ("confidence", "random")


@dataclass
class MaskedSampling(SamplingSettings):
    """Sampling settings of masked parallel decoding (MaskGIT)."""

    steps: int = 8
    """Decoding steps, between 1 and L = grid_size**2 (L steps reveal one token per step)."""
    mask_schedule: str = "cosine"
    """How many tokens stay masked after each step: cosine (MaskGIT), arccos, linear, power, sigmoid."""
    mask_power: float = 2.0
    """Exponent of the `power` schedule."""
    choice_temperature: float = 4.5
    """Gumbel-noise temperature on the confidence at step 0, annealed linearly to 0 (MaskGIT: 4.5)."""
    order: Literal["confidence", "random"] = "confidence"
    """Which masked tokens a step reveals: confidence (MaskGIT) or the next chunk of a random permutation (MAR)."""

    def __post_init__(self):
        super().__post_init__()
        if self.order not in ORDERS:
            raise ValueError(f"order={self.order!r} is not known; known orders: {ORDERS}")
        if not self.choice_temperature >= 0:
            raise ValueError(f"choice_temperature={self.choice_temperature} must be >= 0 (0: no Gumbel noise)")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int):
            raise ValueError(f"steps={self.steps!r} must be an integer between 1 and the number of tokens")
        tokens_to_reveal(self.mask_schedule, max(self.steps, 1), max(self.steps, 1), power=self.mask_power)


class MaskGIT(Method):
    """`mask_schedule` / `mask_power`: the law of the training mask ratio; `label_smoothing` of the cross-entropy."""

    Sampling = MaskedSampling

    def __init__(self, mask_schedule: str = "cosine", mask_power: float = 2.0, label_smoothing: float = 0.0):
        mask_ratio(mask_schedule, 0.5, power=mask_power)  # refuses an unknown schedule now
        self.mask_schedule, self.mask_power, self.label_smoothing = mask_schedule, mask_power, label_smoothing

    def num_masked(self, u: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """(B,) uniforms -> (B,) masked-token counts in [1, L] (MaskGIT: ceil(cos(pi/2 * u) * L))."""
        ratio = mask_ratio(self.mask_schedule, u, power=self.mask_power)
        return torch.ceil(ratio * num_tokens).long().clamp(1, num_tokens)

    def draw_mask(self, batch: int, num_tokens: int, draws: Draws) -> tuple[torch.Tensor, torch.Tensor]:
        """The training draw: this rank's mask (B, L) bool (True = masked) and the global batch's masked count."""
        n_masked = self.num_masked(draws.rand_global(batch), num_tokens)  # (B * world,)
        order = draws.rand(batch, num_tokens)  # (B, L) which positions get masked
        rank_in_row = order.argsort(-1).argsort(-1)  # (B, L): a random permutation per sample
        return rank_in_row < draws.local(n_masked)[:, None], n_masked.sum()

    def masked_states(self, core, tokens: torch.Tensor, labels: torch.Tensor, draws: Draws):
        """Mask and run the core -> its last-layer states at the masked positions (M, C), their targets (M,), and
        the global masked count."""
        masked, global_masked = self.draw_mask(tokens.shape[0], tokens.shape[1], draws)
        hidden = core.hidden(tokens.masked_fill(masked, core.mask_token), labels)  # (B, L, C)
        return hidden[masked], tokens[masked], global_masked  # the head runs where the loss is taken, nowhere else

    def loss(self, core, head: CategoricalHead, tokens: torch.Tensor, labels: torch.Tensor,
             draws: Draws) -> dict[str, torch.Tensor]:  # fmt: skip
        hidden, targets, global_masked = self.masked_states(core, tokens, labels, draws)
        ce = head.loss(hidden, targets, reduction="sum", label_smoothing=self.label_smoothing)
        # Mean over the masked tokens of the GLOBAL batch: DDP averages the ranks' gradients, so each rank divides
        # its sum by (global count / world); the result equals one process's mean over the same samples.
        return {"loss": ce * draws.world / global_masked}

    def validation(self, core, head: CategoricalHead, tokens: torch.Tensor, labels: torch.Tensor,
                   draws: Draws) -> dict[str, torch.Tensor]:  # fmt: skip
        """The loss without label smoothing, and the accuracy at the masked positions."""
        hidden, targets, global_masked = self.masked_states(core, tokens, labels, draws)
        logits = head.logits(hidden)  # (M, V)
        loss = F.cross_entropy(logits, targets, reduction="sum") * draws.world / global_masked
        return {"loss": loss, "token_acc": (logits.argmax(-1) == targets).float().mean()}

    @torch.no_grad()
    def sample(self, core, head: CategoricalHead, labels: torch.Tensor, guidance: Guidance, settings: MaskedSampling,
               generator: torch.Generator | None = None, return_trace: bool = False):  # fmt: skip
        """labels (B,) -> tokens (B, L). With return_trace, also a dict of the grid before each step and after the
        last: `masked` (steps + 1, B, L) bool (True = not yet revealed) and `tokens` (steps + 1, B, L) long."""
        B, L = labels.shape[0], core.num_tokens
        counts = tokens_to_reveal(settings.mask_schedule, L, settings.steps, power=settings.mask_power)
        rows = guidance.rows(labels)  # (B,) or (2B,) [labels; null]
        tokens = torch.full((B, L), core.mask_token, dtype=torch.long, device=labels.device)  # (B, L)
        masked = torch.ones(B, L, dtype=torch.bool, device=labels.device)  # (B, L) True = not yet revealed
        random_order = settings.order == "random"
        if random_order:  # MAR: a random generation order per sample, revealed chunk by chunk
            perm = torch.rand(B, L, generator=generator, device=labels.device).argsort(-1)  # (B, L) positions
        trace, done = {"masked": [masked], "tokens": [tokens]}, 0
        for step, k in enumerate(counts):
            progress = (done + k) / L  # fraction revealed once this step is done (MAR's CFG progress)
            logits = head.guided_logits(core(guidance.twice(tokens), rows), guidance, progress)  # (B, L, V)
            # Sample only where it can matter (every sample has the same count M of masked tokens, so the shapes
            # stay static): the next chunk of the permutation (random order) or every masked position.
            M = k if random_order else L - done
            where = perm[:, done : done + k] if random_order else masked.float().topk(M, dim=-1).indices
            logits = logits.gather(1, where[..., None].expand(-1, -1, logits.shape[-1]))  # (B, M, V)
            logits = filter_logits(logits / settings.temperature, settings.top_k, settings.top_p)
            sampled = sample_logits(logits, generator=generator)  # (B, M)
            if random_order:
                chosen, picked = where, sampled  # (B, k)
            else:
                logp = logits.log_softmax(-1).gather(-1, sampled[..., None])[..., 0]  # (B, M)
                # MaskGIT: Gumbel noise on the confidence, its temperature annealed to 0 at the last step
                noise_temp = settings.choice_temperature * (1.0 - (step + 1) / len(counts))
                gumbel = gumbel_noise((B, M), generator, labels.device)  # (B, M)
                top = (logp + noise_temp * gumbel).topk(k, dim=-1).indices  # (B, k) the most confident
                chosen, picked = where.gather(1, top), sampled.gather(1, top)  # positions, tokens (B, k)
            tokens = tokens.scatter(1, chosen, picked)  # chosen positions are masked: nothing is overwritten
            masked = masked.scatter(1, chosen, False)
            done += k
            trace["masked"].append(masked)
            trace["tokens"].append(tokens)
        return (tokens, {k: torch.stack(v) for k, v in trace.items()}) if return_trace else tokens


def truncated_normal(u: torch.Tensor, low: float, high: float, mean: float, std: float) -> torch.Tensor:
    """Inverse-CDF draw of N(mean, std) truncated to [low, high] from uniforms u (MAR's mask-ratio law)."""
    cdf = lambda x: 0.5 * (1 + math.erf((x - mean) / (std * math.sqrt(2))))  # noqa: E731
    p = cdf(low) + u * (cdf(high) - cdf(low))
    return (mean + std * math.sqrt(2) * torch.erfinv(2 * p - 1)).clamp(low, high)


class MAR(Method):
    """`mask_ratio_min`: the lower end of the training mask ratio's law; `head_batch_mul`: (noise, time) draws per
    hidden token sharing one pass of the core (MAR's diffusion_batch_mul)."""

    Sampling = ContinuousSampling

    def __init__(self, mask_ratio_min: float = 0.7, head_batch_mul: int = 1):
        if not 0.0 <= mask_ratio_min <= 1.0:
            raise ValueError(f"model.init_args.mask_ratio_min={mask_ratio_min} must be in [0, 1]")
        check_head_batch_mul(head_batch_mul)
        self.mask_ratio_min, self.head_batch_mul = mask_ratio_min, head_batch_mul

    def loss(self, core, head, tokens: torch.Tensor, labels: torch.Tensor, draws: Draws) -> dict[str, torch.Tensor]:
        B, L, D = tokens.shape
        order = draws.rand(B, L).argsort(dim=1)  # (B, L) a random order per sample
        ratio = truncated_normal(draws.shared_rand(), self.mask_ratio_min, 1.0, 1.0, 0.25)  # one per step, as MAR
        num_masked = max(1, int(math.ceil(L * float(ratio))))  # at least one: a ratio of 0 leaves nothing to learn
        mask = order.argsort(dim=1) < num_masked  # (B, L) True = hidden: the first num_masked tokens of the order
        hidden = order[:, :num_masked]  # (B, n) the hidden positions
        # MAR's loss counts the hidden tokens only (its mask weight), so the core's last block and the head run
        # there alone: the same loss as weighting every position, without the head's work on the known ones
        cond = core(tokens, mask, labels, positions=hidden)  # (B, n, C)
        target = tokens.gather(1, hidden[..., None].expand(-1, -1, D))  # (B, n, D)
        return {"loss": head.loss(cond, target, draws, self.head_batch_mul, positions=hidden, num_positions=L)}

    @torch.no_grad()
    def sample(self, core, head, labels: torch.Tensor, guidance: Guidance, settings: ContinuousSampling,
               generator: torch.Generator | None = None, token_dim: int | None = None) -> torch.Tensor:  # fmt: skip
        """labels (B,) -> tokens (B, L, D)."""
        B, L, D = labels.shape[0], core.seq_len, token_dim or head.token_dim
        steps = min(64, L) if settings.steps is None else settings.steps
        counts = tokens_to_reveal("cosine", L, steps)  # refuses steps outside [1, L]
        rows = guidance.rows(labels)  # (B,) or (2B,) [labels; null]
        tokens = torch.zeros(B, L, D, device=labels.device)  # (B, L, D)
        mask = torch.ones(B, L, dtype=torch.bool, device=labels.device)  # True = still unknown
        order = torch.rand(B, L, generator=generator, device=labels.device).argsort(dim=1)  # (B, L)
        done = 0
        for n in counts:
            # (B, n) the next n tokens: as MAR, the last n of the order still hidden (its first stay hidden longest),
            # by position, the order of the rows MAR draws its noise for
            pos = order[:, L - done - n : L - done].sort(dim=1).values
            done += n
            cond = core(guidance.twice(tokens), guidance.twice(mask), rows, positions=guidance.twice(pos))  # (B', n, C)
            # MAR: 1 + (cfg - 1) * (L - tokens left hidden) / L, where at least 1 is counted as left even after the
            # last step
            new = head.sample(cond, guidance, settings, generator, min(done, L - 1) / L)  # (B, n, D)
            tokens = tokens.scatter(1, pos[..., None].expand(-1, -1, D), new)
            mask = mask.scatter(1, pos, False)
        return tokens
