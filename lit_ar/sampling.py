"""Sampling arithmetic shared by every family: logit filters (temperature, top-k, top-p), seeded categorical
sampling and mask schedules. Pure functions over tensors; no model code. Guidance and its schedules: lit_ar.guidance."""

import math

import torch

MASK_SCHEDULES = ("cosine", "arccos", "linear", "power", "sigmoid")


def check_sampling_args(temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                        cfg: float = 1.0) -> None:  # fmt: skip
    """Refuse bad sampling settings before any work, naming the setting, the value and what is accepted."""
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1 (or None to disable)")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (or None to disable)")
    if cfg < 0:
        raise ValueError(f"cfg={cfg} must be >= 0 (1 means no guidance)")


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf the logits outside the top-k and outside the smallest set whose probability reaches top_p.
    logits (..., V); returns a new tensor of the same shape."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens ranked above it already reach top_p (the first token is always kept)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (..., V) -> sampled indices (...) long. Uses the Gumbel-max trick with noise drawn from `generator`,
    so the same generator state gives the same tokens, and the step has no data-dependent shapes (compiles)."""
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    return torch.argmax(logits + gumbel_noise(logits.shape, generator, logits.device), dim=-1)


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Standard Gumbel noise of `shape` (fp32), from uniforms drawn from `generator` (clamped away from log(0))."""
    uniform = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    return -torch.log((-torch.log(uniform.clamp_min(1e-20))).clamp_min(1e-20))


def mask_ratio(schedule: str, r: torch.Tensor | float, power: float = 2.0, sigmoid_k: float = 10.0) -> torch.Tensor:
    """Fraction of tokens still masked when a fraction r in [0, 1] of the decoding is done: 1 at r=0, 0 at r=1,
    non-increasing. MaskGIT samples the training mask ratio as mask_ratio(U(0, 1))."""
    r = torch.as_tensor(r, dtype=torch.float64)
    if schedule == "cosine":
        out = torch.cos(r * math.pi / 2)
    elif schedule == "arccos":
        out = torch.arccos(r) / (math.pi / 2)
    elif schedule == "linear":
        out = 1 - r
    elif schedule == "power":
        out = 1 - r**power
    elif schedule == "sigmoid":  # rescaled so that it is exactly 1 at r=0 and 0 at r=1
        s = torch.sigmoid(sigmoid_k * (0.5 - r))
        s0, s1 = 1 / (1 + math.exp(-sigmoid_k * 0.5)), 1 / (1 + math.exp(sigmoid_k * 0.5))
        out = (s - s1) / (s0 - s1)
    else:
        raise ValueError(f"mask_schedule={schedule!r} is not known; known schedules: {MASK_SCHEDULES}")
    return out.clamp(0.0, 1.0)


def tokens_to_reveal(schedule: str, num_tokens: int, steps: int, **kwargs) -> list[int]:
    """How many tokens each of `steps` steps reveals: at least 1 per step, all `num_tokens` by the last step."""
    if not 1 <= steps <= num_tokens:
        raise ValueError(f"steps={steps} must be between 1 and the number of tokens ({num_tokens})")
    masked_after = [int(math.floor(float(mask_ratio(schedule, (i + 1) / steps, **kwargs)) * num_tokens))
                    for i in range(steps)]  # fmt: skip
    counts, remaining = [], num_tokens
    for i, m in enumerate(masked_after):
        # leave at least one token for each later step, reveal at least one now
        m = min(m, remaining - 1, num_tokens)
        m = max(m, steps - i - 1)
        counts.append(remaining - m)
        remaining = m
    return counts
