"""Sampling arithmetic: filters, seeded sampling, CFG and mask schedules."""

import pytest
import torch

from lit_ar.guidance import CFG_SCHEDULES, cfg_scale, check_cfg_schedule
from lit_ar.sampling import (
    MASK_SCHEDULES,
    check_sampling_args,
    filter_logits,
    mask_ratio,
    sample_logits,
    tokens_to_reveal,
)


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=1.0)).all()
    assert torch.isfinite(filter_logits(logits, top_k=1, top_p=0.99)).sum() == 1


def test_seeded_sampling_is_reproducible_and_follows_the_distribution():
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1])).expand(20000, 3)
    a = sample_logits(logits, generator=torch.Generator().manual_seed(1))
    b = sample_logits(logits, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    freq = torch.bincount(a, minlength=3).float() / len(a)
    torch.testing.assert_close(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.015, rtol=0)
    cold = sample_logits(logits[:100], temperature=1e-4, generator=torch.Generator().manual_seed(0))
    assert (cold == 0).all()


def test_cfg_schedules():
    assert cfg_scale("constant", 3.0, 0.2) == 3.0
    assert cfg_scale("linear", 3.0, 0.0) == 1.0 and cfg_scale("linear", 3.0, 1.0) == 3.0
    assert cfg_scale("interval", 3.0, 0.1, interval=(0.2, 0.8)) == 1.0
    assert cfg_scale("interval", 3.0, 0.5, interval=(0.2, 0.8)) == 3.0
    assert cfg_scale("power_cosine", 3.0, 0.0) == 1.0 and abs(cfg_scale("power_cosine", 3.0, 1.0) - 3.0) < 1e-9
    with pytest.raises(ValueError, match=r"cfg_schedule='cubic' is not known; known schedules: \('constant'"):
        check_cfg_schedule("cubic")
    with pytest.raises(ValueError, match=r"cfg_interval=\(0.5, 0.2\)"):
        check_cfg_schedule("interval", (0.5, 0.2))


@pytest.mark.parametrize("schedule", MASK_SCHEDULES)
def test_mask_schedules_run_from_one_to_zero_monotonically(schedule):
    r = torch.linspace(0, 1, 101)
    m = mask_ratio(schedule, r)
    assert float(m[0]) == pytest.approx(1.0) and float(m[-1]) == pytest.approx(0.0, abs=1e-12)
    assert (m[1:] <= m[:-1] + 1e-12).all()


@pytest.mark.parametrize("schedule", MASK_SCHEDULES)
@pytest.mark.parametrize("steps", [1, 4, 8, 16])
def test_reveal_counts_cover_all_tokens(schedule, steps):
    counts = tokens_to_reveal(schedule, 16, steps)
    assert len(counts) == steps and sum(counts) == 16 and min(counts) >= 1
    assert tokens_to_reveal(schedule, 16, 16) == [1] * 16


def test_bad_sampling_arguments_are_named():
    with pytest.raises(ValueError, match=r"top_p=1.5 must be in \(0, 1\]"):
        check_sampling_args(top_p=1.5)
    with pytest.raises(ValueError, match=r"top_k=0 must be >= 1"):
        check_sampling_args(top_k=0)
    with pytest.raises(ValueError, match=r"temperature=0 must be > 0"):
        check_sampling_args(temperature=0)
    with pytest.raises(ValueError, match=r"steps=0 must be between 1 and the number of tokens \(16\)"):
        tokens_to_reveal("cosine", 16, 0)
    with pytest.raises(ValueError, match=r"steps=17"):
        tokens_to_reveal("cosine", 16, 17)
    with pytest.raises(ValueError, match=r"mask_schedule='square' is not known"):
        mask_ratio("square", 0.5)
    assert len(CFG_SCHEDULES) == 4
