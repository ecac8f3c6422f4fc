"""EMA of the weights through Lightning's EMAWeightAveraging: opt-in in the causal, masked and scale-wise shapes
configs by the command line their comments document (the flow configs have it on). Exact resume with EMA, and the
EMA state in the checkpoint, are tested in test_reliability.py (RESUME_CASES `debug/causal+ema`)."""

import pytest
import yaml
from conftest import CONFIGS, checkpoint_for_config, config_for_run_path, run_dir_args
from lightning.pytorch.callbacks import EMAWeightAveraging

from lit_ar.cli import cli_main

OPT_IN = ["causal/llamagen_shapes", "causal/rar_shapes", "masked/maskgit_shapes", "scale/var_shapes"]
EMA_ARGS = ["--trainer.callbacks+=lightning.pytorch.callbacks.EMAWeightAveraging", "--trainer.callbacks.decay",
            "0.9999"]  # fmt: skip


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
    (callback,) = [c for c in ema.trainer.callbacks if isinstance(c, EMAWeightAveraging)]
    assert ema.config.trainer.callbacks[-1].init_args.decay == 0.9999
    others = [type(c) for c in ema.trainer.callbacks if c is not callback]
    assert others == [type(c) for c in plain.trainer.callbacks], "the flag appends; the config's callbacks stay"
