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
# This notebook reproduces the family-comparison table of the README. It
# 1. trains the shapes classifier (the FID feature extractor) and the three tokenizers the families need: VQ for
#    the discrete families (LlamaGen, RAR, MaskGIT), multi-scale VQ for VAR, KL for the continuous ones (MAR,
#    FlowAR);
# 2. trains every generator family at the **same budget: the same number of optimizer steps at the same batch
#    size** (so every family sees the same number of training images; wall time is reported next to it);
# 3. evaluates each checkpoint through the CLI exactly as a user would (`lit_ar test --config <family config>
#    --config configs/eval/generator_shapes.yaml --ckpt_path ...`): the same number of samples of every class,
#    seeded, made with each family's own `predict_kwargs`, in the classifier's features, against the training
#    split's cached statistics; EMA checkpoints (MAR, FlowAR) are evaluated on their averaged weights;
# 4. adds the **real-vs-real floor**: the validation split evaluated as if it were samples, against the same
#    reference, with the same extractor (`lit_ar.evaluation.write_split_npz` + `configs/eval/npz_shapes.yaml`).
#    No generator can be expected to beat it by more than noise; it says how small an FID difference means anything;
# 5. tabulates FID, precision, recall, class accuracy, sampling speed and training time, and shows samples.
#
# Sizes. With `LIT_AR_SMALL=1` (the tests) it runs the debug configs (16x16 images, tiny models, 32 steps each,
# 4 samples per class): about a minute on 2 CPU cores, and the figures mean nothing beyond "the pipeline works".
# `LIT_AR_TIER=shapes32` is the CPU tier behind the README's table: the shapes configs as shipped, at 32x32 images
# (8x8 tokens; the `configs/shapes32/` overlays for the classifier and tokenizers), 1000 steps of batch 32 per
# family and 50 samples per class. Without either, it runs the shapes configs at 64x64 (16x16 tokens), 3000 steps of
# batch 32 per family, 50 samples per class: a GPU job (on a CPU, days). `LIT_AR_TIER=digits` runs every family's
# `*_digits` config on scikit-learn's real digits (32x32, one channel) with the digits classifier and tokenizers, at
# the shapes32 budget. `LIT_AR_STEPS` changes the step budget and
# `LIT_AR_FAMILIES` (comma-separated names) runs a subset of the families.
# Every `fit` runs with `--ckpt_path last`, so running the notebook again with the same `LIT_AR_RUN_DIR` continues
# an interrupted run instead of starting over (finished runs are not retrained).
# Set `LIT_AR_RUN_DIR` to keep the runs (default: a temporary folder).

# %%
import json
import os
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch
import yaml

from lit_ar.callbacks import make_grid
from lit_ar.cli import cli_main
from lit_ar.data.datamodule import ImageDataModule
from lit_ar.evaluation import EvaluationRecord, write_split_npz

SMALL = os.environ.get("LIT_AR_SMALL", "0") == "1"
TIER = "small" if SMALL else os.environ.get("LIT_AR_TIER", "shapes")
if TIER not in ("small", "shapes32", "shapes", "digits"):
    raise ValueError(f"LIT_AR_TIER={TIER!r}; accepted: 'shapes32' (CPU), 'digits' (CPU) or 'shapes' (64x64, GPU)")
DATASET = "digits" if TIER == "digits" else "shapes"
RUN_DIR = Path(os.environ.get("LIT_AR_RUN_DIR") or tempfile.mkdtemp(prefix="lit_ar_notebook01_"))
QUIET = ["--trainer.enable_progress_bar", "false"]
BUDGETS = {"small": (32, 16), "shapes32": (1000, 32), "digits": (1000, 32), "shapes": (3000, 32)}  # steps, batch
STEPS, BATCH = BUDGETS[TIER]  # the equal training budget of every family
STEPS = int(os.environ.get("LIT_AR_STEPS", STEPS))  # e.g. a shorter full-size run
PER_CLASS = 4 if SMALL else 50  # samples of every class in the evaluation
SAMPLE_SPEED_BATCH = 20 if SMALL else 100


