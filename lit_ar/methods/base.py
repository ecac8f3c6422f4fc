"""What every method shares: the typed sampling settings and how a settings object is made from a config's mapping.

A method is one file in lit_ar/methods/ with two entry points over a core and a head, in plain torch:
    loss(core, head, tokens, labels, draws) -> dict of loss terms ("loss" is the one optimised)
    sample(core, head, labels, guidance, settings, generator) -> tokens
    validation(core, head, tokens, labels, draws) -> dict of the figures validation logs (default: the loss)
Its settings are a dataclass extending `SamplingSettings`, whose attribute docstrings are the `--help` of
`predict_kwargs`; the same object configures `lit_ar predict`, the sample grid, the evaluator and the FID callback.
"""

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from lit_ar.guidance import CfgSchedule, Guidance, check_cfg_schedule
from lit_ar.sampling import check_sampling_args

S = TypeVar("S", bound="SamplingSettings")
CONTINUOUS_CFG_SCHEDULES = ("constant", "linear", "power_cosine")  # `interval` is the flow head's guidance_interval


@dataclass
class SamplingSettings:
    """The settings every sampling loop reads: guidance and the token filters."""

    cfg: float = 1.0
    """Classifier-free guidance scale (1: off; when on, every model call runs a batch of 2B rows)."""
    cfg_schedule: CfgSchedule = "constant"
    """Guidance over the sampling progress: constant, linear (1 -> cfg), interval, power_cosine."""
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    """Progress (low, high) where the `interval` schedule guides (1 outside)."""
    cfg_power: float = 1.0
    """Exponent of the `power_cosine` schedule."""
    temperature: float = 1.0
    """Softmax temperature of discrete tokens; the noise scale of a continuous head."""
    top_k: int | None = None
    """Keep the k most likely tokens (None: all)."""
    top_p: float | None = None
    """Keep the smallest set of tokens whose probability reaches top_p (None: all)."""

    def __post_init__(self):
        self.cfg_interval = tuple(self.cfg_interval)
        check_sampling_args(self.temperature, self.top_k, self.top_p, self.cfg)
        check_cfg_schedule(self.cfg_schedule, self.cfg_interval)

    def guidance(self, null_class: int) -> Guidance:
        return Guidance(self.cfg, self.cfg_schedule, self.cfg_interval, self.cfg_power, null_class=null_class)

    @classmethod
    def parse(cls: type[S], values: "SamplingSettings | dict[str, Any] | None", setting: str = "sampling") -> S:
        """A settings object from a mapping (a config's `predict_kwargs`, an evaluator's `sampling`), refusing a key
        this method does not take, by name, with the accepted ones."""
        if isinstance(values, cls):
            return values
        if isinstance(values, SamplingSettings):  # another method's settings: keep the fields this one knows
            values = dataclasses.asdict(values)
        values = dict(values or {})
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{setting}: {', '.join(map(repr, unknown))} is not a sampling setting of {cls.__name__}; "
                             f"accepted: {', '.join(known)}")  # fmt: skip
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        """The settings as a plain mapping, as a config, a checkpoint and a JSON record hold them (lists for pairs)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass
class ContinuousSampling(SamplingSettings):
    """Sampling settings of continuous tokens with a flow or diffusion head (MAR, FlowAR, causal + flow). cfg guides
    the head's velocity (the diffusion head's noise prediction), ramped over the AR steps by `cfg_schedule`;
    temperature scales the flow head's starting noise (the diffusion head's noise at each DDPM step, as MAR)."""

    cfg_schedule: CfgSchedule = "linear"
    """Guidance over the AR steps: linear (1 -> cfg, MAR's and VAR's), constant or power_cosine (`guidance_interval`
    limits CFG in flow time instead of `interval`)."""
    steps: int | None = None
    """AR steps of the masked backbone (default min(64, L), cosine schedule); the scale-wise and causal backbones
    take one step per scale or token (leave null)."""
    flow_steps: int | None = None
    """ODE/SDE steps of the flow head (default 25), DDPM steps of the diffusion head (default 100, MAR's)."""
    sampler: Literal["euler", "heun", "euler_maruyama", "ddpm"] | None = None
    """The flow head's euler (default), heun (2 head calls a step, 1 in the last) or euler_maruyama (SDE); the
    diffusion head's ddpm (its only one)."""
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    """Flow times (low, high) where the flow head applies CFG (1 outside)."""

    def __post_init__(self):
        super().__post_init__()
        self.guidance_interval = tuple(self.guidance_interval)
        if self.top_k is not None or self.top_p is not None:
            raise ValueError(f"top_k={self.top_k}, top_p={self.top_p}: filters of discrete logits; continuous tokens "
                             "take temperature (the head's noise scale) only")  # fmt: skip
        if self.cfg_schedule not in CONTINUOUS_CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule={self.cfg_schedule!r} is not supported here; use one of "
                             f"{CONTINUOUS_CFG_SCHEDULES} (guidance_interval limits CFG in flow time)")  # fmt: skip


def check_head_batch_mul(head_batch_mul: int) -> None:
    if head_batch_mul < 1:
        raise ValueError(f"model.init_args.head_batch_mul={head_batch_mul} must be >= 1")


class Method:
    """What every method has beside its own `loss` and `sample`: its settings' class and `validation`, by default
    the loss on the validation step's draws (with the true labels: class dropout is training's)."""

    Sampling = SamplingSettings

    def loss(self, core, head, tokens, labels, draws, **kwargs) -> dict:
        raise NotImplementedError

    def validation(self, core, head, tokens, labels, draws, **kwargs) -> dict:
        return {"loss": self.loss(core, head, tokens, labels, draws, **kwargs)["loss"]}
