"""Exact mid-epoch resume, pre-emption by a real signal, atomic checkpoints, and the non-finite guard."""

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    CONFIGS,
    REPO,
    checkpoint_for_config,
    config_for_run_path,
    merged_yaml,
    run_dir_args,
    stacked_configs,
)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_ar.checkpoints import SafeCheckpointIO, atomic_save, load_checkpoint, load_system
from lit_ar.cli import ALWAYS_ON_CALLBACKS, cli_main
from lit_ar.data import ImageDataModule
from lit_ar.data.resumable import ResumableDataLoader, ResumableSampler
from lit_ar.reliability import NonFiniteGuard, NonFiniteLossError, check_finite
from lit_ar.systems import ClassifierSystem

DEBUG_CLASSIFIER = CONFIGS / "debug" / "classifier.yaml"
TESTS = Path(__file__).resolve().parent


def callback(class_path: str, **init_args) -> str:
    """A `--trainer.callbacks+=` value appending one callback to the config's list."""
    return "--trainer.callbacks+=" + json.dumps({"class_path": class_path, "init_args": init_args})


def scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of every scalar logged in a run folder (all its event files, in order)."""
    events = EventAccumulator(str(run_dir)).Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


# The lead extends this list with the tokenizer and causal debug configs: (config, step to interrupt after,
# total steps, extra CLI arguments). The interruption must fall inside an epoch (the test checks it does).
RESUME_CASES = [
    pytest.param(
        DEBUG_CLASSIFIER, 5, 12,
        ["--data.num_train", "128", "--trainer.limit_val_batches", "2", "--trainer.num_sanity_val_steps", "0",
         "--data.crop", "random", "--data.resize_scale", "1.25", "--data.hflip", "true", "--data.num_workers", "1",
         callback("lightning.pytorch.callbacks.EMAWeightAveraging", decay=0.9)],
        id="debug/classifier+augment+workers+ema",
    ),
    # "@tokenizer_ckpt" stands for a freshly initialised checkpoint of the tokenizer config the generator names
    pytest.param(CONFIGS / "debug" / "causal.yaml", 5, 12,
                 ["--model.init_args.tokenizer_ckpt", "@tokenizer_ckpt", "--data.num_train", "128",
                  "--trainer.limit_val_batches", "2", "--trainer.num_sanity_val_steps", "0"],
                 id="debug/causal"),
    # manual optimisation of autoencoder and discriminator, dead-code restarts every 4 steps, the codebook-usage
    # window (8 steps); interrupted before the discriminator starts (step 10), then after it and the window
    *[pytest.param(CONFIGS / "debug" / "tokenizer_vq.yaml", stop, 20,
                   ["--data.num_train", "128", "--trainer.limit_val_batches", "2", "--trainer.num_sanity_val_steps",
                    "0", "--model.init_args.disc_start", "10", "--model.init_args.dead_code_steps", "4"],
                   id=f"debug/tokenizer_vq-stop{stop}") for stop in (6, 11)],
    pytest.param(CONFIGS / "debug" / "causal.yaml", 5, 12,
                 ["--model.init_args.tokenizer_ckpt", "@tokenizer_ckpt", "--data.num_train", "128",
                  "--trainer.limit_val_batches", "2", "--trainer.num_sanity_val_steps", "0",
                  callback("lit_ar.ema.WarmupEMA", decay=0.9)],
                 id="debug/causal+ema"),
]  # fmt: skip


# What ImageThroughput (Lightning's ThroughputMonitor) logs beside the losses: elapsed time, counts and rates
THROUGHPUT = {"time", "batches", "samples", "lengths", "batches_per_sec", "samples_per_sec", "items_per_sec",
              "flops_per_sec", "mfu"}  # fmt: skip


def is_throughput(tag: str) -> bool:
    stage, _, name = tag.partition("/")
    return stage in ("train", "validate") and (name in THROUGHPUT or name.startswith("device/"))


@pytest.mark.parametrize("config,stop,total,extra", RESUME_CASES)
def test_resume_mid_epoch_equals_the_uninterrupted_run(config, stop, total, extra, tmp_path, checkpoints_root):
    """Pre-empted by a real SIGUSR1 after step `stop`, resumed with `--ckpt_path last`: every logged training
    scalar (loss, RNG probes) of the remaining steps, the validation scalars and the final weights (current and EMA)
    and optimizer state are bitwise those of the run that was never interrupted."""
    if "@tokenizer_ckpt" in extra:
        named = yaml.safe_load(Path(config).read_text())["model"]["init_args"]["tokenizer_ckpt"]
        tokenizer = checkpoint_for_config(config_for_run_path(named), checkpoints_root)
        extra = [str(tokenizer) if a == "@tokenizer_ckpt" else a for a in extra]
    common = ["fit", "--config", str(config), "--trainer.max_steps", str(total), "--trainer.log_every_n_steps", "1",
              *extra, callback("reliability_helpers.RandomProbe")]  # fmt: skip
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    cli_main([*common, *run_dir_args(whole)])

    with pytest.raises(SystemExit) as stopped:
        cli_main([*common, *run_dir_args(parts), callback("reliability_helpers.SignalAtStep", step=stop,
                                                          signal_name="SIGUSR1")])  # fmt: skip
    assert stopped.value.code in (None, 0), "pre-emption exits cleanly"
    interrupted = load_checkpoint(parts / "checkpoints" / "last.ckpt")
    assert interrupted["global_step"] == stop
    (position,) = interrupted["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert 0 < position["batches"] < position["batches_per_epoch"], f"not interrupted mid-epoch: {position}"

    cli = cli_main([*common, *run_dir_args(parts), "--ckpt_path", "last"])
    assert cli.trainer.global_step == total
    assert isinstance(cli.trainer.strategy.checkpoint_io, SafeCheckpointIO)

    ref, got = scalars(whole), scalars(parts)
    assert {"train/loss", "probe/torch", "probe/numpy", "probe/python"} <= set(ref)
    for tag in ref:
        if tag.endswith("_epoch"):  # epoch aggregates: Lightning does not checkpoint running means mid-epoch
            continue
        if is_throughput(tag):  # wall-clock figures and counters since the process started: no run repeats them
            continue
        if tag.startswith(("train/", "probe/")):
            # logged at 0-based steps: the resumed run logs `stop`, stop + 1, ...
            # (some start later, e.g. the discriminator's terms at disc_start: the same steps must be there)
            want = {s: v for s, v in ref[tag].items() if s >= stop}
            assert want and {s: v for s, v in got[tag].items() if s >= stop} == want, tag
            if min(ref[tag]) == 0:
                assert len(want) == total - stop, f"{tag} is not logged at every step"
        elif tag.startswith("val/"):
            assert got[tag] == ref[tag], f"{tag} differs"
    a, b = load_checkpoint(whole / "checkpoints" / "last.ckpt"), load_checkpoint(parts / "checkpoints" / "last.ckpt")
    if any("EMA" in arg for arg in extra):  # the EMA is in the checkpoint, apart from the weights
        assert {"current_model_state", "averaging_state"} <= a.keys() and a["averaging_state"]["n_averaged"] == total
        assert any(not torch.equal(a["state_dict"][k], a["current_model_state"][k]) for k in a["state_dict"])
    for key in ("state_dict", "current_model_state"):  # EMA weights, then the trained weights
        if key in a:
            assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert all(torch.equal(opt_a[i][k], opt_b[i][k]) for i in opt_a for k in opt_a[i])
    assert a["lr_schedulers"] == b["lr_schedulers"]


def test_sigterm_to_a_real_fit_process_saves_a_checkpoint_that_resumes(tmp_path):
    args = ["fit", "--config", str(DEBUG_CLASSIFIER), *run_dir_args(tmp_path), "--trainer.max_steps", "100000",
            "--trainer.limit_val_batches", "0", callback("reliability_helpers.AnnounceSteps")]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "lit_ar", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("lit_ar-test step 3"):
                proc.send_signal(signal.SIGTERM)
                break
        out = "".join(lines) + proc.communicate(timeout=90)[0]
    finally:
        watchdog.cancel()
    assert proc.returncode == 0, f"SIGTERM should end the run cleanly:\n{out[-4000:]}"
    assert "Preemption: signal received" in out and "Resume with `--ckpt_path last`" in out
    last = tmp_path / "checkpoints" / "last.ckpt"
    saved = load_checkpoint(last, expected_system=ClassifierSystem)  # weights_only, CRC-checked
    step = saved["global_step"]
    assert 3 <= step < 100000 and not list(tmp_path.glob("checkpoints/.*tmp*")), "no temp file left behind"

    cli = cli_main([*args[:-1], "--trainer.max_steps", str(step + 2), "--ckpt_path", "last"])
    assert cli.trainer.global_step == step + 2
    assert load_checkpoint(last)["global_step"] == step + 2


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path):
    class Interrupted:
        def __reduce__(self):
            raise KeyboardInterrupt("killed mid-write")

    path = tmp_path / "last.ckpt"
    atomic_save({"state_dict": {"w": torch.ones(3)}}, path)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"state_dict": {"w": torch.zeros(100_000)}, "x": Interrupted()}, path)
    assert torch.equal(load_checkpoint(path)["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "the temp file is removed"
    (tmp_path / ".last.ckpt.tmp-99999").write_bytes(b"partial")  # left by a writer that was SIGKILLed
    atomic_save({"state_dict": {"w": torch.zeros(3)}}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "stale temp files are cleaned up"


def test_truncated_and_bit_flipped_checkpoints_are_detected(classifier_checkpoint, tmp_path):
    data = classifier_checkpoint.read_bytes()
    truncated, flipped = tmp_path / "truncated.ckpt", tmp_path / "flipped.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated\.ckpt.*truncated or corrupt"):
        load_checkpoint(truncated)
    # a flipped byte inside a weight: torch.load would return the damaged tensor; the CRC check refuses it
    import zipfile

    with zipfile.ZipFile(classifier_checkpoint) as archive:
        record = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size > 1000)
    damaged = bytearray(data)
    damaged[record.header_offset + 200] ^= 0xFF
    flipped.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match=r"flipped\.ckpt.*fails its CRC check"):
        load_checkpoint(flipped)


def _config_with(tmp_path: Path, guard_args: dict) -> Path:
    """The debug classifier config with other NonFiniteGuard settings."""
    config = yaml.safe_load(DEBUG_CLASSIFIER.read_text())
    for cb in config["trainer"]["callbacks"]:
        if cb["class_path"].endswith("NonFiniteGuard"):
            cb["init_args"] = guard_args
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_nonfinite_steps_are_skipped_counted_and_leave_weights_untouched(tmp_path):
    config = _config_with(tmp_path, {"max_consecutive": 3})
    inject = callback("reliability_helpers.InjectNonFinite", nan_steps=[2, 3], inf_grad_steps=[5])
    with pytest.warns(UserWarning) as warned:
        cli = cli_main(["fit", "--config", str(config), *run_dir_args(tmp_path), "--trainer.max_steps", "8",
                        "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "0", inject])  # fmt: skip
    skips = [str(w.message) for w in warned if str(w.message).startswith("NonFiniteGuard")]
    assert skips == [
        "NonFiniteGuard: skipped step 2: non-finite train/loss=nan",
        "NonFiniteGuard: skipped step 3: non-finite train/loss=nan",
        "NonFiniteGuard: skipped step 5: non-finite gradients in 1 parameters (model.stages.0.net.0.weight)",
    ]
    probe = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "InjectNonFinite")
    # (weights changed, optimizer state changed) per step: the bad steps 2, 3 (NaN loss) and 5 (inf grad) did nothing
    assert {s: probe.changed[s] for s in (2, 3, 5)} == {2: (False, False), 3: (False, False), 5: (False, False)}
    assert all(probe.changed[s] == (True, True) for s in (0, 1, 4, 6, 7))
    assert cli.trainer.global_step == 8 and all(p.isfinite().all() for p in cli.model.parameters())
    logged = scalars(tmp_path)["train/nonfinite_steps"]
    assert [logged[s] for s in range(8)] == [0, 0, 1, 2, 2, 3, 3, 3]  # logged at 0-based steps
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["callbacks"]["NonFiniteGuard"]["total"] == 3


def test_too_many_nonfinite_steps_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path):
    config = _config_with(tmp_path, {"max_consecutive": 3})
    periodic = tmp_path / "periodic"
    message = (r"3 non-finite steps in a row \(steps 4 to 6 on .*max_consecutive=3\)\. At step 6: non-finite "
               r"train/loss=nan\. .*last good checkpoint is .*periodic/last\.ckpt")  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=message):
        cli_main(["fit", "--config", str(config), *run_dir_args(tmp_path), "--trainer.max_steps", "20",
                  "--trainer.limit_val_batches", "0",
                  callback("lightning.pytorch.callbacks.ModelCheckpoint", dirpath=str(periodic), every_n_train_steps=2,
                           save_top_k=-1, save_last=True),
                  callback("reliability_helpers.InjectNonFinite", from_step=4)])  # fmt: skip
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists(), "nothing is saved on the way out"
    before, during = load_checkpoint(periodic / "epoch=0-step=4.ckpt"), load_checkpoint(periodic / "last.ckpt")
    # the checkpoint written during the streak (step 6) holds the weights from before it: skipped steps change nothing
    assert during["global_step"] == 6 and during["callbacks"]["NonFiniteGuard"]["consecutive"] == 2
    assert all(torch.equal(before["state_dict"][k], v) for k, v in during["state_dict"].items())
    assert all(v.isfinite().all() for v in during["state_dict"].values())


def test_check_finite_for_manual_optimization():
    assert check_finite({"rec": torch.tensor(1.0), "gan": torch.tensor([0.5, 2.0]), "step": 3})
    assert not check_finite({"rec": torch.tensor(1.0), "gan": torch.tensor([0.5, float("inf")])})
    assert not check_finite(torch.tensor(float("nan")))


def _batches(loader) -> list[list[int]]:
    return [batch["label"].tolist() + [round(float(batch["image"].sum()), 3)] for batch in loader]


def test_loader_position_survives_a_change_of_device_count():
    """One process at batch 8 stops after 3 batches; 2 processes at batch 4 resume from its state: together they
    continue with exactly the samples (and augmentations) the single process would have drawn next."""
    dm = ImageDataModule(image_size=8, num_train=64, batch_size=8, crop="random", resize_scale=1.5, hflip=True)
    dm.setup("fit")

    def loader(world: int, rank: int, batch: int, workers: int = 0) -> ResumableDataLoader:
        sampler = ResumableSampler(dm.train_set, num_replicas=world, rank=rank, shuffle=True, seed=0, drop_last=True)
        sampler.set_epoch(1)
        return ResumableDataLoader(dm.train_set, batch_size=batch, sampler=sampler, drop_last=True, num_workers=workers)

    single = loader(1, 0, 8)
    it = iter(single)
    [next(it) for _ in range(3)]
    state = single.state_dict()
    assert state == {"epoch": 1, "batches": 3, "batches_per_epoch": 8, "samples_per_batch": 8, "dataset_size": 64}
    rest = [b["image"] for b in it]
    ranks = [loader(2, 0, 4), loader(2, 1, 4, workers=1)]  # a worker process prefetches as soon as it starts
    for r in ranks:
        r.load_state_dict(state)
    resumed = [torch.cat([b0["image"], b1["image"]]) for b0, b1 in zip(*ranks)]
    assert len(resumed) == len(rest) == 5
    # 2 ranks interleave the global order: rank r holds samples r, r+2, ... of each global batch
    for want, got in zip(rest, resumed):
        assert torch.equal(want[0::2], got[:4]) and torch.equal(want[1::2], got[4:])
    with pytest.raises(ValueError, match=r"global batch was 16 samples .* is 8 now \(4 per device x 2 devices\)"):
        ranks[0].load_state_dict(dict(state, samples_per_batch=16))


def test_augmentations_do_not_depend_on_workers_or_the_global_rng():
    kwargs = dict(image_size=8, num_train=32, batch_size=8, crop="random", resize_scale=1.5, hflip=True)
    dm0, dm1 = ImageDataModule(**kwargs), ImageDataModule(**kwargs, num_workers=1)
    dm0.setup("fit")
    dm1.setup("fit")
    torch.manual_seed(0)
    a = [b["image"] for b in dm0.train_dataloader()]
    torch.manual_seed(1)
    b = [b["image"] for b in dm1.train_dataloader()]
    assert len(a) == 4 and all(torch.equal(x, y) for x, y in zip(a, b))


SHIPPED = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name != "trainer")


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_saves_last_and_lists_an_always_on_class_only_to_change_it(path):
    """The CLI adds SafeCheckpointIO, ExactResume, Preemption and NonFiniteGuard to every Trainer (tests/test_cli.py
    checks each shipped config's); a config that lists one anyway must be changing its settings."""
    trainer = merged_yaml(stacked_configs(path))["trainer"]  # a tier's overlay as stacked on its base
    listed = [*(trainer.get("plugins") or []), *(trainer.get("callbacks") or [])]
    entries = [e if isinstance(e, dict) else {"class_path": e} for e in listed]
    always_on = {cls.__name__ for cls in [SafeCheckpointIO, *ALWAYS_ON_CALLBACKS]}
    for entry in entries:
        if entry["class_path"].rsplit(".", 1)[-1] in always_on:
            assert entry.get("init_args"), f"{entry['class_path']} with its default settings: the CLI adds it"
    checkpoints = [e.get("init_args") or {} for e in entries if e["class_path"].endswith("ModelCheckpoint")]
    assert any(a.get("save_last") for a in checkpoints), "a ModelCheckpoint with save_last: true (for Preemption)"


def test_grad_scaler_state_is_restored_and_its_overflow_skips_are_not_counted(tmp_path):
    """16-mixed (fp16 autocast on CPU through a plugin instance): Lightning saves and restores the GradScaler; the
    steps the scaler skips while it lowers an over-large initial scale are its business, not the guard's."""
    import lightning as L
    from lightning.pytorch.plugins import MixedPrecision

    seen = {}

    class ScaleAtStart(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["scale"] = trainer.precision_plugin.scaler.get_scale()

    def fit(steps: int, ckpt_path=None) -> L.Trainer:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
        trainer = L.Trainer(
            max_steps=steps, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler), SafeCheckpointIO()],
            callbacks=[NonFiniteGuard(max_consecutive=2), ScaleAtStart()], default_root_dir=tmp_path, logger=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        )  # fmt: skip
        dm = ImageDataModule(image_size=8, num_train=64, batch_size=16)
        trainer.fit(ClassifierSystem(image_size=8, width=8, num_stages=2, feature_dim=16), dm, ckpt_path=ckpt_path)
        return trainer

    first = fit(4)
    scale = first.precision_plugin.scaler.get_scale()
    assert scale < 2.0**24 and first.callbacks[0].total == 0, "the scaler skipped overflowing steps itself"
    first.save_checkpoint(tmp_path / "a.ckpt")
    assert load_checkpoint(tmp_path / "a.ckpt")["MixedPrecision"]["scale"] == scale
    fit(5, ckpt_path=tmp_path / "a.ckpt")
    assert seen["scale"] == scale


