"""Callbacks that let a run survive interruption and bad numerics, on every run of the `lit_ar` command.

- `ExactResume`: saves and restores the RNG states (torch CPU and CUDA, numpy, python) so that a resumed run draws
  the random numbers the uninterrupted run would have drawn. With the datamodule's resumable loader (the data
  order continues mid-epoch) and Lightning's own state (weights, optimizer, LR schedule, grad scaler, EMA), the
  loss curve of a resumed run equals the uninterrupted one.
- `Preemption`: SIGTERM (Lightning's handler) and SIGUSR1 (added here outside SLURM) save `last.ckpt` at the next
  batch boundary and exit cleanly; `--ckpt_path last` resumes from it.
- `NonFiniteGuard`: a non-finite loss or gradient skips the optimizer step and is counted (`train/nonfinite_steps`);
  `max_consecutive` in a row stop the run with the last good checkpoint untouched.
- `check_finite(terms)`: the test a manual-optimization system calls before stepping.

The `lit_ar` command adds the three callbacks to every Trainer it builds (`lit_ar.cli`); a config lists one only to
change its settings.
"""

import random
import signal
from collections.abc import Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

# --------------------------------------------------------------------------------------------------- exact resume


def get_rng_states() -> dict[str, Any]:
    """Every global RNG a training step may draw from, in types `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # this process's device only: touching every GPU would open a CUDA context on each from every DDP rank
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


class ExactResume(L.Callback):
    """Save the RNG states in every checkpoint and restore them when training resumes from one.

    They are restored at `on_train_start`, after the sanity check and anything else that runs between loading the
    checkpoint and the first batch, so the first resumed step draws exactly what it would have drawn. In DDP every
    rank restores rank 0's states (CUDA: of its own current device); `seed_everything` seeds all ranks alike, so
    their streams are the same anyway.
    The data order is not kept here: ImageDataModule's training loader is resumable itself (a warning says when the
    training loader of a run is not).
    """

    def __init__(self):
        self._to_restore: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"rng": get_rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._to_restore = state_dict.get("rng")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._to_restore is not None:
            set_rng_states(self._to_restore)
            self._to_restore = None
        loaders = getattr(getattr(trainer.fit_loop, "_combined_loader", None), "flattened", [])
        if not all(hasattr(dl, "state_dict") and hasattr(dl, "load_state_dict") for dl in loaders):
            rank_zero_warn(
                "ExactResume: the training dataloader cannot save its position, so a resume from a mid-epoch "
                "checkpoint restarts the epoch's data order. ImageDataModule's loader is resumable."
            )


# ---------------------------------------------------------------------------------------------------- pre-emption


class Preemption(L.Callback):
    """On SIGTERM or SIGUSR1, finish the current batch, save `last.ckpt` (through every ModelCheckpoint with
    `save_last`), and exit with status 0; `lit_ar fit ... --ckpt_path last` then resumes exactly.

    Lightning already turns SIGTERM into a clean stop at the next batch boundary, but saves nothing; this callback
    adds the save, and makes SIGUSR1 (and any other signal listed) behave like SIGTERM. On SLURM with Lightning's
    `SLURMEnvironment(auto_requeue=True)` (the default there), Lightning keeps SIGUSR1 for itself: it writes an
    `hpc_ckpt_<n>.ckpt` into the trainer's root folder and requeues the job; the SIGTERM that follows then writes
    `last.ckpt` here.

    Args:
        signals: Extra signals treated like SIGTERM (which Lightning always handles). A signal that already has a
            handler (e.g. Lightning's SLURM requeue handler) is left alone.
        require_last_checkpoint: Refuse to fit without a ModelCheckpoint with `save_last: true`, where the
            pre-emption checkpoint goes; false only warns, and a pre-empted run then stops cleanly without saving.
            The Preemption `lit_ar` adds to a config that lists none is not strict (see `lit_ar.cli`).
    """

    def __init__(self, signals: list[str] | None = None, require_last_checkpoint: bool = True):
        self.signals = ["SIGUSR1"] if signals is None else list(signals)
        self.require_last_checkpoint = require_last_checkpoint
        for name in self.signals:
            if not isinstance(getattr(signal, name, None), signal.Signals):
                raise ValueError(f"Preemption.signals: {name!r} is not a signal of this platform (e.g. 'SIGUSR1')")
        self._previous: dict[signal.Signals, Any] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or any(isinstance(cb, ModelCheckpoint) and cb.save_last for cb in trainer.callbacks):
            return
        if self.require_last_checkpoint:
            raise ValueError(
                "Preemption needs a ModelCheckpoint with `save_last: true` in `trainer.callbacks`: the pre-emption "
                "checkpoint is written as its last.ckpt, where `--ckpt_path last` finds it."
            )
        if any(isinstance(cb, ModelCheckpoint) for cb in trainer.callbacks):  # checkpointing on, but no last.ckpt
            rank_zero_warn(
                "Preemption: no ModelCheckpoint in `trainer.callbacks` has `save_last: true`, so a pre-empted run "
                "stops cleanly but saves nothing to resume from; add one to resume with `--ckpt_path last`."
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning installs its SIGTERM handler just before the run starts; ours forward to it.
        for name in self.signals:
            signum = getattr(signal, name)
            if signal.getsignal(signum) in (signal.SIG_DFL, None):
                self._previous[signum] = signal.signal(signum, self._forward_to_sigterm)

    @staticmethod
    def _forward_to_sigterm(signum: int, frame: Any) -> None:
        handler = signal.getsignal(signal.SIGTERM)
        if callable(handler):
            handler(signum, frame)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.sanity_checking:
            return
        saved = []
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath is not None:
                # ModelCheckpoint's own last-checkpoint path (naming, `last_model_path` bookkeeping, symlink mode);
                # private in Lightning 2.6, covered by tests/test_reliability.py
                cb._save_last_checkpoint(trainer, cb._monitor_candidates(trainer))
                saved.append(cb.last_model_path)
        if not saved:
            rank_zero_info(f"Preemption: signal received at step {trainer.global_step}; nothing saved (no "
                           "ModelCheckpoint with `save_last: true`).")  # fmt: skip
            return
        rank_zero_info(
            f"Preemption: signal received; saved step {trainer.global_step} to {', '.join(saved)}. "
            "Resume with `--ckpt_path last`."
        )


# ------------------------------------------------------------------------------------------------ non-finite guard


class NonFiniteLossError(RuntimeError):
    """Too many non-finite steps in a row; the message names the steps and the loss terms that went bad."""


def check_finite(terms: Mapping[str, torch.Tensor] | torch.Tensor, trainer: L.Trainer | None = None) -> bool:
    """True when every value in `terms` is finite (one device sync). Pass `trainer` under DDP so that every rank
    takes the same decision (a rank skipping a step alone would hang the others).

    A manual-optimization system calls it before stepping, and returns its terms from `training_step` so that
    `NonFiniteGuard` counts the batch and names the bad terms:

        terms = {"rec": rec, "perceptual": perceptual, "gan": gan}
        if not check_finite(terms, self.trainer):
            return terms  # skip the optimizer steps (and any buffer updates) of this batch
    """
    values = [terms] if isinstance(terms, torch.Tensor) else [v for v in terms.values() if torch.is_tensor(v)]
    ok = bool(torch.stack([v.detach().isfinite().all() for v in values]).all()) if values else True
    if trainer is not None:
        ok = bool(trainer.strategy.reduce_boolean_decision(ok, all=True))
    return ok


def nonfinite_terms(*sources: Mapping[str, Any] | torch.Tensor | None) -> dict[str, float]:
    """{name: value} of the non-finite scalars among logged metrics and training-step outputs."""
    bad: dict[str, float] = {}
    for source in sources:
        if source is None:
            continue
        items = {"loss": source}.items() if isinstance(source, torch.Tensor) else source.items()
        for name, value in items:
            if torch.is_tensor(value) and value.numel() and not bool(value.detach().isfinite().all()):
                bad[name] = float(value.detach().float().flatten()[~value.detach().flatten().isfinite()][0])
    return bad


class NonFiniteGuard(L.Callback):
    """Skip optimizer steps whose loss or gradients are not finite; stop after `max_consecutive` in a row.

    A skipped step leaves weights and optimizer state untouched (gradients are set to None, so the optimizer
    passes over every parameter); the LR schedule and `global_step` still advance, as with a grad-scaler skip.
    The count is logged as `train/nonfinite_steps` and kept in checkpoints. With a GradScaler (16-mixed), overflowing
    gradients are the scaler's business (it skips and lowers the scale); only a non-finite loss is handled here.
    The stop raises NonFiniteLossError before ModelCheckpoint sees that batch, and nothing is saved on the way out;
    a checkpoint written earlier in the streak holds the weights from before it (skipped steps change nothing).
    Works for automatic optimization as is, and for manual optimization (`manual_backward` and `opt.step()` pass
    through the same hooks); see `check_finite` for skipping a whole manual step.

    Args:
        max_consecutive: Stop the run after this many non-finite steps in a row.
        check_gradients: Also check every gradient (one extra reduction per step), not only the loss.
    """

    def __init__(self, max_consecutive: int = 10, check_gradients: bool = True):
        if max_consecutive < 1:
            raise ValueError(f"NonFiniteGuard.max_consecutive={max_consecutive} must be at least 1")
        self.max_consecutive, self.check_gradients = max_consecutive, check_gradients
        self.total, self.consecutive = 0, 0
        self._loss: torch.Tensor | None = None
        self._batch_bad = False
        self._bad_params: list[str] = []
        self._bad_terms: dict[str, float] = {}
        self._first_bad_step: int | None = None
        self._step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total, "consecutive": self.consecutive, "first_bad_step": self._first_bad_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.total, self.consecutive = state_dict["total"], state_dict["consecutive"]
        self._first_bad_step = state_dict.get("first_bad_step")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_bad, self._bad_params, self._bad_terms = False, [], {}
        # the step on TensorBoard's axis: one per batch, also in manual optimization (where global_step counts
        # optimizer steps)
        self._step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self._loss = loss.detach()

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        loss_bad = self._loss is not None and not bool(self._loss.isfinite().all())
        self._loss = None
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        grads = [p.grad for p in params if p.grad is not None]
        grads_bad = False
        if self.check_gradients and scaler is None and grads and not loss_bad:
            # fused per-tensor norms (as clip_grad_norm_); inf or nan anywhere makes their sum non-finite
            norms = torch._foreach_norm(grads)
            grads_bad = not bool(torch.stack([n.to(norms[0].device) for n in norms]).sum().isfinite())
        # every rank takes the same decision (a rank stepping alone would desynchronise DDP)
        if not trainer.strategy.reduce_boolean_decision(loss_bad or grads_bad, all=False):
            return
        self._batch_bad = True
        if grads_bad:  # a finite loss with bad gradients: say where (with a NaN loss, all of them are)
            names = {id(p): n for n, p in pl_module.named_parameters()}
            bad_grads = [p for p in params if p.grad is not None and not p.grad.isfinite().all()]
            self._bad_params += [names.get(id(p), "?") for p in bad_grads]
        for p in params:  # no gradient, no update: the optimizer skips every parameter (state and weight decay too)
            p.grad = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        terms = outputs if isinstance(outputs, (Mapping, torch.Tensor)) else None
        bad_outputs = nonfinite_terms(terms)
        if bad_outputs:  # e.g. a manual-optimization system that skipped its steps after check_finite
            self._batch_bad = True
        step = self._step
        if self._batch_bad:
            # name the bad terms: what the system logged this step (train/...) and what it returned
            logged = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
            self._bad_terms.update(nonfinite_terms(logged))
            self._bad_terms.update({k: v for k, v in bad_outputs.items() if f"train/{k}" not in self._bad_terms})
            self.total += 1
            self.consecutive += 1
            if self.consecutive == 1:
                self._first_bad_step = step
            rank_zero_warn(f"NonFiniteGuard: skipped step {step}: {self._describe()}")
        else:
            self.consecutive = 0
        pl_module.log("train/nonfinite_steps", float(self.total), on_step=True, on_epoch=False)
        if self.consecutive >= self.max_consecutive:
            saved = [cb.last_model_path or cb.best_model_path for cb in trainer.checkpoint_callbacks]
            last = ", ".join(p for p in saved if p) or "none saved yet"
            first = self._first_bad_step if self._first_bad_step is not None else step
            raise NonFiniteLossError(
                f"NonFiniteGuard: {self.consecutive} non-finite steps in a row (steps {first} to {step} on "
                f"TensorBoard's axis; "
                f"NonFiniteGuard.max_consecutive={self.max_consecutive}). At step {step}: {self._describe()}. "
                f"The run stopped without saving; the last good checkpoint is {last}. Lower the learning rate, "
                "check the data, or resume from an earlier checkpoint."
            )

    def _describe(self) -> str:
        parts = []
        if self._bad_terms:
            parts.append("non-finite " + ", ".join(f"{k}={v}" for k, v in sorted(self._bad_terms.items())))
        if self._bad_params:
            shown = ", ".join(self._bad_params[:3]) + (" ..." if len(self._bad_params) > 3 else "")
            parts.append(f"non-finite gradients in {len(self._bad_params)} parameters ({shown})")
        return "; ".join(parts) or "non-finite loss"
