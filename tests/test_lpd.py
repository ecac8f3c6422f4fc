"""LPD (lit_ar/methods/lpd.py): the block mask (a query sees the fed groups before its own and its group's queries,
no fed token sees a query), cached parallel decoding equal to the full training forward, one token per group equal
to sequential decoding in the same order, the locality-aware order (a permutation; each group near what is generated
and spread out), model calls = steps, seeded sampling and training draws, bad settings refused by name, the CLI."""

import numpy as np
import pytest
import torch

from lit_ar.cli import cli_main
from lit_ar.draws import Draws
from lit_ar.methods.lpd import LPD, LPDSampling, group_layout, lpd_order
from lit_ar.models.categorical_head import CategoricalHead
from lit_ar.models.causal_ar import CausalTransformer
from lit_ar.sampling import tokens_to_reveal
from lit_ar.systems.lpd import LPDSystem
from tests.conftest import CONFIGS, run_dir_args
from tests.test_methods import randomised

V, G, NC = 16, 4, 3
L = G * G
DEBUG = CONFIGS / "debug" / "lpd.yaml"


def tiny():
    core = randomised(CausalTransformer(V, G, NC, dim=32, depth=2, n_heads=2, target_aware=True,
                                        position_queries=True))  # fmt: skip
    return core, CategoricalHead(core), LPD([16, 8, 4])


def sample(core, head, method, labels, seed=0, order=None, **settings):
    s = LPDSampling(**settings)
    return method.sample(core, head, labels, s.guidance(NC), s, torch.Generator().manual_seed(seed), order=order)


def query_states(core, method, tokens, labels, order, counts):
    x, rope, mask, query_slots, _ = method.sequence(core, tokens, labels, order, counts)
    with torch.no_grad():
        return core.run_layers(x, rope, mask)[:, query_slots]  # (B, L, C)


def test_the_mask_lets_a_query_see_only_the_groups_before_it_and_its_own_queries():
    mask, query_slots = group_layout([1, 2, 3], 1, "cpu")
    # slots: 0 prefix | 1 fed group 1 | 2-3 fed group 2 | 4 query g1 | 5-6 queries g2 | 7-9 queries g3
    assert mask.int().tolist() == [
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 0, 0, 0, 1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 1, 1, 1],
        [1, 1, 1, 1, 0, 0, 0, 1, 1, 1],
        [1, 1, 1, 1, 0, 0, 0, 1, 1, 1],
    ]
    assert query_slots.tolist() == [4, 5, 6, 7, 8, 9]
    core, _, method = tiny()
    g = torch.Generator().manual_seed(0)
    tokens, labels = torch.randint(0, V, (2, L), generator=g), torch.tensor([0, 1])
    order, counts = torch.rand(2, L, generator=g).argsort(-1), tokens_to_reveal("cosine", L, 6)  # [1, 2, 3, ...]
    a = query_states(core, method, tokens, labels, order, counts)
    changed = tokens.clone()
    changed.scatter_(1, order[:, 1:2], (tokens.gather(1, order[:, 1:2]) + 1) % V)  # order position 1: group 2
    b = query_states(core, method, changed, labels, order, counts)
    seen_from = sum(counts[:2])  # group 3's queries on see it
    assert torch.equal(a[:, :seen_from], b[:, :seen_from]) and not torch.equal(a[:, seen_from:], b[:, seen_from:])


@pytest.mark.parametrize("steps", [16, 6, 1])
@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_cached_parallel_decoding_equals_the_full_forward(steps, cfg):
    core, head, method = tiny()
    labels = torch.tensor([0, 1, 2, 1])
    cached = sample(core, head, method, labels, cfg=cfg, steps=steps, top_k=8)
    assert torch.equal(cached, sample(core, head, method, labels, cfg=cfg, steps=steps, top_k=8, use_cache=False))
    assert cached.shape == (4, L)


def test_one_token_per_group_is_sequential_decoding_in_the_same_order():
    """Greedy, 16 groups of one on 16 tokens: every token is the argmax of the teacher-forced full forward."""
    core, head, method = tiny()
    labels = torch.tensor([0, 1, 2, 1])
    order = torch.rand(4, L, generator=torch.Generator().manual_seed(5)).argsort(-1)
    out = sample(core, head, method, labels, order=order, steps=L, top_k=1)
    full = head.logits(query_states(core, method, out, labels, order, [1] * L))
    assert torch.equal(full.argmax(-1), out.gather(1, order))