def fit(configs: list[str], name: str, *extra: str) -> tuple[Path, float]:
    """`lit_ar fit --config ... --ckpt_path last` with the run folder under RUN_DIR; returns the last checkpoint and
    the training seconds, summed over the calls that continued the run (kept in `fit_seconds.json`)."""
    start = time.perf_counter()
    seconds_file = RUN_DIR / name / "fit_seconds.json"
    try:
        cli_main(["fit", *(arg for c in configs for arg in ("--config", c)), *QUIET, *extra,
                  "--trainer.logger.init_args.save_dir", str(RUN_DIR / name), "--ckpt_path", "last"])  # fmt: skip
    finally:  # a pre-empted call (SIGTERM ends it with SystemExit) counts too: the next call continues its run
        before = json.loads(seconds_file.read_text()) if seconds_file.exists() else 0.0
        seconds = time.perf_counter() - start + before
        seconds_file.parent.mkdir(parents=True, exist_ok=True)
        seconds_file.write_text(json.dumps(seconds))
    return RUN_DIR / name / "checkpoints" / "last.ckpt", seconds


# %% [markdown]
# ## The feature extractor and the tokenizers
# The classifier's penultimate features are the FID space on `shapes` (InceptionV3 features of 16x16 or 64x64
# procedural shapes would measure little); its accuracy on the samples is the class accuracy column. The
# evaluation refuses a classifier trained at another resolution than the data's.

# %%
debug = "configs/debug/"
overlay = "configs/shapes32/" if TIER == "shapes32" else None  # the 32x32 overlays of the classifier and tokenizers
if SMALL:  # 100 steps: a weak classifier (~20% on 16x16 shapes), but not a chance-level one
    classifier_ckpt, _ = fit([debug + "classifier.yaml"], "classifier", "--trainer.max_steps", "100")
else:
    configs = [f"configs/classifier/{DATASET}.yaml"] + ([overlay + "classifier/shapes.yaml"] if overlay else [])
    last, _ = fit(configs, "classifier")
    classifier_ckpt = last.parent / "best.ckpt"  # the best validation accuracy, as the eval config names
tokenizer_budget = ["--trainer.max_steps", "8"] if SMALL else []
tokenizers = {}
for kind in ("vq", "msvq", "kl"):
    configs = [f"{debug}tokenizer_{kind}.yaml"] if SMALL else [f"configs/tokenizer/{kind}_{DATASET}.yaml"]
    configs += [f"{overlay}tokenizer/{kind}_shapes.yaml"] if overlay else []
    tokenizers[kind], seconds = fit(configs, f"tokenizer_{kind}", *tokenizer_budget)
    print(f"tokenizer {kind}: {seconds:.0f} s")

# %% [markdown]
# ## Every family at the same budget
# Each family's config is used as shipped except for the budget (`max_steps`, `batch_size`), the tokenizer path,
# RAR's random-order anneal (kept at the same fractions of training as shipped), at small size no validation, and in
# the shapes32 tier the image size (VAR then takes its tokenizer's scales, which the multi-scale overlay rescales to
# the 8x8 grid). The learning-rate schedules follow `max_steps`.

# %%
FAMILIES = {  # name: (debug config, config without its `_<dataset>.yaml` ending, tokenizer)
    "LlamaGen": ("causal.yaml", "configs/causal/llamagen", "vq"),
    "RAR": ("rar.yaml", "configs/causal/rar", "vq"),
    "MaskGIT": ("masked.yaml", "configs/masked/maskgit", "vq"),
    "VAR": ("scale.yaml", "configs/scale/var", "msvq"),
    "MAR": ("flow_mar.yaml", "configs/flow/mar", "kl"),
    "FlowAR": ("flow_flowar.yaml", "configs/flow/flowar", "kl"),
}
if os.environ.get("LIT_AR_FAMILIES"):  # a subset, e.g. LIT_AR_FAMILIES=LlamaGen,VAR
    chosen = os.environ["LIT_AR_FAMILIES"].split(",")
    if unknown := sorted(set(chosen) - set(FAMILIES)):
        raise ValueError(f"LIT_AR_FAMILIES names {unknown}; accepted: {', '.join(FAMILIES)}")
    FAMILIES = {name: FAMILIES[name] for name in chosen}
