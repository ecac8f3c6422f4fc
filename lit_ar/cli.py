"""The `lit_ar` command: a thin LightningCLI over every system and the one ImageDataModule."""

import lightning as L
from lightning.pytorch.cli import LightningCLI

from lit_ar.checkpoints import SafeCheckpointIO
from lit_ar.data.datamodule import ImageDataModule

# Lightning types these Union[float, int, None]: jsonargparse tries the float first, so `limit_val_batches: 1` (a
# count of one batch) became 1.0, which Lightning reads as 100% of the batches.
BATCH_LIMITS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches")


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

    def _check_checkpoints_against_model(self) -> None:
        # `--ckpt_path` loads through the checkpoint plugin: let it refuse another family's or a misfitting checkpoint
        checkpoint_io = self.trainer.strategy.checkpoint_io
        if isinstance(checkpoint_io, SafeCheckpointIO):
            checkpoint_io.expect(self.model)

    def before_fit(self) -> None:
        self._check_checkpoints_against_model()
        # a generator resuming a run reads its weights from that checkpoint, not from its init_weights
        if hasattr(self.model, "resume_from"):
            self.model.resume_from = self.config.fit.get("ckpt_path")

    before_validate = before_test = before_predict = _check_checkpoints_against_model

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