def test_load_system_returns_the_frozen_system(classifier_checkpoint):
    system = load_system(classifier_checkpoint, ClassifierSystem, setting="model.init_args.classifier_ckpt")
    saved = load_checkpoint(classifier_checkpoint)["state_dict"]
    assert not system.training and not any(p.requires_grad for p in system.parameters())
    assert all(torch.equal(v, saved[k]) for k, v in system.state_dict().items())


def test_guard_in_manual_optimization_with_check_finite(tmp_path):
    """A manual-optimization system (as the tokenizer's GAN training) that calls check_finite and returns its terms:
    the batches it skips are counted and the stop names the bad term; a step it takes anyway on a NaN loss is
    skipped by the guard itself."""
    import lightning as L
    from torch import nn

    class Manual(L.LightningModule):
        def __init__(self, nan_batches: set, use_check: bool):
            super().__init__()
            self.automatic_optimization = False
            self.net, self.nan_batches, self.use_check, self.weights = nn.Linear(4, 1), nan_batches, use_check, []

        def training_step(self, batch, batch_idx):
            x = batch[0] * (float("nan") if batch_idx in self.nan_batches else 1.0)
            terms = {"rec": self.net(x).pow(2).mean(), "gan": self.net(x).mean().abs()}
            self.log("train/rec", terms["rec"])
            if not (self.use_check and not check_finite(terms, self.trainer)):
                opt = self.optimizers()
                opt.zero_grad()
                self.manual_backward(terms["rec"])
                opt.step()
            self.weights.append(self.net.weight.detach().clone())
            return terms

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=0.1)

    def fit(module, guard):
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 4)), batch_size=4)
        L.Trainer(max_steps=8, callbacks=[guard], default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False).fit(module, data)  # fmt: skip

    for use_check in (True, False):
        module, guard = Manual({2}, use_check), NonFiniteGuard(max_consecutive=2)
        fit(module, guard)
        assert guard.total == 1 and torch.equal(module.weights[2], module.weights[1]), use_check
        assert not torch.equal(module.weights[3], module.weights[2])
    message = r"2 non-finite steps in a row \(steps 3 to 4 .*At step 4: non-finite gan=nan, train/rec=nan\."
    with pytest.raises(NonFiniteLossError, match=message):
        fit(Manual({3, 4}, use_check=True), NonFiniteGuard(max_consecutive=2))
