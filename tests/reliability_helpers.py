"""Test-only callbacks, passed to the real CLI as `--trainer.callbacks+=reliability_helpers.<Name>` (tests/ is on
sys.path under pytest; subprocesses get it through PYTHONPATH)."""

import os
import random
import signal

import lightning as L
import numpy as np
import torch


class SignalAtStep(L.Callback):
    """Send this process a real signal after optimizer step `step`, as a scheduler pre-empting the job would."""

    def __init__(self, step: int, signal_name: str = "SIGTERM"):
        self.step, self.signal_name = step, signal_name

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), getattr(signal, self.signal_name))


class AnnounceSteps(L.Callback):
    """Print `lit_ar-test step N` after every step, so a test driving a subprocess knows training is under way."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        print(f"lit_ar-test step {trainer.global_step}", flush=True)


class RandomProbe(L.Callback):
    """Draw from the torch, numpy and python global RNGs before every step (as dropout or random masking would)
    and log the draws, so a resume test sees whether the RNG states were restored."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        draws = {"torch": torch.rand(()).item(), "numpy": float(np.random.rand()), "python": random.random()}
        for name, value in draws.items():
            pl_module.log(f"probe/{name}", value, on_step=True, on_epoch=False)


class InjectNonFinite(L.Callback):
    """Make chosen steps non-finite: NaN images at `nan_steps` (a NaN loss), an inf gradient at `inf_grad_steps`.
    Records, for every step, whether the weights and the optimizer state changed."""

    def __init__(self, nan_steps: list[int] | None = None, inf_grad_steps: list[int] | None = None, from_step=None):
        self.nan_steps, self.inf_grad_steps = set(nan_steps or []), set(inf_grad_steps or [])
        self.from_step = from_step
        self.changed: dict[int, tuple[bool, bool]] = {}

    def _bad(self, step: int) -> bool:
        return step in self.nan_steps or (self.from_step is not None and step >= self.from_step)

    @staticmethod
    def _snapshot(trainer, pl_module):
        weights = [p.detach().clone() for p in pl_module.parameters()]
        opt = trainer.optimizers[0].state_dict()["state"]
        state = [v.clone() for s in opt.values() for v in s.values() if torch.is_tensor(v)]
        return weights, state

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._before = self._snapshot(trainer, pl_module)
        if self._bad(trainer.global_step):
            batch["image"].fill_(float("nan"))

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step in self.inf_grad_steps:
            next(pl_module.parameters()).grad.view(-1)[0] = float("inf")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        after = self._snapshot(trainer, pl_module)
        same = [len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b)) for a, b in zip(self._before, after)]
        self.changed[trainer.global_step - 1] = (not same[0], not same[1])