def locality(order: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group after the first, over the samples of `order` (B, 64) on an 8x8 grid: the share of its cells next to
    (Chebyshev 1) a cell generated before, and the share next to another cell of the same group."""
    r, c, first, touch, adjacent = order // 8, order % 8, counts[0], [], []
    for n in counts[1:]:
        rows, cols = r[:, first : first + n, None], c[:, first : first + n, None]
        before = torch.maximum((rows - r[:, None, :first]).abs(), (cols - c[:, None, :first]).abs())
        within = torch.maximum((rows - rows.transpose(1, 2)).abs(), (cols - cols.transpose(1, 2)).abs())
        touch.append((before.amin(-1) == 1).float().mean())
        adjacent.append((within + 9 * torch.eye(n, dtype=torch.long) <= 1).any(-1).float().mean())
        first += n
    return torch.stack(touch), torch.stack(adjacent)


def test_the_locality_aware_order_keeps_each_group_near_the_generated_cells_and_apart():
    counts = tokens_to_reveal("cosine", 64, 16)  # [1, 1, 1, 2, 3, 3, 4, 4, 5, ...]
    order = lpd_order(8, counts, 200, torch.Generator().manual_seed(0))
    assert torch.equal(order.sort(1).values, torch.arange(64).expand(200, -1))  # a permutation per sample
    assert not torch.equal(order[0], order[1])
    touch, adjacent = locality(order, counts)
    random_touch, random_adjacent = locality(torch.rand(200, 64, generator=torch.Generator().manual_seed(0))
                                             .argsort(-1), counts)  # fmt: skip
    assert touch[:6].min() > 0.9 and random_touch[:6].max() < 0.75  # the early groups grow from what is generated
    assert adjacent[:10].max() == 0 and random_adjacent[2:10].min() > 0.05  # and a group's cells are not neighbours
    with pytest.raises(ValueError, match=r"group sizes \[1, 2\] must be >= 1 and sum to the 64 tokens"):
        lpd_order(8, [1, 2], 1)


def test_model_calls_are_the_steps():
    core, head, method = tiny()
    calls = []
    handle = core.layers[0].register_forward_hook(lambda *_: calls.append(1))
    sample(core, head, method, torch.tensor([0, 1]), steps=5, cfg=2.0)
    handle.remove()
    assert len(calls) == 5


def test_sampling_and_training_draws_are_seeded():
    core, head, method = tiny()
    labels = torch.zeros(4, dtype=torch.long)
    first, again, other = (sample(core, head, method, labels, seed, steps=4) for seed in (3, 3, 4))
    assert torch.equal(first, again) and not torch.equal(first, other)
    tokens = torch.randint(0, V, (4, L), generator=torch.Generator().manual_seed(0))
    loss = method.loss(core, head, tokens, labels, Draws(0))["loss"]
    assert torch.equal(loss, method.loss(core, head, tokens, labels, Draws(0))["loss"])
    assert not torch.equal(loss, method.loss(core, head, tokens, labels, Draws(1))["loss"])


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="order='diagonal' is not an LPD order; known: lpd, random, raster"):
        LPDSampling(order="diagonal")
    with pytest.raises(ValueError, match="steps=0 must be >= 1"):
        LPDSampling(steps=0)
    with pytest.raises(ValueError, match=r"model.init_args.predict_kwargs.steps=17: LPD decodes the 16 tokens"):
        LPDSystem(vocab_size=V, grid_size=G, num_classes=NC, predict_kwargs={"steps": 17})
    with pytest.raises(ValueError, match=r"model.init_args.train_steps=\[16, 20\]: each step count must be between"):
        LPDSystem(vocab_size=V, grid_size=G, num_classes=NC, train_steps=[16, 20])
    system = LPDSystem(vocab_size=V, grid_size=G, num_classes=NC)
    assert system.method.train_steps == [16, 8, 4]
    with pytest.raises(ValueError, match=r"sampling.steps=20: LPD decodes the 16 tokens"):
        system.sample_tokens(torch.tensor([0]), steps=20)
    core = randomised(CausalTransformer(V, G, NC, dim=32, depth=2, n_heads=2, target_aware=True))
    with pytest.raises(ValueError, match=r"LPD needs a core with position queries"):
        sample(core, CategoricalHead(core), LPD([4]), torch.tensor([0]))


def test_lit_ar_fits_and_predicts_lpd(debug_tokenizer, tmp_path):
    common = ["--config", str(DEBUG), *run_dir_args(tmp_path), "--model.init_args.tokenizer_ckpt", str(debug_tokenizer)]
    cli = cli_main(["fit", *common, "--trainer.max_steps", "12", "--trainer.limit_val_batches", "1"])
    assert isinstance(cli.model, LPDSystem)
    cli_main(["predict", *common, "--ckpt_path", str(tmp_path / "checkpoints" / "last.ckpt")])
    samples = np.load(tmp_path / "samples.npz")
    assert samples["images"].shape == (20, 16, 16, 3)
