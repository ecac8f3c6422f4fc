# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 01 — Data and the CLI
#
# lit_ar has one data module for every family and one command line. This tutorial
# 1. loads each built-in offline dataset and shows a grid,
# 2. trains the classifier (lit_ar's feature extractor for FID and class accuracy) through `cli_main`,
#    the same function behind `lit_ar fit`,
# 3. reads the TensorBoard logs back and plots the curves.
#
# Set `LIT_AR_SMALL=1` to run it in seconds (the tests do).

# %%
import os
import tempfile

import matplotlib.pyplot as plt
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_ar.callbacks import make_grid
from lit_ar.cli import cli_main
from lit_ar.data import SHAPE_CLASSES, ImageDataModule

SMALL = os.environ.get("LIT_AR_SMALL", "0") == "1"
RUN_DIR = os.environ.get("LIT_AR_RUN_DIR") or tempfile.mkdtemp(prefix="lit_ar_tutorial01_")

# %% [markdown]
# ## The built-in datasets
# `shapes` is procedural: ten classes of coloured shapes with random position, size, rotation and colours,
# drawn at any resolution from a seed. `digits` is scikit-learn's real 8x8 handwritten digits, shipped with
# lit_ar and resized on load. Batches are `{"image": (B, C, H, W) in [-1, 1], "label": (B,)}`.

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 5))
for ax, (name, size, channels) in zip(axes, [("shapes", 64, 3), ("digits", 32, 1)]):
    dm = ImageDataModule(dataset=name, image_size=size, channels=channels, batch_size=32, num_train=64, num_val=16)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    print(name, {k: tuple(v.shape) for k, v in batch.items()}, "classes:", dm.num_classes)
    ax.imshow(make_grid(batch["image"], nrow=8).permute(1, 2, 0))
    ax.set_title(f"{name}: labels {batch['label'][:8].tolist()}...")
    ax.axis("off")
print("shape classes:", SHAPE_CLASSES)

# %% [markdown]
# ## Train the classifier through the CLI
# `cli_main([...])` takes exactly the arguments of `lit_ar`. The config pins a seed and a run folder; here the
# run folder is moved to a temporary directory.

# %%
config = "configs/debug/classifier.yaml" if SMALL else "configs/classifier/shapes.yaml"
cli = cli_main(
    [
        "fit",
        "--config",
        config,
        "--trainer.logger.init_args.save_dir",
        RUN_DIR,
        "--trainer.enable_progress_bar",
        "false",
    ]
    + (["--trainer.max_steps", "30", "--trainer.val_check_interval", "10"] if SMALL else [])
)
print("validation accuracy:", float(cli.trainer.callback_metrics["val/acc"]))

# %% [markdown]
# ## Read the TensorBoard logs back
# The same files `tensorboard --logdir` shows.

# %%
events = EventAccumulator(RUN_DIR).Reload()
print(events.Tags()["scalars"])
loss = events.Scalars("train/loss")
acc = events.Scalars("val/acc")
fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3))
a1.plot([e.step for e in loss], [e.value for e in loss])
a1.set_title("train/loss")
a2.plot([e.step for e in acc], [e.value for e in acc], marker="o")
a2.set_title("val/acc")
assert loss[-1].value < loss[0].value

# %% [markdown]
# The checkpoint in `RUN_DIR/checkpoints/last.ckpt` loads with `ClassifierSystem.load_from_checkpoint`; its
# `model.features(images)` is the feature space lit_ar's FID uses on built-in and custom data.

# %%
from lit_ar.systems import ClassifierSystem

clf = ClassifierSystem.load_from_checkpoint(os.path.join(RUN_DIR, "checkpoints", "last.ckpt"), weights_only=True)
images = torch.stack([cli.datamodule.val_set[i]["image"] for i in range(4)])  # (4, 3, H, W)
with torch.no_grad():
    feats = clf.model.features(images.to(clf.device))
print("features:", tuple(feats.shape))
assert feats.shape == (4, clf.hparams.feature_dim)
