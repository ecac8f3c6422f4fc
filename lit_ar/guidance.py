"""Guidance: the object every sampling loop calls to guide a prediction, instead of CFG code inside each loop.

Three parts:
- the negative branch: which rows the unguided prediction comes from. The default is the same model with the null
  class (classifier-free guidance): `rows(labels)` stacks [labels; null class] so one batch of 2B computes both;
- the scale schedule over the sampling progress (fraction of tokens, steps or scales done): constant, linear,
  interval or power-cosine;
- a hook after combining (`post`), applied to the guided prediction (logits, velocity or noise) before the loop
  uses it (a method that must project its prediction, e.g. onto a sphere, does it there).

Guided prediction = uncond + scale * (cond - uncond), with scale 1 meaning no guidance.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

CFG_SCHEDULES = ("constant", "linear", "interval", "power_cosine")
CfgSchedule = Literal["constant", "linear", "interval", "power_cosine"]


def cfg_scale(
    schedule: CfgSchedule,
    cfg: float,
    progress: float,
    interval: tuple[float, float] = (0.0, 1.0),
    power: float = 1.0,
) -> float:
    """The guidance scale at `progress` in [0, 1] (fraction of tokens, steps or scales generated so far).
    constant: cfg; linear: 1 -> cfg (MAR; VAR's ramp too, but VAR's own `cfg` c ends at 1 + c, so it is lit_ar's
    1 + c); interval: cfg inside [lo, hi], 1 outside;
    power_cosine: 1 + (cfg - 1) * (1 - cos(pi * progress**power)) / 2 (MUSE/MaskGIT style)."""
    if schedule == "constant":
        return cfg
    if schedule == "linear":
        return 1.0 + (cfg - 1.0) * progress
    if schedule == "interval":
        lo, hi = interval
        return cfg if lo <= progress <= hi else 1.0
    if schedule == "power_cosine":
        return 1.0 + (cfg - 1.0) * (1 - math.cos(math.pi * progress**power)) / 2
    raise ValueError(f"cfg_schedule={schedule!r} is not known; known schedules: {CFG_SCHEDULES}")


def check_cfg_schedule(schedule: str, interval: tuple[float, float] = (0.0, 1.0)) -> None:
    if schedule not in CFG_SCHEDULES:
        raise ValueError(f"cfg_schedule={schedule!r} is not known; known schedules: {CFG_SCHEDULES}")
    lo, hi = interval
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"cfg_interval={tuple(interval)} must satisfy 0 <= low <= high <= 1")


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond)."""
    return uncond + scale * (cond - uncond)


@dataclass(frozen=True)
class Guidance:
    """How a sampling loop guides. `scale` 1 is no guidance (one batch of B rows); otherwise every model call runs
    2B rows [conditional; negative] and `combine` mixes the two halves."""

    scale: float = 1.0
    """Guidance scale (1: off)."""
    schedule: CfgSchedule = "constant"
    """How the scale moves over the sampling progress (see `cfg_scale`)."""
    interval: tuple[float, float] = (0.0, 1.0)
    """Progress (low, high) inside which the `interval` schedule guides."""
    power: float = 1.0
    """Exponent of the `power_cosine` schedule."""
    null_class: int | None = None
    """The negative branch's label: the null class of the model (set by the system that owns the model)."""
    post: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Applied to every guided prediction after combining (None: as it is)."""

    def __post_init__(self):
        if not self.scale >= 0:
            raise ValueError(f"cfg={self.scale} must be >= 0 (1 means no guidance)")
        check_cfg_schedule(self.schedule, tuple(self.interval))

    @property
    def active(self) -> bool:
        return self.scale != 1.0

    def rows(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels (B,) -> the rows every model call is conditioned on: (B,), or (2B,) [labels; null class]."""
        if not self.active:
            return labels
        if self.null_class is None:
            raise ValueError("guidance with cfg != 1 needs the model's null class (Guidance.null_class)")
        return torch.cat([labels, torch.full_like(labels, self.null_class)])

    def twice(self, x: torch.Tensor) -> torch.Tensor:
        """A (B, ...) input that both halves of a guided batch share -> (2B, ...) (or itself when not guided)."""
        return torch.cat([x, x]) if self.active else x

    def scale_at(self, progress: float) -> float:
        return cfg_scale(self.schedule, self.scale, progress, tuple(self.interval), self.power)

    def combine(self, both: torch.Tensor, progress: float | None = None, scale: float | None = None) -> torch.Tensor:
        """A prediction over the 2B rows [cond; negative] (2B, ...) -> the guided one (B, ...), in fp32, at the scale
        of `progress` (or the given `scale`), then `post`. Unguided: the input, as fp32, then `post`."""
        if self.active:
            cond, uncond = both.float().chunk(2)
            out = guide(cond, uncond, self.scale_at(progress) if scale is None else scale)
        else:
            out = both.float()
        return out if self.post is None else self.post(out)
