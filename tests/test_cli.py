"""The real CLI: every shipped config, --help, --print_config, fit, resume, and DDP against one process."""

from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    CONFIGS,
    REPO,
    checkpoint_for_config,
    config_for_run_path,
    configs_for_run_path,
    logged_scalars,
    merged_yaml,
    run_dir_args,
    run_lit_ar,
    stacked_configs,
)
from lightning.fabric.plugins import TorchCheckpointIO

from lit_ar.checkpoints import SafeCheckpointIO
from lit_ar.cli import ALWAYS_ON_CALLBACKS, cli_main
from lit_ar.reliability import NonFiniteGuard, Preemption

SHIPPED = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name != "trainer")
DEBUG_CLASSIFIER = str(CONFIGS / "debug" / "classifier.yaml")


def config_overrides(stack: list[Path], run_dir: Path, checkpoints_root: Path) -> list[str]:
    """Settings stacked configs need to instantiate in a test: their run folder, any checkpoint they depend on (a
    freshly initialised checkpoint of the configs that would have made it), and the samples an evaluation config
    reads."""
    merged = merged_yaml(stack)
    init_args, data = (merged.get("model") or {}).get("init_args") or {}, merged.get("data") or {}
    args = run_dir_args(run_dir)
    ckpts = {}
    for key, value in init_args.items():
        if key.endswith("_ckpt") and isinstance(value, str):
            ckpts[key] = checkpoint_for_config(configs_for_run_path(value), checkpoints_root)
            args += [f"--model.init_args.{key}", str(ckpts[key])]
    if data.get("token_cache"):  # a small cache of the same data, encoded by the tokenizer checkpoint above
        from lit_ar.data.datamodule import ImageDataModule
        from lit_ar.data.token_cache import write_token_cache

        small = {**data, "token_cache": None, "num_train": 8, "num_val": 4, "num_workers": 0}
        cache = write_token_cache(str(ckpts["tokenizer_ckpt"]), str(run_dir / "cache"), ImageDataModule(**small))
        args += ["--data.token_cache", str(cache)]
    if "samples_npz" in init_args:  # evaluation configs: an npz of samples
        import numpy as np

        size = data["image_size"]
        np.savez(run_dir / "samples.npz", images=np.zeros((4, size, size, 3), np.uint8))
        args += ["--model.init_args.samples_npz", str(run_dir / "samples.npz")]
    return args


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_pins_seed_and_run_folder_and_instantiates(path, tmp_path, checkpoints_root):
    stack = stacked_configs(path)
    raw = yaml.safe_load(stack[0].read_text())
    assert isinstance(raw["seed_everything"], int), "every shipped config pins an integer seed"
    parts, own = path.relative_to(CONFIGS).parts, yaml.safe_load(path.read_text())
    logger = ((own.get("trainer") or {}).get("logger") or {}).get("init_args")
    if len(parts) == 3 and logger is not None:  # a tier's run folder mirrors its overlay's path
        assert logger["save_dir"] == f"runs/{parts[0]}/{parts[1]}/{path.stem}", "the run folder mirrors the config"
    elif len(parts) < 3 and "class_path" in own["model"]:  # not an evaluation file (it keeps the generator's)
        assert logger["save_dir"].startswith("runs/") and logger["version"] == "", "every config pins its run folder"
    args = [arg for config in stack for arg in ("--config", str(config))]
    cli = cli_main([*args, *config_overrides(stack, tmp_path, checkpoints_root)], run=False)
    assert cli.model is not None and cli.datamodule is not None
    assert_always_on(cli.trainer)
    if path.parent.name == "eval":
        assert cli.model.evaluator is not None
    if len(parts) == 3:  # the overlay's settings win over its base's
        data = own.get("data") or {}
        assert all(cli.datamodule.hparams[key] == value for key, value in data.items() if key != "token_cache")
        model = (own.get("model") or {}).get("init_args") or {}
        assert all(cli.model.hparams[key] == value for key, value in model.items()
                   if not key.endswith("_ckpt") and key not in ("evaluator", "predict_kwargs"))  # fmt: skip
        # predict_kwargs is stored complete (the family's typed settings): the overlay's keys hold its values
        if "predict_kwargs" in model:
            sampling = cli.model.hparams.predict_kwargs
            assert all(sampling[key] == value for key, value in model["predict_kwargs"].items())


def assert_always_on(trainer) -> None:
    """SafeCheckpointIO and one of each always-on callback, whatever the config lists."""
    assert isinstance(trainer.strategy.checkpoint_io, SafeCheckpointIO)
    for cls in ALWAYS_ON_CALLBACKS:
        assert sum(isinstance(cb, cls) for cb in trainer.callbacks) == 1, f"one {cls.__name__} on the Trainer"


