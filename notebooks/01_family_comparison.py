# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 01 — Every generator family on `shapes` (and `digits`), at one training budget, under one evaluation protocol
#
# This notebook reproduces the family-comparison tables of docs/results.md on the leaderboard
# (`benchmarks.leaderboard`, docs/leaderboard.md), which
# 1. trains the tier's classifier (the FID feature extractor) and the tokenizers the methods need: VQ for the
#    discrete families (LlamaGen, RAR, MaskGIT), multi-scale VQ for VAR, KL for the continuous ones (MAR, FlowAR);
# 2. trains every method at the **same budget: the same number of optimizer steps at the same batch size** (so every
#    method sees the same number of training images; wall time is reported next to it);
# 3. evaluates each checkpoint through the CLI exactly as a user would (`lit_ar test --config <method config>
#    --config <the tier's eval config> --ckpt_path ...`): the same number of samples of every class, seeded, made
#    with each method's own `predict_kwargs`, in the classifier's features, against the training split's cached
#    statistics; EMA checkpoints (MAR, FlowAR) are evaluated on their averaged weights;
# 4. times sampling and counts the network calls per image.
#
# On top of the leaderboard's rows this notebook adds the **real-vs-real floor**: the validation split evaluated as
# if it were samples, against the same reference, with the same extractor (`lit_ar.evaluation.write_split_npz` +
# `configs/eval/npz_shapes.yaml`). No generator can be expected to beat it by more than noise; it says how small an
# FID difference means anything. Then it tabulates everything and shows samples.
#
# Sizes. With `LIT_AR_SMALL=1` (the tests) it runs the leaderboard's `debug` tier (16x16 images, tiny models, 16
# steps each, 4 samples per class): about a minute on 2 CPU cores, and the figures mean nothing beyond "the pipeline
# works". `LIT_AR_TIER=shapes32` is the CPU tier of docs/results.md (32x32 images, 1000 steps of batch 32 per
# method, 50 samples per class), `LIT_AR_TIER=digits` the same budget on scikit-learn's real digits, and the default,
# `shapes`, the 64x64 tier (the leaderboard's `shapes64`: 3000 steps of batch 32, a GPU job). `LIT_AR_STEPS`
# changes the step budget and `LIT_AR_FAMILIES` (comma-separated leaderboard names) runs a subset.
# Running the notebook again with the same `LIT_AR_RUN_DIR` continues an interrupted run: finished rows are read
# back, an interrupted fit resumes from its last checkpoint. Set `LIT_AR_RUN_DIR` to keep the runs (default: a
# temporary folder).

# %%
import importlib
import json
import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch
import yaml

from benchmarks.leaderboard import METHODS, TIERS, run
from lit_ar.callbacks import make_grid
from lit_ar.checkpoints import load_system
from lit_ar.cli import cli_main
from lit_ar.data.datamodule import ImageDataModule
from lit_ar.evaluation import EvaluationRecord, write_split_npz
from lit_ar.metrics import load_extractor

SMALL = os.environ.get("LIT_AR_SMALL", "0") == "1"
TIER = "small" if SMALL else os.environ.get("LIT_AR_TIER", "shapes")
LEADERBOARD_TIER = {"small": "debug", "shapes32": "shapes32", "digits": "digits", "shapes": "shapes64"}
if TIER not in LEADERBOARD_TIER:
    raise ValueError(f"LIT_AR_TIER={TIER!r}; accepted: 'shapes32' (CPU), 'digits' (CPU) or 'shapes' (64x64, GPU)")
tier = TIERS[LEADERBOARD_TIER[TIER]]
RUN_DIR = Path(os.environ.get("LIT_AR_RUN_DIR") or tempfile.mkdtemp(prefix="lit_ar_notebook01_"))
QUIET = ["--trainer.enable_progress_bar", "false"]
STEPS = int(os.environ["LIT_AR_STEPS"]) if os.environ.get("LIT_AR_STEPS") else None  # None: the tier's budget
FAMILIES = ["LlamaGen", "RAR", "MaskGIT", "VAR", "MAR", "FlowAR"]  # the six of docs/results.md; any row may be named
if os.environ.get("LIT_AR_FAMILIES"):  # a subset, e.g. LIT_AR_FAMILIES=LlamaGen,VAR
    FAMILIES = os.environ["LIT_AR_FAMILIES"].split(",")
    if unknown := sorted(set(FAMILIES) - set(METHODS)):
        raise ValueError(f"LIT_AR_FAMILIES names {unknown}; accepted: {', '.join(METHODS)}")

# %% [markdown]
# ## Every method at the same budget, evaluated through the CLI
# Each method's config is used as shipped except for the tier's budget (`max_steps`, `batch_size`), the tokenizer
# path, RAR's random-order anneal (kept at the same fractions of training as shipped), at small size no validation,
# and in the shapes32 tier the image size and the `configs/shapes32/` overlays of the classifier and tokenizers. The
# learning-rate schedules follow `max_steps`. Every record is a JSON file in the method's run folder,
# `eval/evaluation.json`; the leaderboard's own table is `leaderboard.md` in RUN_DIR.

# %%
board = run(tier.name, [METHODS[name] for name in FAMILIES], out=RUN_DIR, steps=STEPS)
rows = {row["method"]: row for row in board["rows"] if row["method"] in FAMILIES}
records = {name: EvaluationRecord.from_json(rows[name]["evaluation_json"]) for name in FAMILIES}
num_classes = len(next(iter(records.values())).protocol["class_counts"])
for name, record in records.items():  # class-balanced: exactly per_class samples of every class
    assert record.protocol["class_counts"] == [tier.per_class] * num_classes, (name, record.protocol["class_counts"])
    assert record.checkpoint["path"] == rows[name]["checkpoint"]
