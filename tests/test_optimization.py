"""The shared optimizer: AdamW fused where it can be (the same steps as the for-each kernel, one pass instead of a
dozen), never under fp16's gradient scaler, where Lightning would refuse to clip its gradients."""

import lightning as L
import torch
from lightning.pytorch.plugins import MixedPrecision

from lit_ar.data import ImageDataModule
from lit_ar.systems.classifier import ClassifierSystem
from lit_ar.systems.optimization import adamw


def two_groups(seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    matrices = [torch.nn.Parameter(torch.randn(16, 8, generator=g)) for _ in range(2)]
    vectors = [torch.nn.Parameter(torch.randn(8, generator=g))]
    return [{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0}]


def test_fused_adamw_takes_the_same_steps_as_the_for_each_kernel():
    fused_groups, foreach_groups = two_groups(0), two_groups(0)
    fused = adamw(fused_groups, lr=1e-2, betas=(0.9, 0.95))
    foreach = torch.optim.AdamW(foreach_groups, lr=1e-2, betas=(0.9, 0.95), foreach=True)
    assert fused.defaults["fused"] is True and fused.param_groups[0]["weight_decay"] == 0.1
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        for a, b in zip(fused_groups, foreach_groups):
            for p, q in zip(a["params"], b["params"]):
                p.grad = torch.randn(p.shape, generator=g)
                q.grad = p.grad.clone()
        fused.step(), foreach.step()
    for a, b, start in zip(fused_groups, foreach_groups, two_groups(0)):
        for p, q, p0 in zip(a["params"], b["params"], start["params"]):
            torch.testing.assert_close(p, q)
            assert (p - p0).abs().mean() > 1e-2, "the steps moved the weights"


def test_adamw_is_not_fused_under_a_grad_scaler():
    assert not adamw(two_groups(0), lr=1e-3, grad_scaler=True).defaults["fused"]


def fit_classifier(tmp_path, **trainer_kwargs) -> L.Trainer:
    trainer = L.Trainer(max_steps=3, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, enable_checkpointing=False,
                        **trainer_kwargs)  # fmt: skip
    dm = ImageDataModule(image_size=8, num_train=48, batch_size=16)
    trainer.fit(ClassifierSystem(image_size=8, width=8, num_stages=2, feature_dim=16), dm)
    return trainer


def test_a_system_trains_with_the_fused_kernel_and_clips_gradients_under_fp16_mixed(tmp_path):
    assert fit_classifier(tmp_path, gradient_clip_val=1.0).optimizers[0].defaults["fused"] is True
    # fp16-mixed with clipping: a fused AdamW here makes Lightning raise "does not allow for gradient clipping"
    scaler = torch.amp.GradScaler("cpu")
    trainer = fit_classifier(tmp_path, gradient_clip_val=1.0, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    assert not trainer.optimizers[0].defaults["fused"] and trainer.global_step == 3
