"""Pictures reach whichever logger a config names (TensorBoard, W&B offline, MLflow to a file store, CSV), with no
constant hp_metric and with throughput; a missing logger package and an unwritable run folder are refused by name."""

from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, checkpoint_for_config, run_dir_args

from lit_ar.cli import cli_main
from lit_ar.loggers import check_logger_packages, log_image

DEBUG_CLASSIFIER = str(CONFIGS / "debug" / "classifier.yaml")
FEW_STEPS = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "2"]


def tensorboard_tags(run_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator(str(run_dir)).Reload().Tags()


def fit_classifier(run_dir: Path, *logger_args: str) -> None:
    cli_main(["fit", "--config", DEBUG_CLASSIFIER, *run_dir_args(run_dir), *logger_args, *FEW_STEPS])


def test_tensorboard_gets_the_real_images_and_no_constant_hp_metric(tmp_path):
    fit_classifier(tmp_path)
    tags = tensorboard_tags(tmp_path)
    assert "data/real_images" in tags["images"]
    assert "hp_metric" not in tags["scalars"], "TensorBoard's constant hp_metric (-1) is off"


def test_a_config_can_still_ask_for_hp_metric(tmp_path):
    fit_classifier(tmp_path, "--trainer.logger.init_args.default_hp_metric", "true")
    assert "hp_metric" in tensorboard_tags(tmp_path)["scalars"]


def test_csv_logger_gets_png_files_in_its_run_folder(tmp_path):
    fit_classifier(tmp_path, "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
                   "--trainer.logger.save_dir", str(tmp_path), "--trainer.logger.name", "csv")  # fmt: skip
    run = tmp_path / "csv"  # the config's `version: ""` carries over: no version_N folder
    assert sorted(run.rglob("*.png")) == [run / "images" / "data" / "real_images" / "step_000000.png"]
    assert (run / "metrics.csv").is_file()


def test_wandb_offline_gets_the_images(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    try:
        wandb_args = ["--trainer.logger.save_dir", str(tmp_path), "--trainer.logger.project", "lit_ar_test"]
        fit_classifier(tmp_path, "--trainer.logger", "lightning.pytorch.loggers.WandbLogger", *wandb_args)
    finally:
        wandb.finish()
    pngs = list((tmp_path / "wandb").glob("offline-run-*/files/media/images/data/real_images_*.png"))
    assert len(pngs) == 1, sorted(p.name for p in (tmp_path / "wandb").rglob("*"))


def test_mlflow_file_store_gets_the_images_as_artifacts(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this to use a `file:` store
    store = tmp_path / "mlruns"
    fit_classifier(tmp_path, "--trainer.logger", "lightning.pytorch.loggers.MLFlowLogger",
                   "--trainer.logger.tracking_uri", f"file:{store}")  # fmt: skip
    pngs = list(store.glob("*/*/artifacts/data/real_images/step_000000.png"))
    assert len(pngs) == 1, sorted(str(p.relative_to(store)) for p in store.rglob("*.png"))


def test_reconstructions_and_sample_grids_reach_a_csv_logger(tmp_path, checkpoints_root):
    csv = ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp_path)]
    tokenizer = tmp_path / "tokenizer"
    cli_main(["fit", "--config", str(CONFIGS / "debug" / "tokenizer_vq.yaml"), *run_dir_args(tokenizer),
              *csv[:3], str(tokenizer), "--trainer.logger.name", "", *FEW_STEPS])  # fmt: skip
    assert list(tokenizer.rglob("images/val/reconstructions/step_000002.png"))
    generator = tmp_path / "generator"
    ckpt = checkpoint_for_config(CONFIGS / "debug" / "tokenizer_vq.yaml", checkpoints_root)
    cli_main(["fit", "--config", str(CONFIGS / "debug" / "causal.yaml"), *run_dir_args(generator), *csv[:3],
              str(generator), "--trainer.logger.name", "", "--model.init_args.tokenizer_ckpt", str(ckpt),
              "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
              "--trainer.callbacks+=lit_ar.callbacks.SampleGrid", "--trainer.callbacks.every_n_steps", "1",
              "--trainer.callbacks.per_class", "1"])  # fmt: skip
    grids = sorted(p.name for p in generator.rglob("images/samples/grid/*.png"))
    assert grids == ["step_000001.png", "step_000002.png"]


def test_throughput_logs_images_and_tokens_per_second(tmp_path, checkpoints_root):
    ckpt = checkpoint_for_config(CONFIGS / "debug" / "tokenizer_vq.yaml", checkpoints_root)
    cli_main(["fit", "--config", str(CONFIGS / "debug" / "causal.yaml"), *run_dir_args(tmp_path),
              "--model.init_args.tokenizer_ckpt", str(ckpt), "--trainer.max_steps", "6",
              "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "0",
              "--trainer.callbacks+=lit_ar.callbacks.ImageThroughput",
              "--trainer.callbacks.window_size", "2"])  # fmt: skip
    scalars = tensorboard_tags(tmp_path)["scalars"]
    assert {"train/device/samples_per_sec", "train/device/items_per_sec"} <= set(scalars), scalars


def test_log_image_writes_one_grid_to_every_logger(tmp_path):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    loggers = [TensorBoardLogger(tmp_path / "tb", name="", version=""), CSVLogger(tmp_path, name="csv")]
    trainer = L.Trainer(logger=loggers, enable_checkpointing=False, enable_progress_bar=False)
    log_image(trainer, "samples/grid", torch.zeros(3, 10, 12, dtype=torch.uint8))
    loggers[0].experiment.flush()
    assert "samples/grid" in tensorboard_tags(tmp_path / "tb")["images"]
    assert (tmp_path / "csv" / "version_0" / "images" / "samples" / "grid" / "step_000000.png").is_file()


def test_a_logger_whose_package_is_missing_is_named_with_its_pip_command(tmp_path):
    # comet_ml is not a dependency: the real case of a config naming a logger that is not installed
    pytest.importorskip("lightning")
    if __import__("importlib").util.find_spec("comet_ml") is not None:
        pytest.skip("comet_ml is installed here")
    with pytest.raises(
        ModuleNotFoundError, match=r"CometLogger, which needs the package `comet_ml`.*pip install comet-ml"
    ):
        cli_main(["fit", "--config", DEBUG_CLASSIFIER, *run_dir_args(tmp_path),
                  "--trainer.logger", "lightning.pytorch.loggers.CometLogger"])  # fmt: skip


def test_check_logger_packages_reads_one_logger_or_a_list():
    check_logger_packages({"class_path": "lightning.pytorch.loggers.CSVLogger"})
    check_logger_packages(False)
    with pytest.raises(ModuleNotFoundError, match="neptune"):
        check_logger_packages([{"class_path": "lightning.pytorch.loggers.CSVLogger"},
                               {"class_path": "lightning.pytorch.loggers.NeptuneLogger"}])  # fmt: skip


def test_an_unwritable_run_folder_is_refused_by_name_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    run_dir = blocker / "run"  # under a file: no user, root included, can make it
    with pytest.raises(PermissionError, match=rf"run folder .*{run_dir}.* is not writable.*nothing was trained"):
        fit_classifier(run_dir)


def test_the_predict_grid_shows_every_class_a_row_each():
    from lit_ar.callbacks import SampleWriter

    labels = torch.arange(10).repeat_interleave(50)  # class-major, as `lit_ar predict` writes them
    shown, per_row = SampleWriter(grid_images=100).grid_rows(labels)
    assert per_row == 10 and labels[shown].tolist() == torch.arange(10).repeat_interleave(10).tolist()
    shown, per_row = SampleWriter(grid_images=64).grid_rows(torch.zeros(500, dtype=torch.long))  # unconditional
    assert per_row is None and shown.tolist() == list(range(64))


def test_tensorboard_serves_the_image_tags_over_http(tmp_path, checkpoints_root):
    """As a user looks: `tensorboard --logdir` on a tokenizer's and a generator's runs, asked through its HTTP API."""
    import json
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    tokenizer, generator = tmp_path / "tokenizer", tmp_path / "generator"
    cli_main(["fit", "--config", str(CONFIGS / "debug" / "tokenizer_vq.yaml"), *run_dir_args(tokenizer), *FEW_STEPS])
    ckpt = checkpoint_for_config(CONFIGS / "debug" / "tokenizer_vq.yaml", checkpoints_root)
    cli_main(["fit", "--config", str(CONFIGS / "debug" / "causal.yaml"), *run_dir_args(generator),
              "--model.init_args.tokenizer_ckpt", str(ckpt), "--trainer.max_steps", "2",
              "--trainer.limit_val_batches", "0", "--trainer.callbacks+=lit_ar.callbacks.SampleGrid",
              "--trainer.callbacks.every_n_steps", "2", "--trainer.callbacks.per_class", "1"])  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path), "--port", str(port), "--host",
         "127.0.0.1", "--load_fast", "false"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        tags, deadline = {}, time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/images/tags", timeout=5) as r:
                    tags = json.load(r)
                if {"tokenizer", "generator"} <= set(tags) and tags["generator"]:
                    break
            except OSError:
                pass
            time.sleep(1)
        scalars = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", timeout=5))
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert "val/reconstructions" in tags.get("tokenizer", {}), tags
    assert "samples/grid" in tags.get("generator", {}), tags
    assert not any("hp_metric" in run_tags for run_tags in scalars.values()), scalars
