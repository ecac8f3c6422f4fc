"""`lit_ar test` / `lit_ar validate` on real generator families: configs/eval/generator_shapes.yaml stacked on a
family's debug config evaluates a checkpoint class-balanced in a (tiny, trained-here) classifier's features, on the
EMA weights when training averaged them."""

from pathlib import Path

import pytest
import torch
import yaml
from conftest import CONFIGS, checkpoint_for_config, run_dir_args, run_lit_ar

from lit_ar.cli import cli_main
from lit_ar.evaluation import EvaluationRecord
from lit_ar.metrics import file_sha256

EVAL_CONFIG = str(CONFIGS / "eval" / "generator_shapes.yaml")
E = "--model.init_args.evaluator.init_args."
# (debug generator config, the debug tokenizer config whose checkpoint it reads)
FAMILIES = {
    "causal": ("causal.yaml", "tokenizer_vq.yaml"),
    "masked": ("masked.yaml", "tokenizer_vq.yaml"),
    "scale": ("scale.yaml", "tokenizer_msvq.yaml"),
    "flow_mar": ("flow_mar.yaml", "tokenizer_kl.yaml"),
}


def evaluator_args(classifier_ckpt: Path, tmp_path: Path) -> list[str]:
    """The shipped evaluation settings, sized for the 16px debug data and its 32-feature classifier."""
    return [f"{E}extractor_ckpt", str(classifier_ckpt), f"{E}per_class", "4", f"{E}batch_size", "20",
            f"{E}reference_dir", str(tmp_path / "references"), f"{E}pr_num_samples", "100"]  # fmt: skip


def trained_with_ema(family: str, tmp_path: Path, checkpoints_root: Path) -> tuple[list[str], Path]:
    """3 training steps of a family's debug config with EMAWeightAveraging; returns its base args and last.ckpt."""
    config, tokenizer = FAMILIES[family]
    tok = checkpoint_for_config(CONFIGS / "debug" / tokenizer, checkpoints_root)  # initialised: enough to decode
    base = ["--config", str(CONFIGS / "debug" / config), "--model.init_args.tokenizer_ckpt", str(tok)]
    ema = {"class_path": "lightning.pytorch.callbacks.EMAWeightAveraging", "init_args": {"decay": 0.5}}
    cli_main(["fit", *base, *run_dir_args(tmp_path / "run"), "--trainer.max_steps", "3",
              "--trainer.limit_val_batches", "0", "--trainer.callbacks+", yaml.safe_dump(ema)])  # fmt: skip
    return base, tmp_path / "run" / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lit_ar_test_evaluates_a_generator_checkpoint_on_its_ema_weights(
    family, tmp_path, checkpoints_root, classifier_ckpt
):
    base, ckpt = trained_with_ema(family, tmp_path, checkpoints_root)
    cli = cli_main(["test", *base, "--config", EVAL_CONFIG, *run_dir_args(tmp_path / "run"),
                    *evaluator_args(classifier_ckpt, tmp_path), "--ckpt_path", str(ckpt)])  # fmt: skip
    # the record lands in the generator's run folder's eval/ sub-folder, next to the test's own config
    path = tmp_path / "run" / "eval" / "evaluation.json"
    record = EvaluationRecord.from_json(path)
    assert record == cli.model.evaluator.last_record and (tmp_path / "run" / "eval" / "config.yaml").is_file()
    assert record.num_samples == 40 and record.protocol["class_counts"] == [4] * 10, "class-balanced"
    assert record.protocol["per_class"] == 4 and record.protocol["num_classes"] == 10 and record.seed == 0
    assert record.checkpoint == {"path": str(ckpt), "sha256": file_sha256(ckpt)}
    # sampling: null in the eval config means the family's own predict_kwargs
    assert record.sampling == {**cli.model.hparams.predict_kwargs, "batch_size": 20}
    assert record.extractor.startswith("classifier:") and record.reference["count"] == 256
    assert record.reference["identity"]["split"] == "train" and record.reference["identity"]["image_size"] == 16
    assert set(record.metrics) == {"fid", "is_mean", "is_std", "precision", "recall", "class_accuracy"}
    assert record.metrics["fid"] > 0 and 0 <= record.metrics["class_accuracy"] <= 1
    assert float(cli.trainer.callback_metrics["test/fid"]) == pytest.approx(record.metrics["fid"])
    assert cli.trainer.num_test_batches == [1], "the test split only drives the loop: one batch of it is read"
    # EMA: Lightning's callback saves the averaged weights as the checkpoint's state_dict (the training weights
    # under current_model_state); `lit_ar test --ckpt_path` loads the former, so the samples are the EMA model's
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    state = cli.model.state_dict()
    differs = [k for k, v in saved["current_model_state"].items() if not torch.equal(v, saved["state_dict"][k])]
    assert differs, "3 steps at decay 0.5 leave the EMA and the training weights apart"
    for key in differs:
        assert torch.equal(state[key], saved["state_dict"][key]), key


