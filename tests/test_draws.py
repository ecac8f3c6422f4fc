"""Draws: one seed mixer and one per-step draw for the global batch, sliced by rank."""

import torch

from lit_ar.draws import Draws, mix_seed


def test_two_ranks_draw_what_one_process_draws():
    """Rank r keeps global rows r::world (the DistributedSampler's deal), for every kind of draw."""
    one = Draws.for_step(7, "train", step=3, batch_idx=1)
    whole = [one.rand(6, 5), one.randn(6, 2, 3), one.shared_rand(), one.rand_global(6)]
    ranks = [Draws.for_step(7, "train", step=3, batch_idx=1, world=2, rank=r) for r in range(2)]
    parts = [[d.rand(3, 5), d.randn(3, 2, 3), d.shared_rand(), d.rand_global(3)] for d in ranks]
    torch.testing.assert_close(torch.stack([p[0] for p in parts], 1).reshape(6, 5), whole[0], rtol=0, atol=0)
    torch.testing.assert_close(torch.stack([p[1] for p in parts], 1).reshape(6, 2, 3), whole[1], rtol=0, atol=0)
    assert all(torch.equal(p[2], whole[2]) and torch.equal(p[3], whole[3]) for p in parts)  # shared by every rank


def test_class_dropout_is_drawn_per_global_sample():
    labels = torch.arange(8) % 3
    dropped = Draws.for_step(0, "train", 5, 0).class_dropout(labels, 0.5, null_class=3)
    assert (dropped == 3).any() and (dropped != 3).any()
    halves = [Draws.for_step(0, "train", 5, 0, world=2, rank=r).class_dropout(labels[r::2], 0.5, 3) for r in range(2)]
    assert torch.equal(torch.stack(halves, 1).reshape(8), dropped)
    assert torch.equal(Draws.for_step(0, "train", 5, 0).class_dropout(labels, 0.0, 3), labels)


def test_stages_steps_and_batches_get_unrelated_streams_on_a_cpu_generator():
    """The defect this fixes: a CPU generator keeps the low 32 bits of its seed, so the flow family's former
    validation offset (1 << 40) drew what the matching training batch drew. Every key changes the draw now."""
    assert torch.equal(torch.rand(3, generator=torch.Generator().manual_seed(5)),
                       torch.rand(3, generator=torch.Generator().manual_seed(5 + (1 << 40))))  # fmt: skip
    draws = {
        (stage, step, batch): Draws.for_step(11, stage, step, batch).rand(1, 4)
        for stage in ("train", "val") for step in (0, 1, 2) for batch in (0, 1)
    }  # fmt: skip
    train = {k: v for k, v in draws.items() if k[0] == "train"}
    assert len({tuple(v.flatten().tolist()) for v in train.values()}) == len(train)
    for step in (0, 1, 2):
        for batch in (0, 1):
            assert not torch.equal(draws["val", step, batch], draws["train", step, batch])
    # validation is keyed at step 0: every validation draws the same masks and noise (comparable val/loss)
    assert torch.equal(draws["val", 0, 1], draws["val", 2, 1])


def test_mix_seed_is_the_seed_of_the_datasets_and_the_evaluator():
    """One mixer: the built-in shapes' items and the evaluator's batch seeds are `mix_seed` of two keys, and more
    keys chain it; the result fits a CPU generator's 32 bits."""
    assert mix_seed(3, 4, 5) == mix_seed(mix_seed(3, 4), 5)
    assert all(0 <= mix_seed(2**62 + i, i) < 2**32 for i in range(100))
    assert len({mix_seed(0, i) for i in range(1000)}) == 1000
