"""Group-wise AR: each step predicts a whole group of tokens from the groups before it (block-causal attention, a KV
cache across groups).

- `NextScale` (VAR, Tian et al. 2024), discrete: the groups are the scales of a multi-scale residual VQ. Training:
  the tokenizer's quantizer builds the teacher-forcing inputs of scales 2..K from the index maps; one block-causal
  forward gives every scale's logits; cross-entropy over all tokens (optionally weighted per scale). Sampling: scale
  by scale, each step prefills a whole scale against the cached keys of the coarser ones; the sampled indices go back
  through the quantizer (`next_scale_input`, the very function that builds the training inputs) to make the next
  scale's input.
- `FlowGroups` (FlowAR, Ren et al. 2024), continuous: the groups are the scales of the token grid (each scale's input
  the previous one upsampled); the core makes a condition per token and the head (flow or diffusion) turns it into
  the token. With single tokens in raster order as the groups it is causal AR over continuous tokens, and draws what
  lit_ar/methods/raster.py's loop draws (which the continuous family's `causal` backbone runs): the parity test of
  tests/test_methods.py.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lit_ar.draws import Draws
from lit_ar.guidance import Guidance
from lit_ar.methods.base import ContinuousSampling, Method, SamplingSettings, check_head_batch_mul
from lit_ar.models.categorical_head import CategoricalHead
from lit_ar.models.layers import clear_kv_caches, setup_kv_caches
from lit_ar.sampling import filter_logits, gumbel_noise


@dataclass
class ScaleSampling(SamplingSettings):
    """Sampling settings of next-scale prediction (VAR). lit_ar's CFG convention: guided logits = uncond + cfg *
    (cond - uncond); VAR's `cfg=c` (logits (1 + t) cond - t uncond, t ramped 0 -> c) is cfg = 1 + c with the linear
    schedule."""

    cfg_schedule: str = "linear"
    """Guidance over the scales, by progress k / (K - 1): linear ramps 1 -> cfg (VAR), constant keeps cfg."""
    more_smooth: bool = False
    """VAR's option for smoother pictures (for visual quality, not for FID): each scale adds a Gumbel-softmax mixture
    of the codes, sharper at finer scales, instead of the sampled codes."""


def smoothed_codes(logits: torch.Tensor, settings: SamplingSettings, progress: float,
                   generator: torch.Generator | None, codes: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """VAR's `more_smooth`: a Gumbel-softmax over the (filtered) logits (B, T, V), sharpened by 1 + progress and
    cooled from tau 0.27 to 0.0135 over the scales (MaskGIT's schedule, as VAR), mixing the codes (V, C) -> (B, T, C).
    With one logit left by the filters (top_k=1) the mixture is that one code: the same input as hard sampling."""
    tau = max(0.27 * (1 - progress * 0.95), 0.005)
    scores = filter_logits(logits.float() / settings.temperature, settings.top_k, settings.top_p) * (1 + progress)
    weights = ((scores + gumbel_noise(scores.shape, generator, scores.device)) / tau).softmax(dim=-1)  # (B, T, V)
    return weights @ codes  # (B, T, C)


class NextScale(Method):
    """`label_smoothing` of the cross-entropy. The loss weighs each token by `token_weights` (L,), summing to 1 over
    a sample's tokens: the system's buffer, passed at each call, so it is on the model's device."""

    Sampling = ScaleSampling

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def teacher_forced(self, core, quantizer, indices: list[torch.Tensor], labels: torch.Tensor):
        """Index maps [(B, s_k^2) per scale] -> the core's last-block states (B, L, C), the head's class embedding
        (B, C) and the targets (B, L)."""
        with torch.no_grad():
            x_BLCv = quantizer.teacher_forcing_inputs(indices)  # (B, L - s_1^2, Cv), fp32
        hidden, cond = core.hidden(labels, x_BLCv)  # (B, L, C), (B, C)
        return hidden, cond, torch.cat(indices, dim=1)

    @staticmethod
    def weighted_loss(ce: torch.Tensor, target: torch.Tensor, token_weights: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy (B * L,) -> each sample's weighted sum over its tokens, averaged."""
        return (ce.view_as(target) * token_weights).sum(1).mean()

    def loss(self, core, head: CategoricalHead, tokens: list[torch.Tensor], labels: torch.Tensor, draws: Draws,
             quantizer=None, token_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
        hidden, cond, target = self.teacher_forced(core, quantizer, tokens, labels)
        ce = head.loss(hidden, target, draws, cond, reduction="none", label_smoothing=self.label_smoothing)
        return {"loss": self.weighted_loss(ce, target, token_weights)}

    def validation(self, core, head: CategoricalHead, tokens: list[torch.Tensor], labels: torch.Tensor, draws: Draws,
                   quantizer=None, token_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
        """The loss, the token accuracy, and the accuracy of each scale (`token_acc_4x4`, ...)."""
        hidden, cond, target = self.teacher_forced(core, quantizer, tokens, labels)
        logits = head.logits(hidden, cond)  # (B, L, V)
        ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none",
                             label_smoothing=self.label_smoothing)  # fmt: skip
        correct = (logits.argmax(-1) == target).float()  # (B, L)
        terms = {"loss": self.weighted_loss(ce, target, token_weights), "token_acc": correct.mean()}
        for s, (begin, end) in zip(core.scales, core.bounds):
            terms[f"token_acc_{s}x{s}"] = correct[:, begin:end].mean()
        return terms

    @torch.no_grad()
    def sample(self, core, head: CategoricalHead, labels: torch.Tensor, guidance: Guidance, settings: ScaleSampling,
               generator: torch.Generator | None = None, quantizer=None,
               cache_dtype: torch.dtype | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:  # fmt: skip
        """labels (B,) -> the sampled index maps [(B, s_k^2) long per scale] and the quantizer's cumulative latent
        map f_hat (B, Cv, G, G) after each scale."""
        rows = guidance.rows(labels)  # (B,) or (2B,) [labels; null]
        K = len(core.scales)
        setup_kv_caches(core.blocks, len(rows), core.seq_len, cache_dtype or core.head.weight.dtype, labels.device)
        try:
            cond, block_cond = core.condition(rows)  # (2B, C), (2B, C | 6C)
            mods = core.modulations(block_cond)  # per block (2B, 6C), fixed over the scales
            x = core.start_tokens(cond)  # (2B, s_1^2, C)
            f_hat, indices, f_hats = None, [], []
            for k in range(K):
                progress = k / max(1, K - 1)
                logits = head.guided_logits(core.forward_scale(k, x, cond, mods), guidance, progress)  # (B, s_k^2, V)
                idx = head.sample_logits(logits, settings, generator)  # (B, s_k^2)
                # the same quantizer function that built the teacher-forcing inputs builds the next input
                if settings.more_smooth:  # a Gumbel-softmax mixture of the codes in place of idx's codes
                    vectors = smoothed_codes(logits, settings, progress, generator, quantizer.codebook.codes())
                    f_hat, nxt = quantizer.next_scale_input_from_vectors(k, f_hat, vectors)
                else:
                    f_hat, nxt = quantizer.next_scale_input(k, f_hat, idx)  # (B, Cv, G, G), (B, s_{k+1}^2, Cv)
                indices.append(idx)
                f_hats.append(f_hat)
                if nxt is not None:
                    x = guidance.twice(core.embed_scale(k + 1, nxt))  # (B', s_{k+1}^2, C)
        finally:
            clear_kv_caches(core.blocks)
        return indices, f_hats


class FlowGroups(Method):
    """`head_batch_mul`: (noise, time) draws per token sharing one pass of the core (MAR's diffusion_batch_mul)."""

    Sampling = ContinuousSampling

    def __init__(self, head_batch_mul: int = 1):
        check_head_batch_mul(head_batch_mul)
        self.head_batch_mul = head_batch_mul

    def loss(self, core, head, tokens: torch.Tensor, labels: torch.Tensor, draws: Draws) -> dict[str, torch.Tensor]:
        target = core.targets(tokens)  # (B, T, D): every scale's tokens, or the tokens in raster order
        cond = core(core.teacher_inputs(target), labels)  # (B, T, C)
        return {"loss": head.loss(cond, target, draws, self.head_batch_mul)}

    @torch.no_grad()
    def sample(self, core, head, labels: torch.Tensor, guidance: Guidance, settings: ContinuousSampling,
               generator: torch.Generator | None = None,
               cache_dtype: torch.dtype | None = None) -> torch.Tensor:  # fmt: skip
        """labels (B,) -> tokens (B, L, D): a group (a scale, or a token) at a time on the core's KV cache."""
        K = len(core.sizes)
        if settings.steps is not None and settings.steps != K:
            unit = "scale" if core.order == "scale" else "token"
            raise ValueError(f"steps={settings.steps}: backbone={'flowar' if unit == 'scale' else 'causal'!r} takes "
                             f"one step per {unit} ({K}); leave steps null")  # fmt: skip
        rows = guidance.rows(labels)  # (B,) or (2B,) [labels; null]
        core.setup_caches(rows.shape[0], cache_dtype or core.pos.dtype)
        try:
            groups, inputs = [], None
            for k in range(K):
                cond = core.step(k, inputs, rows)  # (B', size_k, C)
                # VAR's ramp over scales (k / (K - 1)); in raster order the fraction of tokens drawn
                progress = k / max(K - 1, 1) if core.order == "scale" else (k + 1) / K
                x = head.sample(cond, guidance, settings, generator, progress)  # (B, size_k, D)
                groups.append(x)
                if k + 1 < K:
                    inputs = guidance.twice(core.next_input(k, x))
        finally:
            core.clear_caches()
        return groups[-1] if core.order == "scale" else torch.cat(groups, dim=1)  # (B, L, D)
