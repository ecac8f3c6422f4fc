"""The evaluation protocol: balanced labels, rank split, reference cache, refusals, JSON record, CLI, DDP, callback.

Generators are played by `eval_doubles.ShapesGenerator` (real `shapes` images drawn with the given generator), a
test double that exercises the protocol and the callback mechanics exactly as a generator family would.
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import CONFIGS, REPO, run_dir_args, run_lit_ar

from lit_ar.cli import cli_main
from lit_ar.data.datamodule import ImageDataModule
from lit_ar.evaluation import (
    EvaluationRecord,
    GeneratorEvaluator,
    ReferenceStats,
    balanced_labels,
    batch_seed,
    gather_by_index,
    rank_batches,
    write_split_npz,
)
from lit_ar.metrics import file_sha256
from lit_ar.systems.evaluation import NpzArray, open_samples_npz

TESTS = Path(__file__).resolve().parent
NPZ_CONFIG = str(CONFIGS / "eval" / "npz_shapes.yaml")
DATA_16PX = ["--data.image_size", "16", "--data.num_train", "256", "--data.num_val", "64"]


def generator_config(tmp_path: Path, ckpt: Path, name: str = "run", **evaluator) -> Path:
    """A `lit_ar test` config: the test-double generator holding a GeneratorEvaluator, on 16px shapes."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "precision": "32-true", "accelerator": "cpu", "limit_test_batches": 1, "enable_progress_bar": False,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(tmp_path / name), "name": "", "version": ""}},
        },
        "model": {
            "class_path": "eval_doubles.ShapesGenerator",
            "init_args": {"evaluator": {"class_path": "lit_ar.evaluation.GeneratorEvaluator", "init_args": {
                "extractor_ckpt": str(ckpt), "per_class": 4, "batch_size": 8,
                "reference_dir": str(tmp_path / "references"), **evaluator}}},
        },
        "data": {"dataset": "shapes", "image_size": 16, "num_train": 256, "num_val": 64, "batch_size": 16},
    }  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    tmp_path.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def test_balanced_labels_have_exactly_n_per_class_in_a_seeded_order():
    labels = balanced_labels(10, 7, seed=3)
    assert torch.bincount(labels).tolist() == [7] * 10
    assert torch.equal(labels, balanced_labels(10, 7, seed=3))
    assert not torch.equal(labels, balanced_labels(10, 7, seed=4))
    assert not torch.equal(labels, labels.sort().values), "classes are mixed across batches"


@pytest.mark.parametrize("total,batch_size", [(40, 8), (37, 8), (5, 8), (64, 1)])
def test_rank_batches_cover_every_index_once_with_the_same_batches_on_any_number_of_ranks(total, batch_size):
    one = rank_batches(total, batch_size, 0, 1)
    for world in (2, 3, 8):
        shards = [rank_batches(total, batch_size, r, world) for r in range(world)]
        indices = sorted(i for shard in shards for s, e in shard for i in range(s, e))
        assert indices == list(range(total)), "no gap, no duplicate"
        assert sorted(b for shard in shards for b in shard) == one, "every sample is made in the same batch"
    assert batch_seed(0, 8) != batch_seed(0, 16) and batch_seed(0, 8) != batch_seed(1, 8)


def test_gather_refuses_gaps_and_duplicates():
    out = gather_by_index(torch.tensor([2, 0, 1]), 3, x=torch.tensor([20, 0, 10]))
    assert out["x"].tolist() == [0, 10, 20]
    with pytest.raises(RuntimeError, match="not each of the 3 global indices once"):
        gather_by_index(torch.tensor([0, 0, 1]), 3, x=torch.zeros(3))


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_samples_are_read_in_row_ranges_and_checked(tmp_path, compressed):
    images = np.random.default_rng(0).integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
    path = str(tmp_path / "s.npz")
    (np.savez_compressed if compressed else np.savez)(path, images=images, labels=np.arange(10))
    imgs, labels = open_samples_npz(path, 16, 3, "model.init_args.samples_npz")
    np.testing.assert_array_equal(imgs.read(3, 7), images[3:7])
    assert labels.read(8, 10).tolist() == [8, 9]
    with pytest.raises(ValueError, match=r"holds 16x16x3 images but .* set data.image_size=16 and data.channels=3"):
        open_samples_npz(path, 32, 3, "model.init_args.samples_npz")
    np.savez(tmp_path / "f.npz", images=images.astype(np.float32))
    with pytest.raises(ValueError, match=r"model.init_args.samples_npz=.*must be \(N, H, W, C\) uint8"):
        open_samples_npz(str(tmp_path / "f.npz"), 16, 3, "model.init_args.samples_npz")
    np.savez(tmp_path / "k.npz", pictures=images)
    with pytest.raises(ValueError, match=r"has no `images` array .* it has \['pictures'\]"):
        open_samples_npz(str(tmp_path / "k.npz"), 16, 3, "model.init_args.samples_npz")
    np.savez(tmp_path / "adm.npz", images)  # ADM's layout: arr_0
    assert NpzArray(str(tmp_path / "adm.npz"), "arr_0").shape == (10, 16, 16, 3)
    assert open_samples_npz(str(tmp_path / "adm.npz"), 16, 3, "x")[1] is None


