"""The generators' optimizer: AdamW with weight decay on matrices only, the frozen tokenizer left out, fused unless a
grad scaler is in use; and it trains under bf16-mixed with gradient clipping through the CLI, as every shipped GPU
config does (Lightning refuses to clip a fused optimizer's gradients under its mixed-precision plugin unless the
optimizer says it does not unscale them itself)."""

from types import SimpleNamespace

import lightning as L
import torch
from conftest import CONFIGS, run_dir_args
from lightning.pytorch.plugins.precision import MixedPrecision

from lit_ar.cli import cli_main
from lit_ar.systems.causal_ar import CausalARSystem


def test_make_optimizer_decays_matrices_only_and_leaves_the_tokenizer_out(debug_tokenizer):
    system = CausalARSystem(tokenizer_ckpt=str(debug_tokenizer), preset="GPT-nano", weight_decay=0.05,
                            image_size=16)  # fmt: skip
    decay, no_decay = system.make_optimizer().param_groups
    trainable = {id(p) for n, p in system.named_parameters() if not n.startswith("tokenizer.")}
    assert {id(p) for p in decay["params"] + no_decay["params"]} == trainable
    assert all(p.ndim >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.05
    assert all(p.ndim < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert not any(p.requires_grad for p in system.tokenizer.parameters())


def test_a_generator_trains_under_bf16_mixed_with_gradient_clipping(debug_tokenizer, tmp_path):
    cli = cli_main(["fit", "--config", str(CONFIGS / "debug" / "causal.yaml"), *run_dir_args(tmp_path),
                    "--model.init_args.tokenizer_ckpt", str(debug_tokenizer), "--trainer.precision", "bf16-mixed",
                    "--trainer.gradient_clip_val", "1.0", "--trainer.max_steps", "3"])  # fmt: skip
    assert cli.trainer.global_step == 3
    assert cli.trainer.optimizers[0].defaults["fused"]


def test_the_optimizer_is_fused_without_a_grad_scaler_and_clipping_under_bf16_mixed_is_exact(debug_tokenizer):
    system = CausalARSystem(tokenizer_ckpt=str(debug_tokenizer), preset="GPT-nano", image_size=16)
    opt = system.make_optimizer()
    assert opt.defaults["fused"] and not opt._step_supports_amp_scaling
    # Lightning's bf16-mixed plugin clips the fused optimizer's gradients to the asked-for norm
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False, enable_checkpointing=False)
    system._trainer = trainer
    params = [p for group in opt.param_groups for p in group["params"]]
    for p in params:
        p.grad = torch.full_like(p, 1.0)
    trainer.precision_plugin.clip_gradients(opt, clip_val=0.5, gradient_clip_algorithm="norm")
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    torch.testing.assert_close(total, torch.tensor(0.5), rtol=1e-4, atol=1e-4)
    # with a grad scaler (fp16-mixed, GPU only in Lightning) the optimizer is the unfused one, which the scaler
    # unscales before clipping
    fp16 = MixedPrecision("16-mixed", "cuda", scaler=torch.amp.GradScaler("cpu"))
    system._trainer = SimpleNamespace(precision_plugin=fp16)
    assert not system.make_optimizer().defaults["fused"]