def test_validate_logs_the_evaluation_next_to_the_loss_and_test_without_evaluator_explains(
    tmp_path, checkpoints_root, classifier_ckpt
):
    tok = checkpoint_for_config(CONFIGS / "debug" / "tokenizer_vq.yaml", checkpoints_root)
    ckpt = checkpoint_for_config(  # initialised weights
        CONFIGS / "debug" / "causal.yaml", checkpoints_root, extra=["--model.init_args.tokenizer_ckpt", str(tok)]
    )
    base = ["--config", str(CONFIGS / "debug" / "causal.yaml"), "--model.init_args.tokenizer_ckpt", str(tok),
            *run_dir_args(tmp_path / "run")]  # fmt: skip
    missing = (r"`lit_ar test` on a generator evaluates its samples, but model.init_args.evaluator is not set.*"
               r"configs/eval/generator_shapes.yaml.*\nmodel:\n  init_args:\n    evaluator:\n      class_path: "
               r"lit_ar.evaluation.GeneratorEvaluator")  # fmt: skip
    with pytest.raises(ValueError, match=missing):
        cli_main(["test", *base, "--ckpt_path", str(ckpt)])
    assert not (tmp_path / "references").exists()
    cli = cli_main(["validate", *base, "--config", EVAL_CONFIG, *run_dir_args(tmp_path / "run"),
                    *evaluator_args(classifier_ckpt, tmp_path), "--ckpt_path", str(ckpt)])  # fmt: skip
    metrics = cli.trainer.callback_metrics
    assert {"val/loss", "val/fid", "val/precision", "val/recall", "val/class_accuracy"} <= set(metrics)
    assert cli.model.evaluator.last_record.protocol["class_counts"] == [4] * 10
    # bad evaluation settings are refused before anything is sampled or the reference computed
    with pytest.raises(ValueError, match=r"model.init_args.evaluator.init_args.per_class: 20 samples is fewer than "
                       r"the 32 feature dimensions"):  # fmt: skip
        cli_main(["test", *base, "--config", EVAL_CONFIG, *run_dir_args(tmp_path / "bad"),
                  *evaluator_args(classifier_ckpt, tmp_path / "bad"), f"{E}per_class", "2",
                  "--ckpt_path", str(ckpt)])  # fmt: skip
    assert not (tmp_path / "bad" / "references").exists()


@pytest.mark.slow
def test_a_family_evaluated_on_two_processes_makes_the_same_samples_and_figures_as_on_one(
    tmp_path, checkpoints_root, classifier_ckpt
):
    """MAR draws its orders and its flow noise from the protocol's per-batch generators: 1 or 2 gloo processes
    make the same class-balanced samples (same digest) and the same metrics."""
    tok = checkpoint_for_config(CONFIGS / "debug" / "tokenizer_kl.yaml", checkpoints_root)
    tok_args = ["--model.init_args.tokenizer_ckpt", str(tok)]
    ckpt = checkpoint_for_config(CONFIGS / "debug" / "flow_mar.yaml", checkpoints_root, extra=tok_args)
    records = {}
    for world in (1, 2):
        run = tmp_path / f"w{world}"
        run_lit_ar(["test", "--config", str(CONFIGS / "debug" / "flow_mar.yaml"), "--config", EVAL_CONFIG, *tok_args,
                    *run_dir_args(run), *evaluator_args(classifier_ckpt, run), "--ckpt_path", str(ckpt),
                    "--trainer.accelerator", "cpu", "--trainer.devices", str(world)]
                   + (["--trainer.strategy", "ddp"] if world > 1 else []), timeout=300)  # fmt: skip
        records[world] = EvaluationRecord.from_json(run / "eval" / "evaluation.json")
    one, two = records[1], records[2]
    assert (one.protocol["world_size"], two.protocol["world_size"]) == (1, 2)
    assert one.protocol["class_counts"] == two.protocol["class_counts"] == [4] * 10
    assert one.samples["digest"] == two.samples["digest"], "the same samples on 1 and 2 processes"
    for name, value in one.metrics.items():
        assert two.metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name


def test_the_evaluator_setting_is_documented_in_every_family_help(capsys):
    for system in ("CausalARSystem", "MaskedARSystem", "ScaleARSystem", "FlowARSystem"):
        with pytest.raises(SystemExit):
            cli_main(["test", "--model.help", f"lit_ar.systems.{system}"])
        out = " ".join(capsys.readouterr().out.split())
        assert "The evaluation protocol `lit_ar test` runs" in out, system
