"""EMA of the weights with a warm-up of its decay: Lightning's `EMAWeightAveraging`, whose average starts from the
weights after the first step and decays at a fixed rate, keeps a fraction decay**n of those near-initial weights
after n updates (0.999: 37% after 1000 steps, 5% after 3000). Sampling from such an average early in training draws
from a model that is partly its random initialisation. With the warm-up the decay after n updates is
min(decay, (1 + n) / (10 + n)) (as diffusers' and timm's EMAs do), so the average forgets the start at once and
settles at `decay` after about 10 / (1 - decay) updates.

    trainer:
      callbacks:
        - class_path: lit_ar.ema.WarmupEMA
          init_args: {decay: 0.999}

Everything else is Lightning's: the averaged weights are what validation, `test` and `predict` use and what a
checkpoint's `state_dict` holds (the trained weights under `current_model_state`); the update count is in the
checkpoint, so a resumed run continues the same warm-up.
"""

from collections.abc import Callable

import torch
from lightning.pytorch.callbacks import EMAWeightAveraging


def warmup_ema_update(decay: float) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The `avg_fn` of torch's AveragedModel: (average, current, number of updates so far n >= 1) -> new average,
    with the decay min(decay, (1 + n) / (10 + n)). Integer buffers (counters) take the current value."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"WarmupEMA decay={decay!r} must be in [0, 1) (e.g. 0.999 or 0.9999)")

    def update(average: torch.Tensor, current: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        if not average.is_floating_point():
            return current
        d = ((1 + n) / (10 + n)).clamp(max=decay)  # () float32 on the average's device (n is an integer count)
        return average + (current - average) * (1.0 - d)

    return update


class WarmupEMA(EMAWeightAveraging):
    """Lightning's `EMAWeightAveraging` with the decay warm-up above. Arguments as Lightning's (`decay`,
    `update_every_n_steps`, `update_starting_at_step`, `update_starting_at_epoch`, `device`, `use_buffers`)."""

    def __init__(self, decay: float = 0.999, **kwargs):
        update = warmup_ema_update(decay)  # checks the decay first: Lightning's own check names no setting
        super().__init__(decay=decay, **kwargs)
        self._kwargs["avg_fn"] = update  # replaces the fixed-decay update Lightning set
