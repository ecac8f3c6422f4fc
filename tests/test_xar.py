"""xAR (lit_ar/models/xar.py, lit_ar/methods/xar.py): the entity units partition the grid exactly (the token unit is
the raster layout of causal continuous AR, cells and subsamples the layouts they name); the block-causal mask lets an
entity see exactly the earlier ones; cached entity-by-entity sampling equals the full forward; noisy context with the
earlier entities at t = 1 equals clean teacher forcing; flow_steps calls per entity; seeded; bad settings refused by
name; the CLI trains (bf16-mixed, finite) and samples."""

import numpy as np
import pytest
import torch

from lit_ar.cli import cli_main
from lit_ar.draws import Draws
from lit_ar.methods.xar import ENTITY_UNITS, XAR, XARSampling, block_causal, clean_context_mask, entities
from lit_ar.models.xar import XARTransformer
from lit_ar.systems.xar import XARSystem
from tests.conftest import CONFIGS, checkpoint_for_config, config_for_run_path, logged_scalars, run_dir_args
from tests.test_methods import randomised

D, G, NC = 4, 4, 3
UNITS = [("token", 1), ("cell", 2), ("subsample", 2), ("image", 1)]


def tiny(dtype=torch.float64, class_token: bool = False) -> XARTransformer:
    return randomised(XARTransformer(D, G, NC, dim=32, depth=2, n_heads=2, class_token=class_token)).to(dtype)


def sample(core, unit, size, labels, seed=0, **settings):
    s = XARSampling(**settings)
    return XAR(unit, size).sample(core, None, labels, s.guidance(NC), s, torch.Generator().manual_seed(seed))


def test_the_entity_units_partition_the_grid():
    assert entities("token", G).tolist() == [[i] for i in range(16)]  # raster, one token each: causal continuous AR
    assert entities("image", G).tolist() == [list(range(16))]
    assert entities("cell", G, 2).tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    assert entities("subsample", G, 2).tolist() == [[0, 2, 8, 10], [1, 3, 9, 11], [4, 6, 12, 14], [5, 7, 13, 15]]
    for unit in ENTITY_UNITS:
        for size in (1, 2, 4, 8):
            if unit in ("cell", "subsample") and 16 % size:
                continue
            e = entities(unit, 16, size)
            assert torch.equal(e.flatten().sort().values, torch.arange(256)), (unit, size)
    with pytest.raises(ValueError, match="entity_size=3 must be >= 1 and divide the token grid side 4"):
        entities("cell", G, 3)
    with pytest.raises(ValueError, match="entities='row' is not known; known units: token, cell, subsample, image"):
        entities("row", G)


@pytest.mark.parametrize("class_token", [False, True])
def test_an_entity_sees_exactly_itself_and_the_entities_before_it(class_token):
    core = tiny(class_token=class_token)
    order = entities("cell", G, 2).flatten()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 16, D, generator=g, dtype=torch.float64), torch.rand(2, 16, generator=g, dtype=torch.float64)
    labels, mask = torch.tensor([0, 1]), block_causal(4, 4, "cpu")
    with torch.no_grad():
        a = core(x, order, labels, t, mask)
        changed = x.clone()
        changed[:, 9] += 1.0  # a token of entity 2 (its second)
        b = core(changed, order, labels, t, mask)
    assert torch.equal(a[:, :8], b[:, :8]) and not torch.equal(a[:, 8:12], b[:, 8:12])
    assert not torch.equal(a[:, 12:], b[:, 12:])  # the entity after sees it too


@pytest.mark.parametrize("unit, size", UNITS)
@pytest.mark.parametrize("class_token", [False, True])
def test_cached_entity_by_entity_sampling_equals_the_full_forward(unit, size, class_token):
    core, labels = tiny(class_token=class_token), torch.tensor([0, 1, 2])
    for sampler in ("euler", "heun"):
        kw = dict(cfg=2.0, cfg_schedule="linear", flow_steps=3, sampler=sampler)
        cached = sample(core, unit, size, labels, **kw)
        torch.testing.assert_close(cached, sample(core, unit, size, labels, use_cache=False, **kw), rtol=1e-5,
                                   atol=1e-5)  # fmt: skip
        assert cached.shape == (3, 16, D)