budget = ["--trainer.max_steps", str(STEPS), "--data.batch_size", str(BATCH)]
budget += ["--trainer.limit_val_batches", "0"] if SMALL else []
tier_args = {name: [] for name in FAMILIES}
if "RAR" in FAMILIES and not SMALL:  # RAR's anneal at the shipped fractions of training (1/4 to 3/4), not its steps
    tier_args["RAR"] += ["--model.init_args.rar_anneal_start", str(STEPS // 4)]
    tier_args["RAR"] += ["--model.init_args.rar_anneal_end", str(3 * STEPS // 4)]
if TIER == "shapes32":
    tier_args = {name: [*args, "--data.image_size", "32"] for name, args in tier_args.items()}
    tier_args["VAR"] += ["--model.init_args.scales", "null"]
trained = {}
for name, (small_config, config, tokenizer) in FAMILIES.items():
    config = debug + small_config if SMALL else f"{config}_{DATASET}.yaml"
    tok = ["--model.init_args.tokenizer_ckpt", str(tokenizers[tokenizer]), *tier_args[name]]
    ckpt, seconds = fit([config], name, *tok, *budget)
    trained[name] = (config, tok, ckpt, seconds)
    print(f"{name}: {STEPS} steps of batch {BATCH} in {seconds:.0f} s")

# %% [markdown]
# ## Evaluation through the CLI
# `configs/eval/generator_shapes.yaml` is stacked on each family's config; its settings are overridden here only
# for the classifier path, the reference cache folder and (small size) the number of samples. Every record is a JSON
# file in the family's run folder, `eval/evaluation.json`.

# %%
E = "--model.init_args.evaluator.init_args."
eval_settings = [f"{E}extractor_ckpt", str(classifier_ckpt), f"{E}reference_dir", str(RUN_DIR / "references"),
                 f"{E}per_class", str(PER_CLASS)] + ([f"{E}batch_size", "40"] if SMALL else [])  # fmt: skip
records, models = {}, {}
for name, (config, tok, ckpt, _) in trained.items():
    cli = cli_main(["test", "--config", config, "--config", "configs/eval/generator_shapes.yaml", *tok, *QUIET,
                    "--trainer.logger.init_args.save_dir", str(RUN_DIR / name), *eval_settings,
                    "--ckpt_path", str(ckpt)])  # fmt: skip
    records[name] = EvaluationRecord.from_json(RUN_DIR / name / "eval" / "evaluation.json")
    models[name] = cli.model
    assert records[name] == cli.model.evaluator.last_record
    assert records[name].checkpoint["path"] == str(ckpt)

num_classes = next(iter(models.values())).hparams.num_classes
for name, record in records.items():  # class-balanced: exactly PER_CLASS samples of every class
    assert record.protocol["class_counts"] == [PER_CLASS] * num_classes, (name, record.protocol["class_counts"])
    assert record.num_samples == PER_CLASS * num_classes
first = next(iter(records))  # the floor and the printed protocol use the first family's data settings
print(json.dumps({k: v for k, v in records[first].protocol.items()}, sort_keys=True))

# %% [markdown]
# ## The real-vs-real floor
# The validation split, written as an npz of 8-bit images with its labels, evaluated by `NpzEvaluator` against the
# same training-split reference file (same data settings, same extractor, same precision/recall subsample). Its
# class accuracy is the classifier's accuracy on real images: the ceiling of the class accuracy column.
# On `digits` the validation split (90 images) is smaller than the classifier's 128 features, so the floor's FID is
# computed with `force=true` and is ill-conditioned: read only its precision, recall and class accuracy.

# %%
floor_config = trained[first][0]
data_settings = yaml.safe_load(Path(floor_config).read_text())["data"]
data_settings["image_size"] = models[first].hparams.image_size  # the tier's size, as the families were trained
val_npz = RUN_DIR / "floor" / "validation.npz"
val_npz.parent.mkdir(parents=True, exist_ok=True)
num_val = write_split_npz(ImageDataModule(**data_settings), "validation", val_npz)
data_args = [arg for key, value in data_settings.items() for arg in (f"--data.{key}", str(value))]
npz_settings = ["--model.init_args.samples_npz", str(val_npz), "--model.init_args.extractor_ckpt",
                str(classifier_ckpt), "--model.init_args.reference_dir", str(RUN_DIR / "references")]  # fmt: skip
feature_dim = models[first].evaluator.extractor.feature_dim
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
# ## Sampling speed
# Images per second of each family's `sample` with its `predict_kwargs` (CFG included where they set it), one
# batch after a warm-up batch: on the GPU when there is one, in bf16 autocast (the shapes configs' precision), else
# on the CPU in float32 (the debug configs').

# %%
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def draw(model, labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        return model.sample(labels, generator=torch.Generator(device).manual_seed(seed),
                            **(model.hparams.predict_kwargs or {}))  # fmt: skip


speed = {}
for name, model in models.items():
    model.to(device).eval()  # Lightning hands the model back on the CPU after `test`
    labels = torch.arange(SAMPLE_SPEED_BATCH, device=device) % num_classes
    draw(model, labels[:2])  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    draw(model, labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    speed[name] = SAMPLE_SPEED_BATCH / (time.perf_counter() - start)

# %% [markdown]
# ## The table
# FID and precision/recall are in the classifier's feature space, against the training split; lower FID is better.
# With few samples FID is biased upwards (the floor row, with about as many images, shows by how much).

# %%
rows = []
for name, record in records.items():
    m = record.metrics
    rows.append({"family": name, "FID": m["fid"], "precision": m["precision"], "recall": m["recall"],
                 "class acc.": m["class_accuracy"], "samples": record.num_samples, "images/s": speed[name],
                 "train s": trained[name][3], "steps x batch": f"{STEPS} x {BATCH}"})  # fmt: skip
m = floor.metrics
rows.append({"family": "real (validation split)", "FID": m["fid"], "precision": m["precision"], "recall": m["recall"],
             "class acc.": m["class_accuracy"], "samples": floor.num_samples, "images/s": None, "train s": None,
             "steps x batch": None})  # fmt: skip
table = pd.DataFrame(rows).set_index("family")
print(table.to_string(float_format=lambda x: f"{x:.3g}"))
table.to_csv(RUN_DIR / "family_comparison.csv")  # the README's table comes from this file
assert list(table.index) == [*FAMILIES, "real (validation split)"], "a row per family, then the floor"
assert table["FID"].notna().all() and (table["FID"] >= 0).all()
assert table[["precision", "recall", "class acc."]].stack().between(0, 1).all()
assert (table["images/s"].iloc[:-1] > 0).all()

# %% [markdown]
# ## Samples
# One row per class, two samples of each, every family with the same seed and its own `predict_kwargs`.

# %%
fig, axes = plt.subplots(1, len(models), figsize=(3 * len(models), 12))
for ax, (name, model) in zip(axes, models.items()):
    images = draw(model, torch.arange(num_classes, device=device).repeat_interleave(2))  # (2 * num_classes, C, H, W)
    size, channels = model.hparams.image_size, model.hparams.channels
    assert images.shape == (2 * num_classes, channels, size, size)
    ax.imshow(make_grid(images, nrow=2).permute(1, 2, 0))
    ax.set_title(name)
    ax.axis("off")
plt.tight_layout()
fig.savefig(RUN_DIR / "family_samples.png")
