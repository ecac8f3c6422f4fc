"""The learning-rate schedule every lit_ar system uses: linear warm-up, then cosine decay to a floor."""

import math

import torch


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Multiplier (step + 1) / warmup_steps during warm-up (none when warmup_steps is 0), then a cosine from 1
    down to `min_lr_ratio` at `total_steps`. Stepped once per optimizer step."""
    warmup_steps = max(0, min(warmup_steps, total_steps // 2))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