def test_noisy_context_with_clean_earlier_entities_is_clean_teacher_forcing():
    """The noise-off parity: in xAR's noisy-context sequence with every earlier entity at t = 1 (clean), the last
    entity's velocity equals its velocity in the clean-teacher-forcing sequence [clean 1 .. E-1] [noisy 1 .. E]."""
    core = tiny()
    E, n = 4, 4
    order = entities("cell", G, 2).flatten()
    g = torch.Generator().manual_seed(1)
    x, xt = (torch.randn(2, 16, D, generator=g, dtype=torch.float64) for _ in range(2))
    t_last = torch.rand(2, 1, generator=g, dtype=torch.float64).expand(2, n)
    labels = torch.tensor([2, 0])
    with torch.no_grad():
        noisy = torch.cat([x[:, :12], xt[:, 12:]], 1)
        times = torch.cat([torch.ones(2, 12, dtype=torch.float64), t_last], 1)
        ncl = core(noisy, order, labels, times, block_causal(E, n, "cpu"))[:, 12:]
        seq = torch.cat([x[:, :12], noisy], 1)
        clean_times = torch.cat([torch.ones(2, 12, dtype=torch.float64), torch.rand(2, 12, generator=g,
                                 dtype=torch.float64), t_last], 1)  # fmt: skip  # the earlier noisy ones: any time
        clean = core(seq, torch.cat([order[:12], order]), labels, clean_times, clean_context_mask(E, n, "cpu"))[:, -n:]
    torch.testing.assert_close(ncl, clean)


def test_flow_steps_calls_per_entity_and_seeded_draws():
    core = tiny(torch.float32)
    calls = []
    handle = core.blocks[0].register_forward_hook(lambda *_: calls.append(1))
    sample(core, "cell", 2, torch.tensor([0, 1]), cfg=2.0, flow_steps=5)
    handle.remove()
    assert len(calls) == 4 * 5
    labels = torch.tensor([0, 1])
    first, again, other = (sample(core, "cell", 2, labels, seed, flow_steps=2) for seed in (3, 3, 4))
    assert torch.equal(first, again) and not torch.equal(first, other)
    tokens = torch.randn(4, 16, D, generator=torch.Generator().manual_seed(0))
    for context in ("noisy", "clean"):
        method = XAR("cell", 2, context)
        loss = method.loss(core, None, tokens, torch.tensor([0, 1, 2, 0]), Draws(0))["loss"]
        assert torch.equal(loss, method.loss(core, None, tokens, torch.tensor([0, 1, 2, 0]), Draws(0))["loss"])
        assert not torch.equal(loss, method.loss(core, None, tokens, torch.tensor([0, 1, 2, 0]), Draws(1))["loss"])


def test_bad_settings_are_refused_by_name():
    common = dict(token_dim=D, grid_size=G, num_classes=NC, dim=32, depth=2, n_heads=2)
    with pytest.raises(ValueError, match=r"model.init_args.entity_size=3 must be >= 1 and divide the token grid"):
        XARSystem(**common, entity="cell", entity_size=3)
    with pytest.raises(ValueError, match=r"model.init_args.entity='row' is not known; known units: token, cell"):
        XARSystem(**common, entity="row")
    with pytest.raises(ValueError, match=r"context='both' is not known"):
        XARSystem(**common, context="both")
    with pytest.raises(ValueError, match=r"steps=4: xAR takes one AR step per entity; set flow_steps"):
        XARSampling(steps=4)
    with pytest.raises(ValueError, match=r"sampler='ddpm' is the diffusion head's"):
        XARSampling(sampler="ddpm")


def test_lit_ar_fits_in_bf16_and_predicts_xar(checkpoints_root, tmp_path):
    kl = checkpoint_for_config(config_for_run_path("runs/debug/tokenizer_kl/checkpoints/last.ckpt"), checkpoints_root)
    common = ["--config", str(CONFIGS / "debug" / "xar.yaml"), *run_dir_args(tmp_path),
              "--model.init_args.tokenizer_ckpt", str(kl)]  # fmt: skip
    cli = cli_main(["fit", *common, "--trainer.max_steps", "12", "--trainer.limit_val_batches", "1",
                    "--trainer.precision", "bf16-mixed", "--trainer.val_check_interval", "6"])  # fmt: skip
    assert isinstance(cli.model, XARSystem)
    losses = logged_scalars(tmp_path, "train/loss")
    assert len(losses) == 6 and all(np.isfinite(losses)) and all(np.isfinite(logged_scalars(tmp_path, "val/loss")))
    cli_main(["predict", *common, "--ckpt_path", str(tmp_path / "checkpoints" / "last.ckpt")])
    images = np.load(tmp_path / "samples.npz")["images"]
    assert images.shape[1:] == (16, 16, 3) and np.isfinite(images).all()
