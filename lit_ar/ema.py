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


def warmup_ema_update(decay: float) -> Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor], None]:
    """The `multi_avg_fn` of torch's AveragedModel: updates a group of averages (one device, one dtype) in place
    towards the current weights, given the number of updates so far n >= 1, with the decay
    min(decay, (1 + n) / (10 + n)). Integer buffers (counters) take the current value.

    One multi-tensor lerp per group and step, where a per-tensor `avg_fn` launches its small ops once per parameter:
    that launch cost is what a small model on a GPU pays for its EMA (`python -m benchmarks.ema`)."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"WarmupEMA decay={decay!r} must be in [0, 1) (e.g. 0.999 or 0.9999)")

    @torch.no_grad()
    def update(averages: list[torch.Tensor], currents: list[torch.Tensor], n: torch.Tensor) -> None:
        if not averages[0].is_floating_point():  # AveragedModel groups the tensors by dtype
            torch._foreach_copy_(averages, currents)
            return
        # Reading the count waits for the device, but AveragedModel has just waited on the same count
        # (`n_averaged == 0`) in this update, so nothing new is queued behind it.
        updates = int(n)
        weight = 1.0 - min(decay, (1 + updates) / (10 + updates))
        torch._foreach_lerp_(averages, currents, weight)

    return update


class WarmupEMA(EMAWeightAveraging):
    """Lightning's `EMAWeightAveraging` with the decay warm-up above. Arguments as Lightning's (`decay`,
    `update_every_n_steps`, `update_starting_at_step`, `update_starting_at_epoch`, `device`, `use_buffers`)."""

    def __init__(self, decay: float = 0.999, **kwargs):
        update = warmup_ema_update(decay)  # checks the decay first: Lightning's own check names no setting
        super().__init__(decay=decay, **kwargs)
        # replaces the fixed-decay per-tensor update Lightning set; AveragedModel uses multi_avg_fn only without avg_fn
        self._kwargs.update(avg_fn=None, multi_avg_fn=update)