def test_protocol_settings_are_refused_before_any_work(tmp_path, classifier_ckpt):
    p = "model.init_args.evaluator.init_args."
    with pytest.raises(ValueError, match=rf"set exactly one of {p}per_class .* and {p}num_samples"):
        GeneratorEvaluator(extractor_ckpt=str(classifier_ckpt), per_class=None)
    with pytest.raises(ValueError, match=rf"{p}extractor='vgg' is not a feature extractor"):
        GeneratorEvaluator(extractor="vgg")
    ev = GeneratorEvaluator(extractor_ckpt=str(classifier_ckpt), per_class=5)
    with pytest.raises(ValueError, match=rf"{p}per_class=5 asks for class-balanced sampling, but the model is "
                       r"unconditional \(num_classes=1\)"):  # fmt: skip
        ev.labels(1)
    ev = GeneratorEvaluator(extractor_ckpt=str(classifier_ckpt), per_class=None, num_samples=100)
    assert ev.labels(1).tolist() == [0] * 100
    with pytest.raises(ValueError, match=rf"{p}num_samples=100 draws no labels, but the model has num_classes=10"):
        ev.labels(10)
    # 10 classes x 2 < 32 feature dimensions: refused at test start, before the reference or any sample is made
    config = generator_config(tmp_path, classifier_ckpt, per_class=2)
    with pytest.raises(ValueError, match=rf"{p}per_class: 20 samples is fewer than the 32 feature dimensions .* "
                       rf"FID ill-conditioned .* set {p}force=true"):  # fmt: skip
        cli_main(["test", "--config", str(config)])
    assert not (tmp_path / "references").exists()
    # a missing extractor file fails at test start, naming the setting
    missing = generator_config(tmp_path, "/missing.ckpt", name="missing")
    with pytest.raises(FileNotFoundError, match=rf"{p}extractor_ckpt='/missing.ckpt': no such file"):
        cli_main(["test", "--config", str(missing)])
    cli = cli_main(["test", "--config", str(config), "--model.init_args.evaluator.init_args.force", "true"])
    assert cli.model.evaluator.last_record.num_samples == 20


def test_generator_evaluation_record_round_trips_reference_is_reused_and_mismatch_refused(tmp_path, classifier_ckpt):
    cli = cli_main(["test", "--config", str(generator_config(tmp_path, classifier_ckpt, sampling={"noise": 0.0}))])
    record = cli.model.evaluator.last_record
    assert EvaluationRecord.from_json(tmp_path / "run" / "evaluation.json") == record
    assert record.protocol["class_counts"] == [4] * 10 and record.num_samples == 40 and record.seed == 0
    assert record.sampling == {"noise": 0.0, "batch_size": 8} and record.extractor.startswith("classifier:")
    assert record.reference["identity"]["split"] == "train" and record.reference["count"] == 256
    assert set(record.metrics) == {"fid", "is_mean", "is_std", "precision", "recall", "class_accuracy"}
    assert cli.trainer.callback_metrics["test/fid"] == pytest.approx(record.metrics["fid"])
    reference = Path(record.reference["path"])
    mtime = reference.stat().st_mtime_ns
    # A second evaluation (noisier samples) reuses the cached reference file; the noise raises the FID.
    noisy = cli_main(["test", "--config", str(generator_config(tmp_path, classifier_ckpt, sampling={"noise": 0.5}))])
    noisy_record = noisy.model.evaluator.last_record
    assert reference.stat().st_mtime_ns == mtime and noisy_record.reference == record.reference
    assert noisy_record.metrics["fid"] > record.metrics["fid"] and noisy_record.samples != record.samples
    # That (training-split) reference named explicitly for a validation-split evaluation: refused, naming both
    mismatch = generator_config(tmp_path, classifier_ckpt, reference_split="validation", reference_path=str(reference))
    with pytest.raises(ValueError, match=r"reference_path='.*\.pt' is a reference for .*\"split\": \"train\""
                       r".* but this evaluation needs .*\"split\": \"validation\".* "
                       r"differ in split: 'train' != 'validation'"):  # fmt: skip
        cli_main(["test", "--config", str(mismatch)])
    assert ReferenceStats.load(reference).identity == record.reference["identity"]


