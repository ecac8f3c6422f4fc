"""Speculative decoding with LANTERN's trained drafter (lit_ar/models/drafter.py, lit_ar/methods/drafter.py,
`decoding: speculative`): a window of one is sequential decoding draw for draw; greedy gives the greedy raster tokens;
at temperature 1 the samples follow the model's exact distribution (enumerated); LANTERN's delta 0 is strict
acceptance draw for draw; the drafter's loss never reaches the model's weights, and a trained drafter gets more tokens
accepted per call than an untrained one; bad settings are refused by name; the CLI trains a drafter beside the model
or alone (the model frozen) and samples with it."""

import numpy as np
import pytest
import torch

from lit_ar.cli import cli_main
from lit_ar.methods.drafter import drafter_loss
from lit_ar.methods.raster import RasterSampling
from lit_ar.models.drafter import Drafter
from lit_ar.systems.causal_ar import CausalARSystem
from tests.conftest import checkpoint_for_config, run_dir_args
from tests.test_causal_ar import DEBUG
from tests.test_methods import randomised
from tests.test_speculative_jacobi import (
    G_ENUM,
    N_SAMPLES,
    V_ENUM,
    chi_square,
    chi_square_critical,
    exact_distribution,
    neighbours_of,
    tiny,
)

LABELS = torch.tensor([0, 1, 2, 0, 1, 2])


def sample(method, core, head, drafter, labels=LABELS, seed=0, stats=None, **settings):
    s = RasterSampling(**settings)
    return method.sample(core, head, labels, s.guidance(3), s, torch.Generator().manual_seed(seed), stats=stats,
                         drafter=drafter, neighbours=neighbours_of(core))  # fmt: skip


def with_drafter(**kw):
    core, head, method = tiny(**kw)
    return core, head, method, randomised(Drafter(core.dim, 2))


@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_a_window_of_one_is_sequential_decoding_draw_for_draw(cfg):
    core, head, method, drafter = with_drafter()
    stats = {}
    out = sample(method, core, head, drafter, cfg=cfg, top_k=8, stats=stats, decoding="speculative", window=1)
    assert torch.equal(out, sample(method, core, head, drafter, cfg=cfg, top_k=8))
    assert stats["model_calls"].tolist() == [16] * 6


@pytest.mark.parametrize("window", [2, 6, 16])
def test_greedy_speculative_decoding_gives_the_greedy_raster_tokens(window):
    core, head, method, drafter = with_drafter()
    for cfg in (1.0, 3.0):
        greedy = sample(method, core, head, drafter, cfg=cfg, cfg_schedule="linear", top_k=1)
        stats = {}
        out = sample(method, core, head, drafter, seed=5, stats=stats, cfg=cfg, cfg_schedule="linear", top_k=1,
                     decoding="speculative", window=window)  # fmt: skip
        assert torch.equal(out, greedy)
        assert bool((stats["model_calls"] <= 16).all())


def test_speculative_decoding_keeps_the_models_distribution():
    """10,000 samples at temperature 1 with a random drafter against the exact distribution of a 2x2 grid over 3
    tokens (81 sequences): the chi-square statistic stays below its 1e-4 quantile (the wrong-rule control is SJD's
    test, which shares the acceptance)."""
    core, head, method = tiny(V_ENUM, G_ENUM, std=0.3)
    drafter = randomised(Drafter(core.dim, 2))
    p = exact_distribution(core)
    labels = torch.zeros(N_SAMPLES, dtype=torch.long)
    stats = {}
    s = RasterSampling(decoding="speculative", window=3)
    out = method.sample(core, head, labels, s.guidance(3), s, torch.Generator().manual_seed(0), stats=stats,
                        drafter=drafter)  # fmt: skip
    assert chi_square(out, p) < chi_square_critical(len(p) - 1)
    assert float(stats["model_calls"].float().mean()) < G_ENUM**2


def test_lantern_with_delta_zero_is_strict_acceptance_draw_for_draw():
    core, head, method, drafter = with_drafter()
    strict = sample(method, core, head, drafter, cfg=2.0, decoding="speculative", window=4)
    lantern = sample(method, core, head, drafter, cfg=2.0, decoding="speculative", window=4, acceptance="lantern",
                     lantern_k=4, lantern_delta=0.0)  # fmt: skip
    assert torch.equal(strict, lantern)