def debug_classifier_with(tmp_path: Path, callbacks: list[dict], plugins: list | None = None) -> str:
    """The debug classifier config with these `trainer.callbacks` and `trainer.plugins` only."""
    config = yaml.safe_load(Path(DEBUG_CLASSIFIER).read_text())
    config["trainer"].pop("plugins", None)
    config["trainer"]["callbacks"] = callbacks
    if plugins is not None:
        config["trainer"]["plugins"] = plugins
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_a_config_that_lists_none_gets_the_always_on_callbacks_and_checkpoint_io(tmp_path):
    config = debug_classifier_with(tmp_path, callbacks=[])
    cli = cli_main(["--config", config, *run_dir_args(tmp_path)], run=False)
    assert_always_on(cli.trainer)
    (preemption,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, Preemption)]
    assert preemption.signals == ["SIGUSR1"] and not preemption.require_last_checkpoint
    (guard,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, NonFiniteGuard)]
    assert guard.max_consecutive == 10, "the default settings"
    # and it trains: without a ModelCheckpoint that saves last.ckpt the added Preemption warns, it does not refuse
    with pytest.warns(UserWarning, match=r"Preemption: no ModelCheckpoint .* has `save_last: true`"):
        cli = cli_main(["fit", "--config", config, *run_dir_args(tmp_path), "--trainer.max_steps", "2",
                        "--trainer.limit_val_batches", "0"])  # fmt: skip
    assert cli.trainer.global_step == 2


