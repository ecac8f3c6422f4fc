"""A test double of a generator family, for testing the evaluation protocol and the FID callback mechanics.

`ShapesGenerator.sample` draws real `shapes` images of the asked classes with the given generator (so it is seeded
exactly like a real family), scaled by a trainable parameter and with optional Gaussian noise. Importable by the
`lit_ar` subprocess as `eval_doubles.ShapesGenerator` with `tests/` on PYTHONPATH.
"""

import lightning as L
import torch
from torch import nn

from lit_ar.data.builtin import render_shape
from lit_ar.evaluation import GeneratorEvaluator


class ShapesGenerator(L.LightningModule):
    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 16,
        channels: int = 3,
        noise: float = 0.0,
        lr: float = 0.25,
        evaluator: GeneratorEvaluator | None = None,
    ):
        """
        Args:
            num_classes: Linked from the data.
            image_size: Linked from the data.
            channels: Linked from the data (3: shapes are RGB).
            noise: Std of the Gaussian noise added to every sample (in [-1, 1] units).
            lr: SGD learning rate of `scale` (the loss scale^2 halves it every step at 0.25).
            evaluator: The evaluation protocol run at `lit_ar test`.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["evaluator"])
        self.evaluator = evaluator
        self.scale = nn.Parameter(torch.tensor(1.0))  # trained, so averaged (EMA) and current weights differ
        self.sampled_scales: list[float] = []  # the value of `scale` each `sample` call saw
        self.step_scales: list[float] = []  # the value of `scale` at each training step

    def sample(self, labels, cfg=1.0, temperature=1.0, top_k=None, top_p=None, generator=None, noise=None):
        size = self.hparams.image_size
        images = torch.stack([render_shape(int(y), size, generator) for y in labels.cpu()])  # (B, 3, S, S) uint8
        x = images.float().to(self.device) / 127.5 - 1.0
        sigma = self.hparams.noise if noise is None else noise
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device)
        self.sampled_scales.append(float(self.scale.detach()))
        return (x * self.scale).clamp(-1, 1)

    def training_step(self, batch, batch_idx):
        self.step_scales.append(float(self.scale.detach()))
        return self.scale**2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def test_step(self, batch, batch_idx) -> None:
        pass

    def on_test_epoch_end(self) -> None:
        self.evaluator.run(self)