def test_a_trained_drafter_is_accepted_more_and_its_loss_never_reaches_the_model():
    core, head, method, drafter = with_drafter()
    tokens = sample(method, core, head, drafter, labels=torch.arange(3).repeat(22), top_k=1)  # the model's own
    labels = torch.arange(3).repeat(22)
    drafter_loss(core, drafter, tokens, labels)["drafter_loss"].backward()
    assert all(p.grad is None for p in core.parameters())
    assert all(p.grad is not None for p in drafter.parameters())

    def calls(d) -> float:
        stats = {}
        sample(method, core, head, d, top_k=1, decoding="speculative", window=6, stats=stats)
        return float(stats["model_calls"].float().mean())

    untrained = calls(drafter)
    optimizer = torch.optim.Adam(drafter.parameters(), lr=3e-3)
    for _ in range(150):
        optimizer.zero_grad()
        drafter_loss(core, drafter, tokens, labels)["drafter_loss"].backward()
        optimizer.step()
    assert drafter_loss(core, drafter, tokens, labels)["drafter_token_acc"] > 0.5
    assert calls(drafter) < untrained


def test_bad_drafter_settings_are_refused_by_name():
    core, head, method, _ = with_drafter()
    with pytest.raises(ValueError, match=r"decoding='speculative' drafts with a trained drafter, and this model has "
                                         r"none: train one with model.init_args.drafter=true"):  # fmt: skip
        sample(method, core, head, None, decoding="speculative")
    common = dict(vocab_size=16, grid_size=4, num_classes=3)
    with pytest.raises(ValueError, match=r"drafter_only=true trains the drafter alone: set model.init_args.drafter"):
        CausalARSystem(**common, drafter_only=True)
    with pytest.raises(ValueError, match=r"drafter=true drafts in raster order .*order='random' is not raster"):
        CausalARSystem(**common, drafter=True, order="random")
    with pytest.raises(ValueError, match=r"decoding='speculative' verifies its drafts on the KV cache"):
        RasterSampling(decoding="speculative", use_cache=False)


def test_lit_ar_trains_a_drafter_beside_the_model_then_alone_and_samples_with_it(checkpoints_root, debug_tokenizer,
                                                                                   tmp_path):  # fmt: skip
    common = ["--config", str(DEBUG), "--model.init_args.tokenizer_ckpt", str(debug_tokenizer),
              "--trainer.limit_val_batches", "1"]  # fmt: skip
    both = tmp_path / "both"
    cli = cli_main(["fit", *common, *run_dir_args(both), "--trainer.max_steps", "8", "--model.init_args.drafter",
                    "true"])  # fmt: skip
    assert cli.model.drafter is not None and (both / "checkpoints" / "last.ckpt").exists()
    # alone, from a run trained without a drafter (LANTERN's recipe): the model frozen, the drafter starting fresh
    ckpt = checkpoint_for_config(DEBUG, checkpoints_root, train=True,
                                 extra=["--model.init_args.tokenizer_ckpt", str(debug_tokenizer)])  # fmt: skip
    alone = tmp_path / "alone"
    cli_main(["fit", *common, *run_dir_args(alone), "--trainer.max_steps", "4", "--model.init_args.drafter", "true",
              "--model.init_args.drafter_only", "true", "--model.init_args.init_weights", str(ckpt)])  # fmt: skip
    before = torch.load(ckpt, weights_only=True)["state_dict"]
    after = torch.load(alone / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(before[k], v) for k, v in after.items() if k.startswith("model."))  # frozen
    assert not any(k.startswith("drafter.") for k in before) and any(k.startswith("drafter.") for k in after)
    cli_main(["predict", *common, *run_dir_args(alone), "--model.init_args.drafter", "true", "--ckpt_path",
              str(alone / "checkpoints" / "last.ckpt"), "--model.init_args.predict_kwargs.decoding", "speculative",
              "--model.init_args.predict_kwargs.window", "4"])  # fmt: skip
    assert np.load(alone / "samples.npz")["images"].shape[0] > 0
