"""The generators' optimizer: AdamW with weight decay on matrices only, the frozen tokenizer left out; and it trains
under bf16-mixed with gradient clipping through the CLI, as every shipped GPU config does (Lightning refuses to
clip the gradients of a fused optimizer under its mixed-precision plugin, so a fused AdamW would break this)."""

from conftest import CONFIGS, run_dir_args

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
