"""The `lit_ar` command: a thin LightningCLI over every system and the one ImageDataModule."""

import lightning as L
from lightning.pytorch.cli import LightningCLI

from lit_ar.data.datamodule import ImageDataModule


class LitARCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # Shared values are typed once, on the data side, and reach the model through links.
        parser.link_arguments("data.image_size", "model.init_args.image_size")
        parser.link_arguments("data.channels", "model.init_args.channels")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")


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
