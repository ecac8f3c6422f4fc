"""EMA of the weights: lit_ar.ema.WarmupEMA (Lightning's EMAWeightAveraging with a warm-up of its decay), on in
the flow configs, opt-in in the causal, masked and scale-wise shapes configs by the command line their comments
document. Exact resume with the EMA, and its state in the checkpoint, are tested in test_reliability.py
(RESUME_CASES `debug/causal+ema`)."""

import pytest
import torch
import yaml
from conftest import CONFIGS, checkpoint_for_config, config_for_run_path, run_dir_args
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn

from lit_ar.cli import cli_main
from lit_ar.ema import WarmupEMA, warmup_ema_update

OPT_IN = ["causal/llamagen_shapes", "causal/rar_shapes", "masked/maskgit_shapes", "scale/var_shapes"]
EMA_ARGS = ["--trainer.callbacks+=lit_ar.ema.WarmupEMA", "--trainer.callbacks.decay", "0.9999"]
FLOW = ["flow/mar_shapes", "flow/mar_digits", "flow/flowar_shapes", "flow/flowar_digits"]


def instantiate(name: str, tmp_path, checkpoints_root, extra: list[str]):
    config = CONFIGS / f"{name}.yaml"
    named = yaml.safe_load(config.read_text())["model"]["init_args"]["tokenizer_ckpt"]
    tokenizer = checkpoint_for_config(config_for_run_path(named), checkpoints_root)
    args = ["--config", str(config), *run_dir_args(tmp_path), "--model.init_args.tokenizer_ckpt", str(tokenizer)]
    return cli_main([*args, *extra], run=False)


@pytest.mark.parametrize("name", OPT_IN)
def test_ema_is_off_by_default_and_the_documented_flag_turns_it_on(name, tmp_path, checkpoints_root):
    text = (CONFIGS / f"{name}.yaml").read_text()
    assert " ".join(EMA_ARGS[:2]) in text, "the config's comment documents the flag tested here"
    plain = instantiate(name, tmp_path / "plain", checkpoints_root, [])
    assert not any(isinstance(c, EMAWeightAveraging) for c in plain.trainer.callbacks)
    ema = instantiate(name, tmp_path / "ema", checkpoints_root, EMA_ARGS)
    (callback,) = [c for c in ema.trainer.callbacks if isinstance(c, WarmupEMA)]
    assert ema.config.trainer.callbacks[-1].init_args.decay == 0.9999
    others = [type(c) for c in ema.trainer.callbacks if c is not callback]
    assert others == [type(c) for c in plain.trainer.callbacks], "the flag appends; the config's callbacks stay"


def averaged_after(updates: int, **average_fn) -> tuple[float, int]:
    """An AveragedModel of a module whose weight starts at 0 and is 1 from the first update on, and whose integer
    buffer counts the updates: (the averaged weight, the averaged counter) after `updates` updates."""
    module = torch.nn.Linear(1, 1, bias=False)
    module.register_buffer("count", torch.tensor(0))
    torch.nn.init.zeros_(module.weight)
    average = AveragedModel(module, use_buffers=True, **average_fn)
    average.update_parameters(module)  # the first update copies the weights: the start of training
    for _ in range(updates):
        with torch.no_grad():
            module.weight.fill_(1.0)
            module.count += 1
        average.update_parameters(module)
    return float(average.module.weight), int(average.module.count)


def test_warmup_ema_forgets_the_initial_weights_where_a_fixed_decay_keeps_them():
    fixed, _ = averaged_after(100, avg_fn=get_ema_avg_fn(0.999))  # Lightning's EMAWeightAveraging
    warm, count = averaged_after(100, multi_avg_fn=warmup_ema_update(0.999))
    assert fixed == pytest.approx(1 - 0.999**100, rel=1e-4)  # 90% of the initial weights are still in it
    keep = 1.0  # the initial weights' share: the product of the decays min(0.999, (1 + n) / (10 + n)), n = 1..100
    for n in range(1, 101):
        keep *= min(0.999, (1 + n) / (10 + n))
    assert keep < 1e-9 and warm == pytest.approx(1 - keep, abs=1e-6)
    assert count == 100, "integer buffers take the current value, not a rounded average"


@pytest.mark.parametrize("n,decay,moved", [(1, 0.9, 1 - 2 / 11), (5, 0.9, 1 - 6 / 15), (200, 0.9, 0.1), (80, 0.9, 0.1)])
def test_warmup_ema_moves_by_one_minus_the_warmed_up_decay(n, decay, moved):
    # one update from 0 towards 1 after n earlier updates moves 1 - min(decay, (1 + n) / (10 + n)) of the way
    averages, counters = [torch.zeros(3), torch.zeros(2, 2)], [torch.tensor(0), torch.tensor(0)]
    warmup_ema_update(decay)(averages, [torch.ones(3), torch.ones(2, 2)], torch.tensor(n))  # in place, as a group
    for average in averages:
        torch.testing.assert_close(average, torch.full_like(average, moved), rtol=1e-6, atol=1e-7)
    warmup_ema_update(decay)(counters, [torch.tensor(n), torch.tensor(n + 1)], torch.tensor(n))
    assert [int(c) for c in counters] == [n, n + 1], "an integer group takes the current values"


@pytest.mark.parametrize("decay", [1.0, -0.1, 1.5])
def test_warmup_ema_rejects_a_decay_outside_0_1(decay):
    with pytest.raises(ValueError, match=rf"WarmupEMA decay={decay}"):
        WarmupEMA(decay=decay)


@pytest.mark.parametrize("name", FLOW)
def test_flow_configs_average_with_the_warmup_ema(name, tmp_path, checkpoints_root):
    cli = instantiate(name, tmp_path, checkpoints_root, [])
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, EMAWeightAveraging)]
    assert isinstance(callback, WarmupEMA) and callback._kwargs["avg_fn"] is None
    assert callback._kwargs["multi_avg_fn"].__qualname__.startswith("warmup_ema_update")


def test_the_multi_tensor_update_equals_the_per_tensor_rule_on_a_transformer():
    # WarmupEMA's one multi-tensor lerp per group against the rule written per tensor (benchmarks/ema.py)
    from benchmarks.ema import warmup_per_tensor
    from lit_ar.models.causal_ar import CausalTransformer

    torch.manual_seed(0)
    model = CausalTransformer(vocab_size=32, grid_size=4, num_classes=3, dim=32, depth=2, n_heads=4)
    model.register_buffer("count", torch.tensor(0))
    multi = AveragedModel(model, use_buffers=True, multi_avg_fn=warmup_ema_update(0.99))
    per_tensor = AveragedModel(model, use_buffers=True, avg_fn=warmup_per_tensor(0.99))
    for _ in range(30):
        for average in (multi, per_tensor):
            average.update_parameters(model)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model.count += 1
    for (name, a), b in zip(multi.module.state_dict().items(), per_tensor.module.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert int(multi.module.count) == 29
