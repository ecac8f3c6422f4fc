"""Pictures and run folders through whichever Lightning logger a run has.

`log_image` sends one grid to every logger of the trainer in that logger's own way: TensorBoard's `add_image`,
W&B's `log_image`, an MLflow artifact (`<tag>/step_000200.png`), and for the CSV logger (or any other logger with a
folder) PNG files in its run folder (`images/<tag>/step_000200.png`). `check_logger_packages` refuses, before
anything is built, a config whose logger's package is missing (naming the package and the pip command);
`check_run_folders` refuses a run folder that cannot be written, before training starts; `describe_run` says where a
run's logs are and how to look at them.
"""

import importlib.util
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.logger import DummyLogger
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image

# A logger class's name -> (the modules it can use, the pip command that installs one).
LOGGER_PACKAGES: dict[str, tuple[tuple[str, ...], str]] = {
    "TensorBoardLogger": (("tensorboard", "tensorboardX"), "pip install tensorboard"),
    "WandbLogger": (("wandb",), "pip install wandb"),
    "MLFlowLogger": (("mlflow",), "pip install mlflow-skinny"),
    "CometLogger": (("comet_ml",), "pip install comet-ml"),
    "NeptuneLogger": (("neptune",), "pip install neptune"),
}

_warned: set[str] = set()


def _module_available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _class_paths(logger_config: Any) -> list[str]:
    """The class paths a parsed `trainer.logger` value names (one, a list, or none for true/false/null)."""
    items = logger_config if isinstance(logger_config, list | tuple) else [logger_config]
    paths = []
    for item in items:
        path = item.get("class_path") if hasattr(item, "get") else getattr(item, "class_path", None)
        if isinstance(path, str):
            paths.append(path)
    return paths


def check_logger_packages(logger_config: Any, setting: str = "trainer.logger") -> None:
    """Refuse a logger whose package is not installed, naming the package and the command that installs it."""
    for path in _class_paths(logger_config):
        name = path.rsplit(".", 1)[-1]
        if name not in LOGGER_PACKAGES:
            continue
        modules, command = LOGGER_PACKAGES[name]
        if not any(_module_available(m) for m in modules):
            raise ModuleNotFoundError(
                f"{setting} is {path}, which needs the package `{modules[0]}`, and it is not installed. "
                f'Install it with `{command}` (or `pip install -e ".[loggers]"` for W&B and MLflow), '
                f"or choose another logger, e.g. --{setting} lightning.pytorch.loggers.CSVLogger"
            )


def logger_folder(logger: Logger) -> Path | None:
    """The folder a logger writes its run into, where it has one on this machine."""
    if isinstance(logger, DummyLogger):
        return None
    if isinstance(logger, MLFlowLogger):
        return Path(logger.save_dir) if logger.save_dir else None  # a `file:` store; None for a server
    for attribute in ("log_dir", "save_dir"):
        folder = getattr(logger, attribute, None)
        if folder:
            return Path(folder)
    return None


def check_run_folders(trainer: L.Trainer) -> None:
    """Refuse, before training, a run folder (each logger's, the checkpoints') that cannot be written."""
    folders: dict[Path, str] = {}
    for logger in trainer.loggers:
        folder = logger_folder(logger)
        if folder is not None:
            folders.setdefault(folder, f"{type(logger).__name__}'s run folder (trainer.logger.init_args.save_dir)")
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and getattr(checkpoint, "dirpath", None):
        folders.setdefault(Path(checkpoint.dirpath), "the checkpoint folder (ModelCheckpoint's dirpath)")
    for folder, what in folders.items():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".lit_ar_write_check"):
                pass
        except OSError as err:
            raise PermissionError(
                f"{what} {str(folder)!r} is not writable ({err.strerror or err}); nothing was trained. "
                "Choose a folder you can write, e.g. --trainer.logger.init_args.save_dir runs/my_run"
            ) from err


def _png_path(folder: Path, tag: str, step: int) -> Path:
    return folder / "images" / Path(*tag.split("/")) / f"step_{step:06d}.png"


def write_image(logger: Logger, tag: str, grid: torch.Tensor, step: int) -> None:
    """One (3, H, W) uint8 grid to one logger, in that logger's way (see the module's docstring)."""
    if isinstance(logger, DummyLogger):
        return
    hwc = np.ascontiguousarray(grid.permute(1, 2, 0).cpu().numpy())  # (H, W, 3) uint8
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image(tag, grid, global_step=step)
    elif isinstance(logger, WandbLogger):
        logger.log_image(key=tag, images=[hwc], step=step)
    elif isinstance(logger, MLFlowLogger):
        logger.experiment.log_image(logger.run_id, Image.fromarray(hwc), artifact_file=f"{tag}/step_{step:06d}.png")
    else:  # the CSV logger, and any other logger with a folder: PNG files in its run folder
        folder = logger_folder(logger)
        if folder is None:
            name = type(logger).__name__
            if name not in _warned:
                _warned.add(name)
                rank_zero_warn(f"{name} has no folder and no image API lit_ar knows: its runs get no image grids")
            return
        path = _png_path(folder, tag, step)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(hwc).save(path)


def log_image(trainer: L.Trainer, tag: str, grid: torch.Tensor) -> None:
    """One (3, H, W) uint8 grid to every logger of the trainer, at the trainer's global step."""
    for logger in trainer.loggers:
        write_image(logger, tag, grid, trainer.global_step)


def describe_run(trainer: L.Trainer) -> list[str]:
    """Lines that say where each logger's run is and how to look at it."""
    lines = []
    for logger in trainer.loggers:
        folder = logger_folder(logger)
        if isinstance(logger, TensorBoardLogger):
            lines.append(f"logs: {folder} (scalars and images: tensorboard --logdir {folder}, then open "
                         "http://localhost:6006)")  # fmt: skip
        elif isinstance(logger, WandbLogger):
            lines.append(f"logs: W&B run in {folder} (offline runs: wandb sync {folder}/wandb/offline-run-*)")
        elif isinstance(logger, MLFlowLogger):
            where = f"--backend-store-uri {logger._tracking_uri}" if getattr(logger, "_tracking_uri", None) else ""
            lines.append(f"logs: MLflow run {logger.run_id} (mlflow ui {where}; images are the run's artifacts)")
        elif isinstance(logger, CSVLogger):
            lines.append(f"logs: {folder}/metrics.csv, images in {folder}/images/")
        elif folder is not None:
            lines.append(f"logs: {folder}")
    if trainer.checkpoint_callback is not None and getattr(trainer.checkpoint_callback, "dirpath", None):
        lines.append(f"checkpoints: {trainer.checkpoint_callback.dirpath}")
    return lines
