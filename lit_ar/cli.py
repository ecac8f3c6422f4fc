"""The `lit_ar` command: a thin LightningCLI over every system and the one ImageDataModule. Every Trainer it builds
has the always-on callbacks and checkpoint IO (`ALWAYS_ON_CALLBACKS`, SafeCheckpointIO), listed in a config or not."""

from typing import Any

import lightning as L
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import Strategy

from lit_ar.callbacks import ImageThroughput
from lit_ar.checkpoints import SafeCheckpointIO
from lit_ar.data.datamodule import ImageDataModule
from lit_ar.loggers import check_logger_packages, check_run_folders, describe_run
from lit_ar.reliability import ExactResume, NonFiniteGuard, Preemption

# Lightning types these Union[float, int, None]: jsonargparse tries the float first, so `limit_val_batches: 1` (a
# count of one batch) became 1.0, which Lightning reads as 100% of the batches.
BATCH_LIMITS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches")

# On every Trainer the CLI builds, so that no config can forget them: exact resume, a save on pre-emption and the
# non-finite guard (with SafeCheckpointIO, atomic and checked checkpoints). A config lists one only to change its
# settings (configs/debug/: `NonFiniteGuard` with `max_consecutive: 5`); then the config's is the one kept. The added
# Preemption only warns when no ModelCheckpoint saves `last.ckpt`: a config that asks for nothing must not fail.
# ImageThroughput logs images/s and tokens/s (Lightning's ThroughputMonitor) beside the losses.
ALWAYS_ON_CALLBACKS = {
    ExactResume: ExactResume,
    Preemption: lambda: Preemption(require_last_checkpoint=False),
    NonFiniteGuard: NonFiniteGuard,
    ImageThroughput: ImageThroughput,
}

# A TensorBoardLogger's constant `hp_metric` (-1) is off: the parser's default logger carries the setting, and a
# config naming the same class keeps it (jsonargparse merges its init_args over these) unless it sets it itself.
DEFAULT_LOGGER = {
    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
    "init_args": {"save_dir": ".", "name": "lightning_logs", "default_hp_metric": False},
}


def with_always_on_callbacks(callbacks: list[L.Callback], listed: list[L.Callback]) -> list[L.Callback]:
    """`callbacks` (the config's `trainer.callbacks`) and a default of each always-on class that neither they nor
    `listed` (callbacks the CLI adds from elsewhere) hold an instance of."""
    present = [*callbacks, *listed]
    missing = [make() for cls, make in ALWAYS_ON_CALLBACKS.items() if not any(isinstance(c, cls) for c in present)]
    return [*callbacks, *missing]


def with_checkpoint_io(plugins: list[Any], strategy: Any) -> list[Any]:
    """`plugins` (the config's `trainer.plugins`) and a SafeCheckpointIO, unless they or the strategy already choose
    a checkpoint IO (Lightning takes one only; a config's own, even another class, is its choice)."""
    if any(isinstance(p, CheckpointIO) for p in plugins):
        return plugins
    if isinstance(strategy, Strategy) and strategy._checkpoint_io is not None:
        return plugins
    return [*plugins, SafeCheckpointIO()]


def _as_list(value: Any) -> list[Any]:
    return [] if value is None else list(value) if isinstance(value, list | tuple) else [value]


class LitARCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        limits = {f"trainer.{name}" for name in BATCH_LIMITS}
        for action in parser._actions:  # an integer is a number of batches, a float a fraction (Lightning's meaning)
            if action.dest in limits:
                action._typehint = int | float | None  # tried in this order (tests/test_cli.py checks it)
        # Shared values are typed once, on the data side, and reach the model through links.
        parser.link_arguments("data.image_size", "model.init_args.image_size")
        parser.link_arguments("data.channels", "model.init_args.channels")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.set_defaults({"trainer.logger": DEFAULT_LOGGER})

    def instantiate_classes(self) -> None:
        # a logger whose package is missing is named, with its pip command, before anything is built
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_logger_packages(config.get("trainer", {}).get("logger"))
        super().instantiate_classes()

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The config's Trainer, with the always-on callbacks and SafeCheckpointIO it does not list itself."""
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        parser = self._parser(self.subcommand)
        # callbacks LightningCLI adds on its own (its callback arguments, `trainer_defaults`) count as listed
        listed = [cb for key in parser.callback_keys for cb in _as_list(self._get(self.config_init, key))]
        listed += _as_list(self.trainer_defaults.get("callbacks"))
        kwargs["callbacks"] = with_always_on_callbacks(_as_list(config.get("callbacks")), listed)
        kwargs["plugins"] = with_checkpoint_io(_as_list(config.get("plugins")), config.get("strategy"))
        return super().instantiate_trainer(**kwargs)

    def _check_checkpoints_against_model(self) -> None:
        # `--ckpt_path` loads through the checkpoint plugin: let it refuse another family's or a misfitting checkpoint
        checkpoint_io = self.trainer.strategy.checkpoint_io
        if isinstance(checkpoint_io, SafeCheckpointIO):
            checkpoint_io.expect(self.model)

    def before_fit(self) -> None:
        self._check_checkpoints_against_model()
        check_run_folders(self.trainer)  # an unwritable run folder fails now, not after the first epoch
        # a generator resuming a run reads its weights from that checkpoint, not from its init_weights
        if hasattr(self.model, "resume_from"):
            self.model.resume_from = self.config.fit.get("ckpt_path")

    before_validate = before_test = before_predict = _check_checkpoints_against_model

    def _say_where(self) -> None:
        if self.trainer.is_global_zero:
            print("\n".join(describe_run(self.trainer)), flush=True)

    after_fit = after_validate = after_test = after_predict = _say_where

    def _parse_ckpt_path(self) -> None:
        """Lightning merges the hyper-parameters saved in a `--ckpt_path` file over the config: it silently switches
        the model to the checkpoint's class and undoes `--model.*` overrides. lit_ar keeps the config as written and
        checks the checkpoint against it when loading (SafeCheckpointIO): another family's checkpoint, or one whose
        weights do not fit, is refused by name. Only a config without a model takes the checkpoint's."""
        subcommand = self.config.get("subcommand")
        if subcommand and self.config[subcommand].get("model") is None:
            super()._parse_ckpt_path()


def cli_main(args: list[str] | None = None, run: bool = True) -> LitARCLI:
    """Run `lit_ar fit|validate|test|predict --config ...`; `args` replaces sys.argv[1:] (for tutorials, tests)."""
    return LitARCLI(
        L.LightningModule,
        ImageDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )


def main() -> None:
    """Console-script entry point (`lit_ar ...`)."""
    cli_main()
