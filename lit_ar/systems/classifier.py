"""ClassifierSystem: trains the CNN that later serves as lit_ar's domain feature extractor."""

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics

from lit_ar.models.classifier import CNNClassifier
from lit_ar.systems.lr_schedule import warmup_cosine


class ClassifierSystem(L.LightningModule):
    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 64,
        channels: int = 3,
        width: int = 32,
        num_stages: int = 4,
        feature_dim: int = 128,
        lr: float = 2e-3,
        weight_decay: float = 0.05,
        label_smoothing: float = 0.0,
        warmup_steps: int = 100,
        compile: bool = False,
    ):
        """
        Args:
            num_classes: Number of classes (linked from `data.num_classes`).
            image_size: Input side (linked from `data.image_size`); at least 2^(num_stages - 1).
            channels: Input channels (linked from `data.channels`).
            width: Channels of the first stage; each later stage doubles it.
            num_stages: Resolution stages; each after the first halves the resolution.
            feature_dim: Width of the penultimate features used for FID and precision/recall.
            lr: Peak AdamW learning rate.
            weight_decay: AdamW weight decay.
            label_smoothing: Cross-entropy label smoothing.
            warmup_steps: Linear warm-up steps before cosine decay to the end of training.
            compile: Compile each stage in place with torch.compile.
        """
        super().__init__()
        self.save_hyperparameters()
        self.model = CNNClassifier(num_classes, channels, width, num_stages, feature_dim)
        if image_size < self.model.min_image_size:
            raise ValueError(
                f"model.image_size={image_size} is below what this classifier allows: with "
                f"num_stages={num_stages} images must be at least {self.model.min_image_size} pixels"
            )
        if compile:
            for stage in self.model.stages:
                stage.compile()
        self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self.model(batch["image"])
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.hparams.label_smoothing)
        self.train_acc(logits, batch["label"])
        # sync_dist: the logged loss is the global-batch loss, the same figure on 1 or N devices
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        self.log("train/acc", self.train_acc, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self.model(batch["image"])
        self.val_acc(logits, batch["label"])
        self.log("val/loss", F.cross_entropy(logits, batch["label"]), sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        sched = warmup_cosine(opt, self.hparams.warmup_steps, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
