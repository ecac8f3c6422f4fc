"""Safe checkpoints: atomic writes, and loading that refuses what it cannot trust, with errors that name the file.

- `load_checkpoint(path, expected_system=..., module=..., setting=...)` is the one way lit_ar reads a checkpoint
  (`weights_only=True`, never arbitrary pickles). It tells apart a missing file, a truncated or corrupt one, a file
  holding pickled objects, a checkpoint of another system (family), and one whose weights do not fit the model
  built from the current config (naming the settings that differ).
- `load_system(path, SystemClass, setting=...)` returns the system itself, frozen in eval mode (what a generator
  does with its tokenizer checkpoint).
- `SafeCheckpointIO` is the Trainer plugin (`trainer.plugins`) that makes Lightning's own saving atomic (temp file in
  the same folder, fsync, `os.replace`) and routes Lightning's `--ckpt_path` loading through `load_checkpoint`.
"""

import inspect
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.utilities import rank_zero_warn


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


class CorruptCheckpointError(CheckpointError):
    """The file is truncated, damaged (failed CRC) or not a PyTorch checkpoint at all."""


class UnsafeCheckpointError(CheckpointError):
    """The file holds pickled Python objects that `weights_only=True` refuses to run."""


class WrongSystemError(CheckpointError):
    """The checkpoint belongs to another system (family) than the one asked for."""


class IncompatibleCheckpointError(CheckpointError):
    """The checkpoint's weights do not fit the model built from the current config."""