def test_npz_evaluation_through_the_cli_matches_the_generator_evaluation(tmp_path, classifier_ckpt):
    """`lit_ar test` with NpzEvaluator on the very samples the GeneratorEvaluator made: same digest, same metrics."""
    gen = cli_main(["test", "--config", str(generator_config(tmp_path, classifier_ckpt))])
    ev = gen.model.evaluator
    labels = balanced_labels(10, 4, seed=0)
    images = []
    for start, end in rank_batches(40, 8, 0, 1):  # the protocol's batches and generators, by hand
        generator = torch.Generator().manual_seed(batch_seed(0, start))
        images.append(gen.model.sample(labels[start:end], generator=generator))
    uint8 = ((torch.cat(images) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "samples.npz", images=uint8, labels=labels.numpy())

    def npz_test(samples: str):
        return cli_main(
            ["test", "--config", NPZ_CONFIG, *run_dir_args(tmp_path / "npz"), *DATA_16PX,
             "--model.init_args.samples_npz", samples, "--model.init_args.extractor_ckpt", str(classifier_ckpt),
             "--model.init_args.reference_dir", str(tmp_path / "references"), "--model.init_args.eval_batch_size", "8",
             "--data.batch_size", "8"]
        )  # fmt: skip

    cli = npz_test(str(tmp_path / "samples.npz"))
    record = EvaluationRecord.from_json(tmp_path / "npz" / "evaluation.json")
    assert record == cli.model.last_record and record.samples["source"] == "npz"
    assert record.samples["digest"] == ev.last_record.samples["digest"], "the same samples"
    assert record.reference == ev.last_record.reference, "the same cached reference"
    for name, value in ev.last_record.metrics.items():
        assert record.metrics[name] == pytest.approx(value, rel=1e-6, abs=1e-9), name
    assert record.protocol["class_balanced"] and cli.trainer.callback_metrics["test/fid"] >= 0
    assert cli.trainer.num_test_batches == [1], "one batch of the test split drives the loop, not all of it"
    # The real-vs-real floor: the validation split as samples against the training reference; noise raises it
    data = ImageDataModule(dataset="shapes", image_size=16, num_train=256, num_val=64)
    assert write_split_npz(data, "validation", tmp_path / "val.npz") == 64
    floor = npz_test(str(tmp_path / "val.npz")).model.last_record
    assert floor.protocol["class_counts"] == [7, 7, 7, 7, 6, 6, 6, 6, 6, 6] and not floor.protocol["class_balanced"]
    val = np.load(tmp_path / "val.npz")["images"]
    noisy = np.clip(val + np.random.default_rng(0).normal(0, 60, val.shape), 0, 255).astype(np.uint8)
    np.savez(tmp_path / "noisy.npz", images=noisy)
    noisy_record = npz_test(str(tmp_path / "noisy.npz")).model.last_record
    assert noisy_record.metrics["fid"] > floor.metrics["fid"] and noisy_record.metrics["class_accuracy"] is None
    np.savez(tmp_path / "bad.npz", images=noisy, labels=np.full(64, 10))
    with pytest.raises(ValueError, match=r"has labels outside \[0, 10\) \(data.num_classes=10\): \[10\]"):
        npz_test(str(tmp_path / "bad.npz"))


@pytest.mark.slow
def test_two_processes_make_the_same_samples_and_metrics_as_one(tmp_path, classifier_ckpt, monkeypatch):
    """Class-balanced sampling on 1 and on 2 gloo processes: exactly N per class, the same samples, same figures."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    records = {}
    for world in (1, 2):
        # 40 samples in 5 batches of 8: ranks get 3 and 2 batches (uneven); each process computes its own reference
        config = generator_config(tmp_path / f"w{world}", classifier_ckpt, sampling={"noise": 0.3})
        run_lit_ar(["test", "--config", str(config), "--trainer.devices", str(world)]
                   + (["--trainer.strategy", "ddp"] if world > 1 else []), cwd=REPO, timeout=300)  # fmt: skip
        records[world] = EvaluationRecord.from_json(tmp_path / f"w{world}" / "run" / "evaluation.json")
    one, two = records[1], records[2]
    assert (one.protocol["world_size"], two.protocol["world_size"]) == (1, 2)
    assert one.protocol["class_counts"] == two.protocol["class_counts"] == [4] * 10
    assert one.samples["digest"] == two.samples["digest"], "the same samples on 1 and 2 processes"
    ref1, ref2 = (ReferenceStats.load(Path(r.reference["path"])) for r in (one, two))
    torch.testing.assert_close(ref2.mu, ref1.mu)
    torch.testing.assert_close(ref2.sigma, ref1.sigma)
    for name, value in one.metrics.items():
        assert two.metrics[name] == pytest.approx(value, rel=1e-6, abs=1e-9), name


def test_fid_callback_logs_val_fid_sampling_with_the_ema_weights(tmp_path, classifier_ckpt):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = generator_config(tmp_path, classifier_ckpt)
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.EMAWeightAveraging", "init_args": {"decay": 0.5}},
        {"class_path": "lit_ar.callbacks.FIDCallback", "init_args": {
            "every_n_steps": 2, "extractor_ckpt": str(classifier_ckpt), "per_class": 4, "batch_size": 20,
            "reference_dir": str(tmp_path / "references")}},
    ]  # fmt: skip
    cli = cli_main(["fit", "--config", str(config), "--trainer.max_steps", "4", "--trainer.limit_val_batches", "0",
                    "--trainer.callbacks", yaml.safe_dump(callbacks)])  # fmt: skip
    fid_cb = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "FIDCallback")
    assert [step for step, _ in fid_cb.history] == [2, 4]
    assert all(set(m) >= {"val/fid", "val/precision", "val/recall", "val/class_accuracy"} for _, m in fid_cb.history)
    events = EventAccumulator(str(tmp_path / "run")).Reload()
    assert [e.step for e in events.Scalars("val/fid")] == [2, 4]
    assert float(cli.trainer.callback_metrics["val/fid"]) == pytest.approx(fid_cb.history[-1][1]["val/fid"])
    model = cli.model
    # SGD on scale^2 at lr 0.25 halves `scale` each step: training went on with the current weights ...
    assert model.step_scales == [1.0, 0.5, 0.25, 0.125]
    # ... while the samples used the EMA (decay 0.5, first update copies): after step 2 it is 0.375, after 4 0.15625
    assert model.sampled_scales == [0.375] * 2 + [0.15625] * 2  # 40 samples in batches of 20, twice
    # `lit_ar test --ckpt_path` on that training run: the record names the checkpoint by path and content hash
    (ckpt,) = (tmp_path / "run" / "checkpoints").glob("*.ckpt")
    tested = cli_main(["test", "--config", str(config), "--ckpt_path", str(ckpt)])
    assert tested.model.evaluator.last_record.checkpoint == {"path": str(ckpt), "sha256": file_sha256(ckpt)}
    assert float(tested.model.scale.detach()) == 0.15625, "the checkpoint holds the EMA weights"


def test_evaluation_settings_are_documented_in_help(capsys):
    with pytest.raises(SystemExit):
        cli_main(["test", "--model.help", "lit_ar.systems.evaluation.NpzEvaluator"])
    assert "ADM's `arr_0`/`arr_1` layout is read too" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        cli_main(["fit", "--trainer.callbacks.help", "lit_ar.callbacks.FIDCallback"])
    assert "Sample with the weights of an active WeightAveraging" in " ".join(capsys.readouterr().out.split())
