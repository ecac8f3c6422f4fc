"""The categorical head: logits -> discrete tokens, behind the head protocol every method calls.

    loss(cond, target, draws) -> per-token or mean cross-entropy of the logits of `cond` against `target`
    sample(cond, guidance, settings, generator, progress) -> token ids

The logits come from the core's own output layer (`core.logits(hidden, *extra)`): its weights stay in the core,
where lit_ar's checkpoints and the released LlamaGen and VAR weights put them. This object holds no weights; it is
the protocol around them (cross-entropy in fp32, guidance, temperature / top-k / top-p, Gumbel-max sampling).
"""

import functools

import torch
import torch.nn.functional as F
from torch import nn

from lit_ar.guidance import Guidance
from lit_ar.sampling import filter_logits, gumbel_noise


def head_cross_entropy(core: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, *head_args: torch.Tensor,
                       reduction: str = "mean", label_smoothing: float = 0.0) -> torch.Tensor:  # fmt: skip
    """A core's head and the cross-entropy of its logits: hidden (..., C) -> `core.logits(hidden, *head_args)`
    (..., V), against targets (...) long, in fp32."""
    logits = core.logits(hidden, *head_args).float()
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction=reduction,
                           label_smoothing=label_smoothing)  # fmt: skip


@functools.cache
def compiled_head_cross_entropy():
    """`head_cross_entropy` compiled: one function for every model, which takes the model as an argument, so no
    compiled graph holds a system (a copy of one, e.g. for EMA, would otherwise train through the original's head).
    Compiled, the logits' fp32 cast, log-softmax and their backward passes fuse instead of writing the (..., V)
    logits out and reading them again (`python -m benchmarks.head_loss`)."""
    return torch.compile(head_cross_entropy)


class CategoricalHead:
    kind = "categorical"

    def __init__(self, core: nn.Module, compile: bool = False):
        self.core, self.compile = core, compile

    def token_buffer(self, batch: int, num_tokens: int, device: torch.device) -> torch.Tensor:
        """Room for a sampler's tokens: ids (batch, num_tokens) long, zeros."""
        return torch.zeros(batch, num_tokens, dtype=torch.long, device=device)

    def check_sampling(self, settings) -> None:
        """Nothing to refuse: temperature, top_k and top_p are checked where the settings are parsed."""

    def logits(self, cond: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        """States (..., C) -> logits (..., V) in fp32."""
        return self.core.logits(cond, *extra).float()

    def loss(self, cond: torch.Tensor, target: torch.Tensor, draws=None, *extra: torch.Tensor, reduction: str = "mean",
             label_smoothing: float = 0.0) -> torch.Tensor:  # fmt: skip
        """Cross-entropy of the logits of `cond` (..., C) against `target` (...). Nothing is drawn (`draws` is the
        protocol's, for heads that draw noise)."""
        loss_fn = compiled_head_cross_entropy() if self.compile else head_cross_entropy
        return loss_fn(self.core, cond, target, *extra, reduction=reduction, label_smoothing=label_smoothing)

    def guided_logits(self, logits: torch.Tensor, guidance: Guidance, progress: float) -> torch.Tensor:
        """Logits over the rows of a guided batch (2B, ..., V) [cond; negative] (or (B, ..., V)) -> (B, ..., V)."""
        return guidance.combine(logits, progress)

    def sample_logits(self, logits: torch.Tensor, settings, generator: torch.Generator | None) -> torch.Tensor:
        """Guided logits (..., V) -> ids (...): filtered by the settings' temperature, top_k and top_p, then
        Gumbel-max with noise from `generator` (the same generator state gives the same tokens; no data-dependent
        shapes, so the step compiles)."""
        logits = filter_logits(logits.float() / settings.temperature, settings.top_k, settings.top_p)
        return torch.argmax(logits + gumbel_noise(logits.shape, generator, logits.device), dim=-1)

    def sample(self, cond: torch.Tensor, guidance: Guidance, settings, generator: torch.Generator | None,
               progress: float, *extra: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """States (B', ..., C) of a (guided) batch -> ids (B, ...)."""
        return self.sample_logits(self.guided_logits(self.logits(cond, *extra), guidance, progress), settings,
                                  generator)  # fmt: skip