def test_a_config_that_lists_an_always_on_class_keeps_its_own(tmp_path):
    guard = {"class_path": "lit_ar.reliability.NonFiniteGuard", "init_args": {"max_consecutive": 5}}
    io = {"class_path": "lit_ar.checkpoints.SafeCheckpointIO", "init_args": {"verify_crc": False}}
    cli = cli_main(["--config", debug_classifier_with(tmp_path, [guard], [io]), *run_dir_args(tmp_path)], run=False)
    assert_always_on(cli.trainer)
    (kept,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, NonFiniteGuard)]
    assert kept.max_consecutive == 5
    assert cli.trainer.strategy.checkpoint_io.verify_crc is False
    # another checkpoint IO is the config's choice too: Lightning takes one only
    plain = {"class_path": "lightning.fabric.plugins.TorchCheckpointIO"}
    cli = cli_main(["--config", debug_classifier_with(tmp_path, [], [plain]), *run_dir_args(tmp_path)], run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is TorchCheckpointIO


def test_print_config_parses_back(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", DEBUG_CLASSIFIER, "--model.init_args.width", "24", "--print_config"])
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    with pytest.raises(SystemExit):  # the printed config parses back to itself
        cli_main(["fit", "--config", str(printed), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out) == yaml.safe_load(printed.read_text())
    fit_config = yaml.safe_load(printed.read_text())
    for fit_option in ("ckpt_path", "weights_only"):  # `fit` options, not model or data settings
        fit_config.pop(fit_option, None)
    (tmp_path / "instantiate.yaml").write_text(yaml.safe_dump(fit_config))
    cli = cli_main(["--config", str(tmp_path / "instantiate.yaml"), *run_dir_args(tmp_path)], run=False)
    assert cli.model.hparams.width == 24 and cli.model.hparams.num_classes == 10


def test_help_shows_argument_docstrings(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # undo the help formatter's line wrapping
    assert "A built-in offline dataset" in out and "Batch size per device" in out
    with pytest.raises(SystemExit):
        cli_main(["fit", "--model.help", "lit_ar.systems.ClassifierSystem"])
    assert "Width of the penultimate features" in " ".join(capsys.readouterr().out.split())


def test_links_carry_data_settings_into_the_model(tmp_path):
    cli = cli_main(
        ["--config", DEBUG_CLASSIFIER, *run_dir_args(tmp_path), "--data.dataset", "digits", "--data.channels", "1"],
        run=False,
    )
    assert cli.model.hparams.channels == 1 and cli.model.hparams.num_classes == 10
    assert cli.model.hparams.image_size == cli.datamodule.hparams.image_size == 16


def test_fast_dev_run(tmp_path):
    # fast_dev_run replaces the logger, so its checkpoints go to the root dir: keep it out of the repository
    cli = cli_main(["fit", "--config", DEBUG_CLASSIFIER, *run_dir_args(tmp_path), "--trainer.fast_dev_run", "2",
                    "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip
    assert cli.trainer.global_step == 2


def test_fit_logs_to_tensorboard(tmp_path):
    cli_main(
        ["fit", "--config", DEBUG_CLASSIFIER, *run_dir_args(tmp_path), "--trainer.max_steps", "2",
         "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "2"]
    )  # fmt: skip
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path)).Reload()
    assert "train/loss" in events.Tags()["scalars"]
    assert "data/real_images" in events.Tags()["images"] and "val/acc" in events.Tags()["scalars"]


@pytest.mark.parametrize("value, expected", [("1", 1), ("3", 3), ("0.5", 0.5), ("1.0", 1.0)])
def test_batch_limits_keep_integers_as_counts(tmp_path, value, expected):
    # Lightning types limit_*_batches Union[float, int]: parsed float-first, `1` (one batch) became 1.0 (100%)
    (tmp_path / "limits.yaml").write_text(f"trainer:\n  limit_test_batches: {value}\n")
    cli = cli_main(["--config", DEBUG_CLASSIFIER, *run_dir_args(tmp_path), "--config", str(tmp_path / "limits.yaml"),
                    "--trainer.limit_val_batches", value], run=False)  # fmt: skip
    for limit in (cli.trainer.limit_val_batches, cli.trainer.limit_test_batches):
        assert limit == expected and type(limit) is type(expected)


def test_image_size_below_the_model_minimum_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"model.image_size=2 is below .* at least 4 pixels"):
        cli_main(["--config", DEBUG_CLASSIFIER, *run_dir_args(tmp_path), "--data.image_size", "2"], run=False)


def test_resume_from_last_continues_the_same_run(tmp_path):
    args = ["fit", "--config", DEBUG_CLASSIFIER, *run_dir_args(tmp_path)]
    cli_main([*args, "--trainer.max_steps", "6"])
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True, map_location="cpu")["global_step"] == 6
    cli_main([*args, "--trainer.max_steps", "10", "--ckpt_path", "last"])
    assert torch.load(last, weights_only=True, map_location="cpu")["global_step"] == 10
    assert list(tmp_path.glob("version_*")) == [], "resume writes into the pinned run folder"


@pytest.mark.slow
def test_ddp_two_processes_agree_with_one(tmp_path):
    """Two gloo processes at batch 4 each see the same samples as one process at batch 8: same loss curve."""
    common = [
        "fit", "--config", DEBUG_CLASSIFIER, "--trainer.max_steps", "8", "--data.shuffle", "false",
        "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "0",
    ]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    run_lit_ar([*common, *run_dir_args(one), "--data.batch_size", "8", "--trainer.devices", "1"])
    run_lit_ar(
        [*common, *run_dir_args(two), "--data.batch_size", "4", "--trainer.devices", "2",
         "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"]
    )  # fmt: skip
    loss1, loss2 = logged_scalars(one, "train/loss"), logged_scalars(two, "train/loss")
    assert len(loss1) == len(loss2) == 8
    assert sum(loss1[-3:]) < sum(loss1[:3]), f"the loss falls: {loss1}"
    torch.testing.assert_close(torch.tensor(loss2), torch.tensor(loss1), rtol=2e-3, atol=1e-5)


def test_readme_commands_name_real_configs():
    readme = (REPO / "README.md").read_text()
    for token in readme.split():
        if token.startswith("configs/") and token.endswith(".yaml"):
            assert (REPO / token).is_file(), f"README names a config that does not exist: {token}"


def test_checkpoint_for_config_builds_loadable_checkpoints(checkpoints_root):
    from lit_ar.systems import ClassifierSystem

    config = config_for_run_path("runs/debug/classifier/checkpoints/last.ckpt")
    assert config == CONFIGS / "debug" / "classifier.yaml"
    ckpt = checkpoint_for_config(config, checkpoints_root)
    model = ClassifierSystem.load_from_checkpoint(ckpt, weights_only=True)
    assert model.hparams.image_size == 16 and model.hparams.num_classes == 10


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_step_based_validation_is_not_tied_to_epochs(path):
    """An integer val_check_interval larger than an epoch makes Lightning refuse to fit unless validation is
    counted in steps across epochs (check_val_every_n_epoch: null)."""
    trainer = merged_yaml(stacked_configs(path))["trainer"]  # a tier's overlay as stacked on its base
    if isinstance(trainer.get("val_check_interval"), int) and trainer["val_check_interval"] > 1:
        assert "check_val_every_n_epoch" in trainer and trainer["check_val_every_n_epoch"] is None


def test_a_misspelt_sampling_setting_is_refused_when_the_config_is_parsed(capsys):
    """predict_kwargs is the family's typed settings: `--print_config` rejects a key the method does not take."""
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(CONFIGS / "debug" / "masked.yaml"), "--model.init_args.predict_kwargs",
                  "{stpes: 4}", "--print_config"])  # fmt: skip
    assert "stpes" in capsys.readouterr().err