def load_checkpoint(
    path: str | os.PathLike,
    expected_system: type | None = None,
    module: torch.nn.Module | None = None,
    setting: str = "ckpt_path",
    map_location: Any = "cpu",
    verify_crc: bool = True,
    fresh: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Load a Lightning checkpoint with `weights_only=True` and check it before anything uses it.

    Args:
        path: The checkpoint file.
        expected_system: The LightningModule class the checkpoint must come from (compared by the saved class path
            and, for checkpoints saved outside the CLI, by the saved hyper-parameter names).
        module: A model built from the current config; its weights' names and shapes must match the checkpoint's.
        setting: The config setting that named `path` (it appears in the error messages).
        map_location: Passed to `torch.load`.
        verify_crc: Check every stored record against its CRC32 (torch does not, so a flipped bit would load
            silently); costs one extra read of the file.
        fresh: Prefixes of `module`'s weights the checkpoint may lack: they start fresh (a drafter added to a
            trained model for fine-tuning).
    """
    path = Path(path)
    if not path.is_file():
        hint = " (it is a folder)" if path.is_dir() else ""
        raise FileNotFoundError(f"{setting}={str(path)!r}: no checkpoint file at this path{hint}")
    checkpoint = _read(path, map_location, verify_crc)
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        keys = sorted(checkpoint)[:8] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise CheckpointError(
            f"{setting}={str(path)!r} is not a Lightning checkpoint: it has no 'state_dict' (found {keys}). "
            "A bare model state dict loads with `model.load_state_dict(torch.load(path, weights_only=True))`."
        )
    if expected_system is not None:
        check_system(checkpoint, expected_system, path, setting)
    if module is not None:
        check_fits(checkpoint, module, path, setting, fresh)
    return checkpoint


def load_system(
    path: str | os.PathLike, system_class: type, setting: str = "ckpt_path", map_location: Any = "cpu"
) -> torch.nn.Module:
    """Check the checkpoint with `load_checkpoint`, then build the system from its saved hyper-parameters, load its
    weights (strictly) and return it frozen (requires_grad False) in eval mode."""
    checkpoint = load_checkpoint(path, expected_system=system_class, setting=setting, map_location=map_location)
    hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}
    system = system_class(**hparams)
    system.load_state_dict(checkpoint["state_dict"])
    system.eval().requires_grad_(False)
    return system


def _read(path: Path, map_location: Any, verify_crc: bool) -> Any:
    if not zipfile.is_zipfile(path):  # torch.save writes zip archives; a truncated one loses its directory at the end
        size = path.stat().st_size
        raise CorruptCheckpointError(
            f"checkpoint {str(path)!r} ({size} bytes) is truncated or corrupt: it is not a complete PyTorch zip "
            "archive (an interrupted write or copy leaves such a file). Resume from an earlier checkpoint."
        )
    if verify_crc:
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            bad = f"<archive> ({err})"
        if bad is not None:
            raise CorruptCheckpointError(
                f"checkpoint {str(path)!r} is corrupt: record {bad!r} fails its CRC check (damaged on disk or in a "
                "copy). Resume from an earlier checkpoint."
            )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"checkpoint {str(path)!r} holds pickled Python objects that lit_ar will not load: checkpoints are read "
            f"with weights_only=True so that loading a file cannot run code. ({str(err).splitlines()[-1][:300]}) "
            "Re-save it from a trusted environment with only tensors, numbers, strings and containers."
        ) from err
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise CorruptCheckpointError(
            f"checkpoint {str(path)!r} is truncated or corrupt and cannot be read "
            f"({type(err).__name__}: {str(err)[:200]}). Resume from an earlier checkpoint."
        ) from err


def _class_name(class_path: str) -> str:
    return class_path.rsplit(".", 1)[-1]


def check_system(checkpoint: Mapping, expected_system: type, path: Path | str, setting: str) -> None:
    """Refuse a checkpoint saved by another system (family) than `expected_system`, naming both."""
    hparams = checkpoint.get("hyper_parameters") or {}
    expected = f"{expected_system.__module__}.{expected_system.__qualname__}"
    saved = hparams.get("_class_path")  # written by LightningCLI
    if saved is not None:
        # Compare class names (a class is re-exported under several module paths); a checkpoint of a subclass is
        # accepted only when the subclass is one lit_ar can see without importing anything named in the file.
        names = {cls.__name__ for cls in expected_system.__mro__} | _subclass_names(expected_system)
        if _class_name(saved) not in names:
            raise WrongSystemError(
                f"{setting}={str(path)!r} is a checkpoint of {saved}, not of {expected}: it belongs to another "
                "family. Point the setting at a checkpoint trained with that system."
            )
        return
    # Saved outside the CLI: the saved hyper-parameter names must be arguments of the expected system.
    params = inspect.signature(expected_system.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(k for k in hparams if not k.startswith("_") and k not in params)
    if unknown:
        raise WrongSystemError(
            f"{setting}={str(path)!r} does not look like a checkpoint of {expected}: its hyper-parameters "
            f"{unknown} are not arguments of {expected_system.__name__} (saved by {checkpoint.get('hparams_name')!r} "
            "of another system?)."
        )


def _subclass_names(cls: type) -> set[str]:
    names, stack = set(), list(cls.__subclasses__())
    while stack:
        sub = stack.pop()
        names.add(sub.__name__)
        stack.extend(sub.__subclasses__())
    return names


def check_fits(checkpoint: Mapping, module: torch.nn.Module, path: Path | str, setting: str,
               fresh: tuple[str, ...] = ()) -> None:  # fmt: skip
    """Refuse a checkpoint whose weights do not match `module` (built from the current config) in names or shapes,
    naming the hyper-parameters whose values differ between the checkpoint and the current config. Weights under a
    `fresh` prefix may be missing."""
    saved = checkpoint["state_dict"]
    current = module.state_dict()
    missing = [k for k in current if k not in saved and not k.startswith(fresh)]
    unexpected = [k for k in saved if k not in current]
    shapes = [
        (k, tuple(saved[k].shape), tuple(v.shape))
        for k, v in current.items()
        if k in saved and hasattr(saved[k], "shape") and tuple(saved[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or shapes):
        return
    problems = []
    if shapes:
        k, a, b = shapes[0]
        problems.append(f"{len(shapes)} weights differ in shape, e.g. {k} is {a} in the checkpoint and {b} here")
    if missing:
        problems.append(f"{len(missing)} weights are missing from the checkpoint, e.g. {missing[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} weights in the checkpoint have no place here, e.g. {unexpected[0]}")
    diffs = hparam_differences(checkpoint.get("hyper_parameters") or {}, dict(getattr(module, "hparams", {}) or {}))
    settings = "; ".join(f"model.init_args.{k}: {a!r} in the checkpoint, {b!r} in this config" for k, a, b in diffs)
    raise IncompatibleCheckpointError(
        f"{setting}={str(path)!r} does not fit the model of this config: {'; '.join(problems)}. "
        + (f"Settings that differ: {settings}." if settings else "No saved setting differs; was the code changed?")
    )


def hparam_differences(saved: Mapping, current: Mapping) -> list[tuple[str, Any, Any]]:
    """(name, saved value, current value) for every hyper-parameter present in both that differs."""
    return [
        (k, saved[k], current[k]) for k in current if not k.startswith("_") and k in saved and saved[k] != current[k]
    ]


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic local writes and checked loading.

    Saving: the checkpoint is written to a hidden temp file in the target folder, flushed and fsynced, then
    `os.replace`d over the target, so a crash or pre-emption mid-write leaves the previous checkpoint intact (the
    stock plugin writes through a temp file in the system temp folder and moves it, which is a copy, not atomic,
    when that folder is on another file system). Remote paths (s3://, ...) keep Lightning's behaviour.

    Loading (`--ckpt_path ...`): through `load_checkpoint`, with `weights_only=True`. The CLI calls `expect(model)`
    before running, so a checkpoint of another family or one that does not fit the config is refused by name.

    Args:
        verify_crc: Check each record of a checkpoint against its CRC32 before loading it.
        keep_temp_on_error: Leave the temp file of a failed save on disk (for debugging) instead of deleting it.
    """

    def __init__(self, verify_crc: bool = True, keep_temp_on_error: bool = False):
        super().__init__()
        self.verify_crc = verify_crc
        self.keep_temp_on_error = keep_temp_on_error
        self._module: torch.nn.Module | None = None

    def expect(self, module: torch.nn.Module | None) -> None:
        """Check loaded checkpoints against this model: its class (family) and its weights' names and shapes."""
        self._module = module

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(str(path)):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_save(checkpoint, path, keep_temp_on_error=self.keep_temp_on_error)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if not _is_local_file_protocol(str(path)):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        if weights_only is False:
            rank_zero_warn("SafeCheckpointIO loads with weights_only=True; `weights_only=False` is ignored.")
        module = self._module
        return load_checkpoint(
            path,
            expected_system=type(module) if module is not None else None,
            module=module,
            setting="ckpt_path",
            map_location=map_location if map_location is not None else "cpu",
            verify_crc=self.verify_crc,
        )


def atomic_save(obj: Any, path: str | os.PathLike, keep_temp_on_error: bool = False) -> None:
    """`torch.save` to a temp file in the same folder, fsync, then `os.replace`: readers see the old file or the new
    one, never a partial one. Stale temp files of the same target (from a killed writer) are removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.tmp-"
    tmp = path.with_name(f"{prefix}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if not keep_temp_on_error:
            tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    for stale in path.parent.glob(f"{prefix}*"):
        stale.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    """Persist the rename itself (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