first = FAMILIES[0]  # the floor and the printed protocol use the first method's data settings
print(json.dumps(records[first].protocol, sort_keys=True))

# %% [markdown]
# ## The real-vs-real floor
# The validation split, written as an npz of 8-bit images with its labels, evaluated by `NpzEvaluator` against the
# same training-split reference file (same data settings, same extractor, same precision/recall subsample). Its
# class accuracy is the classifier's accuracy on real images: the ceiling of the class accuracy column.
# On `digits` the validation split (90 images) is smaller than the classifier's 128 features, so the floor's FID is
# computed with `force=true` and is ill-conditioned: read only its precision, recall and class accuracy.

# %%
classifier_ckpt = RUN_DIR / "classifier" / "checkpoints" / tier.classifier_ckpt
data_settings = yaml.safe_load(Path(rows[first]["configs"][0]).read_text())["data"]
data_settings["image_size"] = records[first].reference["identity"]["image_size"]  # the tier's size
val_npz = RUN_DIR / "floor" / "validation.npz"
val_npz.parent.mkdir(parents=True, exist_ok=True)
num_val = write_split_npz(ImageDataModule(**data_settings), "validation", val_npz)
data_args = [arg for key, value in data_settings.items() for arg in (f"--data.{key}", str(value))]
npz_settings = ["--model.init_args.samples_npz", str(val_npz), "--model.init_args.extractor_ckpt",
                str(classifier_ckpt), "--model.init_args.reference_dir", str(RUN_DIR / "references")]  # fmt: skip
feature_dim = load_extractor("classifier", str(classifier_ckpt)).feature_dim
floor_forced = num_val < feature_dim  # digits: its validation split is 5% of 1797 images, 90 < 128 features
if floor_forced:  # the floor's FID is then ill-conditioned (singular covariance): a rough floor, marked as such
    npz_settings += ["--model.init_args.force", "true"]
    print(f"floor: {num_val} validation images < {feature_dim} feature dimensions; its FID is ill-conditioned")
floor_cli = cli_main(["test", "--config", "configs/eval/npz_shapes.yaml", *data_args, *npz_settings, *QUIET,
                      "--trainer.logger.init_args.save_dir", str(RUN_DIR / "floor")])  # fmt: skip
floor = floor_cli.model.last_record
assert floor.num_samples == num_val and floor.reference == records[first].reference, "the same reference"
assert floor.protocol["force"] == floor_forced

# %% [markdown]
# ## The table
# FID and precision/recall are in the classifier's feature space, against the training split; lower FID is better.
# With few samples FID is biased upwards (the floor row, with about as many images, shows by how much). Images/s:
# one batch after a warm-up batch, with each method's sampling settings, the tokenizer's decode included; core calls:
# passes of the network per image.

# %%
table_rows = []
for name in FAMILIES:
    row = rows[name]
    table_rows.append({"family": name, "FID": row["fid"], "precision": row["precision"], "recall": row["recall"],
                       "class acc.": row["class_accuracy"], "samples": row["num_samples"],
                       "images/s": row["images_per_s"], "core calls": row["core_calls_per_image"],
                       "train s": 60 * row["train_minutes"],
                       "steps x batch": f"{row['steps']} x {row['batch']}"})  # fmt: skip
m = floor.metrics
table_rows.append({"family": "real (validation split)", "FID": m["fid"], "precision": m["precision"],
                   "recall": m["recall"], "class acc.": m["class_accuracy"], "samples": floor.num_samples,
                   "images/s": None, "core calls": None, "train s": None, "steps x batch": None})  # fmt: skip
table = pd.DataFrame(table_rows).set_index("family")
print(table.to_string(float_format=lambda x: f"{x:.3g}"))
table.to_csv(RUN_DIR / "family_comparison.csv")  # docs/results.md's table comes from this file
assert list(table.index) == [*FAMILIES, "real (validation split)"], "a row per family, then the floor"
assert table["FID"].notna().all() and (table["FID"] >= 0).all()
assert table[["precision", "recall", "class acc."]].stack().between(0, 1).all()
assert (table["images/s"].iloc[:-1] > 0).all()

# %% [markdown]
# ## Samples
# One row per class, two samples of each, every method with the same seed and its own `predict_kwargs`.

# %%
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
fig, axes = plt.subplots(1, len(FAMILIES), figsize=(3 * len(FAMILIES), 12))
for ax, name in zip(axes, FAMILIES):
    run_config = yaml.safe_load((Path(rows[name]["checkpoint"]).parents[1] / "config.yaml").read_text())
    module, _, cls = run_config["model"]["class_path"].rpartition(".")  # the system class the run trained
    model = load_system(rows[name]["checkpoint"], getattr(importlib.import_module(module), cls)).to(device)
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        labels = torch.arange(num_classes, device=device).repeat_interleave(2)
        images = model.sample(labels, generator=torch.Generator(device).manual_seed(0), **model.hparams.predict_kwargs)
    size, channels = model.hparams.image_size, model.hparams.channels
    assert images.shape == (2 * num_classes, channels, size, size)
    ax.imshow(make_grid(images, nrow=2).permute(1, 2, 0))
    ax.set_title(name)
    ax.axis("off")
plt.tight_layout()
fig.savefig(RUN_DIR / "family_samples.png")
