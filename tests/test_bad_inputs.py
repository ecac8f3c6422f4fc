"""Every bad configuration and input lit_ar knows of, each refused with its own clear message.

A row is `(id, make, exception type, regex)`: `make(ctx)` must raise the exception with a message matching the
regex. `ctx.tmp_path` is a fresh folder and `ctx.fixture(name)` any pytest fixture (e.g. `small_images`,
`classifier_checkpoint`). Families: add a `<FAMILY>_CASES` list in the marked place below and add it to `CASES`.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, run_dir_args

from lit_ar.checkpoints import (
    CheckpointError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    UnsafeCheckpointError,
    WrongSystemError,
    load_checkpoint,
)
from lit_ar.cli import cli_main
from lit_ar.data import ImageDataModule
from lit_ar.data.sources import decode_image
from lit_ar.reliability import NonFiniteGuard, NonFiniteLossError, Preemption
from lit_ar.systems import ClassifierSystem

DEBUG_CLASSIFIER = str(CONFIGS / "debug" / "classifier.yaml")


@dataclass
class Ctx:
    tmp_path: Path
    request: pytest.FixtureRequest

    def fixture(self, name: str):
        return self.request.getfixturevalue(name)


Case = tuple[str, Callable[[Ctx], object], type[BaseException], str]


# ------------------------------------------------------------------------------------------------------ helpers


def classes(**kwargs) -> int:
    """Resolve the data source (where most data errors surface)."""
    return ImageDataModule(**kwargs).num_classes


def corrupt_folder(c: Ctx) -> str:
    folder = c.fixture("small_images")
    (folder / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    return str(folder)


def global_batch_on_3_devices(c: Ctx) -> None:
    class FakeTrainer:
        world_size = 3

    dm = ImageDataModule(global_batch_size=64)
    dm.trainer = FakeTrainer()
    dm.setup("fit")


def fit_debug(c: Ctx, *args: str, run: bool = True):
    subcommand = ["fit"] if run else []
    return cli_main([*subcommand, "--config", DEBUG_CLASSIFIER, *run_dir_args(c.tmp_path), *args], run=run)


def resume(c: Ctx, checkpoint: Path, *args: str):
    """`lit_ar fit --ckpt_path <checkpoint>` on the debug classifier (the error must come before any training)."""
    return fit_debug(c, "--trainer.max_steps", "5", "--ckpt_path", str(checkpoint), *args)


def edited_checkpoint(c: Ctx, edit: Callable[[dict], None], name: str = "edited.ckpt") -> Path:
    ckpt = torch.load(c.fixture("classifier_checkpoint"), weights_only=True)
    edit(ckpt)
    path = c.tmp_path / name
    torch.save(ckpt, path)
    return path


def damaged(c: Ctx, how: str) -> Path:
    data = c.fixture("classifier_checkpoint").read_bytes()
    path = c.tmp_path / f"{how}.ckpt"
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"\x00junk" * 300}[how])
    return path


def as_tokenizer(ckpt: dict) -> None:
    ckpt["hyper_parameters"]["_class_path"] = "lit_ar.systems.TokenizerSystem"


def without_class_path(ckpt: dict) -> None:
    ckpt["hyper_parameters"] = {"codebook_size": 4096, "image_size": 16, "channels": 3}


def pickled_object(c: Ctx) -> Path:
    path = c.tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"obj": Ctx}}, path)  # a class: needs code to load
    return path


def bare_state_dict(c: Ctx) -> Path:
    path = c.tmp_path / "weights.pt"
    torch.save(ClassifierSystem(width=8, num_stages=3).state_dict(), path)
    return path


def nan_from_step_1(c: Ctx):
    inject = {"class_path": "reliability_helpers.InjectNonFinite", "init_args": {"from_step": 1}}
    return fit_debug(c, "--trainer.max_steps", "20", "--trainer.callbacks+=" + json.dumps(inject))


def preemption_without_last_checkpoint(c: Ctx) -> None:
    class Trainer:
        callbacks: list = []

    Preemption().setup(Trainer(), None, "fit")


# ------------------------------------------------------------------------------------------------------ the rows

FOUNDATION_CASES: list[Case] = [
    ("data/unknown-dataset-offline", lambda c: classes(dataset="no-such/dataset-xyz"), ValueError,
     r"data.dataset='no-such/dataset-xyz'.*shapes.*digits.*imagefolder"),
    ("data/imagefolder-without-data_dir", lambda c: classes(dataset="imagefolder"), ValueError,
     r"needs `data.data_dir`"),
    ("data/missing-folder", lambda c: classes(dataset="imagefolder", data_dir=str(c.tmp_path / "nope")), ValueError,
     r"data.data_dir=.*nope.*does not exist"),
    ("data/empty-folder",
     lambda c: (c.tmp_path / "empty" / "a").mkdir(parents=True) or classes(dataset="imagefolder",
                                                                           data_dir=str(c.tmp_path / "empty")),
     ValueError, r"data.data_dir=.*holds no image files"),
    ("data/corrupt-image", lambda c: classes(dataset="imagefolder", data_dir=corrupt_folder(c)), ValueError,
     r"corrupt or unreadable image '.*broken\.png'.*skip_corrupt"),
    ("data/corrupt-bytes-in-memory", lambda c: decode_image({"bytes": b"garbage", "path": "x.jpg"}, "test"),
     ValueError, r"corrupt or unreadable image 'x\.jpg'"),
    ("data/missing-label-column",
     lambda c: classes(dataset="imagefolder", data_dir=str(c.fixture("small_images")), label_column="klass"),
     ValueError, r"data.label_column='klass' is not a column.*\['image', 'label'\]"),
    ("data/missing-image-column",
     lambda c: classes(dataset="imagefolder", data_dir=str(c.fixture("small_images")), image_column="img"),
     ValueError, r"data.image_column='img' is not a column"),
    ("data/unknown-train-split",
     lambda c: classes(dataset="imagefolder", data_dir=str(c.fixture("small_images")), train_split="training"),
     ValueError, r"data.train_split='training' is not a split .* it has \['train'\]"),
    ("data/unknown-val-split",
     lambda c: classes(dataset="imagefolder", data_dir=str(c.fixture("small_images")), val_split="dev"),
     ValueError, r"data.val_split='dev' is not a split"),
    ("data/parquet-without-files", lambda c: classes(dataset="parquet"), ValueError, r"needs `data.data_files`"),
    ("data/parquet-missing-file", lambda c: classes(dataset="parquet", data_files=str(c.tmp_path / "x.parquet")),
     ValueError, r"data.data_files entry .*x\.parquet' does not exist"),
    ("data/disk-without-folder", lambda c: classes(dataset="disk"), ValueError,
     r"data.dataset='disk' needs `data.data_dir`"),
    ("data/val-fraction-out-of-range", lambda c: classes(dataset="digits", val_fraction=1.5), ValueError,
     r"data.val_fraction=1.5 must be in \(0, 1\)"),
    ("data/channels", lambda c: ImageDataModule(channels=2), ValueError, r"data.channels=2 is not supported"),
    ("data/batch-size", lambda c: ImageDataModule(batch_size=0), ValueError, r"data.batch_size=0 must be at least 1"),
    ("data/image-size", lambda c: ImageDataModule(image_size=0), ValueError,
     r"data.image_size=0 must be a positive integer"),
    ("data/crop", lambda c: ImageDataModule(crop="zoom"), ValueError, r"data.crop='zoom' is not supported"),
    ("data/global-batch-not-dividing", global_batch_on_3_devices, ValueError,
     r"data.global_batch_size=64 does not divide across 3 devices"),
    ("model/image-size-below-minimum", lambda c: fit_debug(c, "--data.image_size", "2", run=False), ValueError,
     r"model.image_size=2 is below .* at least 4 pixels"),
]  # fmt: skip

RELIABILITY_CASES: list[Case] = [
    ("ckpt/missing-file", lambda c: load_checkpoint(c.tmp_path / "nope.ckpt", setting="model.init_args.tokenizer_ckpt"),
     FileNotFoundError, r"model.init_args.tokenizer_ckpt='.*nope\.ckpt': no checkpoint file"),
    ("ckpt/missing-file-on-resume", lambda c: resume(c, c.tmp_path / "nope.ckpt"), FileNotFoundError,
     r"ckpt_path='.*nope\.ckpt': no checkpoint file"),
    ("ckpt/truncated-on-resume", lambda c: resume(c, damaged(c, "truncated")), CorruptCheckpointError,
     r"checkpoint '.*truncated\.ckpt' \(\d+ bytes\) is truncated or corrupt"),
    ("ckpt/empty-file", lambda c: load_checkpoint(damaged(c, "empty")), CorruptCheckpointError,
     r"empty\.ckpt' \(0 bytes\) is truncated or corrupt"),
    ("ckpt/not-a-checkpoint", lambda c: load_checkpoint(damaged(c, "garbage")), CorruptCheckpointError,
     r"garbage\.ckpt' .* is truncated or corrupt"),
    ("ckpt/pickled-objects", lambda c: load_checkpoint(pickled_object(c)), UnsafeCheckpointError,
     r"pickled\.ckpt' holds pickled Python objects .* weights_only=True"),
    ("ckpt/bare-state-dict", lambda c: load_checkpoint(bare_state_dict(c)), CheckpointError,
     r"weights\.pt' is not a Lightning checkpoint: it has no 'state_dict'"),
    ("ckpt/another-family",
     lambda c: load_checkpoint(edited_checkpoint(c, as_tokenizer), expected_system=ClassifierSystem),
     WrongSystemError, r"is a checkpoint of lit_ar.systems.TokenizerSystem, not of .*ClassifierSystem"),
    ("ckpt/another-family-on-resume", lambda c: resume(c, edited_checkpoint(c, as_tokenizer)), WrongSystemError,
     r"ckpt_path='.*edited\.ckpt' is a checkpoint of lit_ar.systems.TokenizerSystem, not of .*ClassifierSystem"),
    ("ckpt/another-family-saved-outside-the-cli",
     lambda c: load_checkpoint(edited_checkpoint(c, without_class_path), expected_system=ClassifierSystem),
     WrongSystemError,
     r"does not look like a checkpoint of .*ClassifierSystem: its hyper-parameters \['codebook_size'\]"),
    ("ckpt/incompatible-config-on-resume",
     lambda c: resume(c, c.fixture("classifier_checkpoint"), "--model.init_args.width", "16"),
     IncompatibleCheckpointError,
     r"does not fit the model of this config: \d+ weights differ in shape, e.g. model\.\S+ is \(8, .*\) in the "
     r"checkpoint and \(16, .*\) here.*model.init_args.width: 8 in the checkpoint, 16 in this config"),
    ("resume/global-batch-changed-mid-epoch",
     lambda c: resume(c, c.fixture("classifier_checkpoint"), "--data.batch_size", "32"), ValueError,
     r"cannot resume mid-epoch: the global batch was 16 samples .* is 32 now \(32 per device x 1 devices\)"),
    ("resume/training-set-changed-mid-epoch",
     lambda c: resume(c, c.fixture("classifier_checkpoint"), "--data.num_train", "300"), ValueError,
     r"cannot resume mid-epoch: the training set had 256 samples .* has 300 now"),
    ("guard/nan-loss", nan_from_step_1, NonFiniteLossError,
     r"5 non-finite steps in a row \(steps 1 to 5 on TensorBoard's axis; NonFiniteGuard.max_consecutive=5\)\. "
     r"At step 5: non-finite train/loss=nan"),
    ("guard/max-consecutive", lambda c: NonFiniteGuard(max_consecutive=0), ValueError,
     r"NonFiniteGuard.max_consecutive=0 must be at least 1"),
    ("preemption/no-last-checkpoint", preemption_without_last_checkpoint, ValueError,
     r"Preemption needs a ModelCheckpoint with `save_last: true`"),
    ("preemption/unknown-signal", lambda c: Preemption(signals=["SIGFOO"]), ValueError,
     r"Preemption.signals: 'SIGFOO' is not a signal"),
]  # fmt: skip

# Families: define <FAMILY>_CASES above this line and add them here.
CASES: list[Case] = [*FOUNDATION_CASES, *RELIABILITY_CASES]


@pytest.mark.parametrize("make,error,match", [pytest.param(m, e, r, id=i) for i, m, e, r in CASES])
def test_bad_input_is_refused_with_a_clear_message(make, error, match, tmp_path, request):
    with pytest.raises(error, match=match):
        make(Ctx(tmp_path, request))


def test_case_ids_are_unique():
    ids = [case[0] for case in CASES]
    assert len(ids) == len(set(ids))
