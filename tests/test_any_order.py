"""Any-order causal AR (lit_ar/methods/any_order.py): the orders are the permutations they say; the identity order is
raster, in training and in sampling, draw for draw; cached decoding in any order equals the full forward at every
position; random orders are seeded; bad orders and a raster-only model asked for another order are refused by name;
the CLI trains and samples RandAR, DAR and PAR configs. PAR's parallel decoding (lit_ar/methods/par.py): one region
is raster, cached parallel decoding equals the full forward, a group never sees itself, k + L / k - 1 calls."""

import numpy as np
import pytest
import torch

from lit_ar.cli import cli_main
from lit_ar.draws import Draws
from lit_ar.methods.any_order import ORDERS, AnyOrderAR, AnyOrderSampling, grid_order
from lit_ar.methods.par import PAR
from lit_ar.methods.raster import RasterAR
from lit_ar.models.categorical_head import CategoricalHead
from lit_ar.models.causal_ar import CausalTransformer
from lit_ar.systems.causal_ar import CausalARSystem
from tests.conftest import CONFIGS, run_dir_args
from tests.test_methods import randomised

V, G, NC = 16, 4, 3


def tiny(target_aware: bool = True, transition_tokens: int = 0, **options):
    core = randomised(CausalTransformer(V, G, NC, dim=32, depth=2, n_heads=2, target_aware=target_aware,
                                        transition_tokens=transition_tokens, **options))  # fmt: skip
    return core, CategoricalHead(core)


def as_grid(order: torch.Tensor) -> list[list[int]]:
    """The step at which each grid cell is generated, as a G x G picture."""
    step = torch.empty_like(order)
    step[order] = torch.arange(len(order))
    return step.view(G, G).tolist()


def test_each_fixed_order_is_the_permutation_it_names():
    assert as_grid(grid_order("raster", G)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert as_grid(grid_order("diagonal", G)) == [[0, 1, 3, 6], [2, 4, 7, 10], [5, 8, 11, 13], [9, 12, 14, 15]]
    assert as_grid(grid_order("zigzag", G)) == [[0, 1, 5, 6], [2, 4, 7, 12], [3, 8, 11, 13], [9, 10, 14, 15]]
    assert as_grid(grid_order("spiral", G)) == [[0, 1, 2, 3], [11, 12, 13, 4], [10, 15, 14, 5], [9, 8, 7, 6]]
    # PAR: the four 2x2 blocks' first tokens in turn, then each local position across the blocks
    assert as_grid(grid_order("par", G)) == [[0, 4, 1, 5], [8, 12, 9, 13], [2, 6, 3, 7], [10, 14, 11, 15]]
    for name in ("diagonal", "zigzag", "spiral", "par"):
        for side in (1, 2, 5, 8):
            if name == "par" and side % 2:
                continue
            assert sorted(grid_order(name, side).tolist()) == list(range(side * side)), (name, side)


def test_the_identity_order_is_raster_in_training_and_in_sampling():
    core, head = tiny()
    g = torch.Generator().manual_seed(1)
    tokens, labels = torch.randint(0, V, (4, G * G), generator=g), torch.tensor([0, 1, 2, 0])
    raster = RasterAR().loss(core, head, tokens, labels, Draws(0))["loss"]
    assert torch.equal(AnyOrderAR("raster").loss(core, head, tokens, labels, Draws(0))["loss"], raster)
    # the any-order loop given the identity order is raster decoding, draw for draw, guided or not
    for cfg in (1.0, 2.0):
        s = AnyOrderSampling(cfg=cfg, top_k=8)
        identity = torch.arange(G * G).expand(4, -1)
        ordered = AnyOrderAR().sample_in_order(core, head, labels, s.guidance(NC), s, identity,
                                               torch.Generator().manual_seed(3))  # fmt: skip
        assert torch.equal(ordered, RasterAR().sample(core, head, labels, s.guidance(NC), s,
                                                      torch.Generator().manual_seed(3)))  # fmt: skip


DAR_OPTIONS = {"plain": {}, "next_rope": {"next_rope": True}, "directions": {"direction_embeddings": True},
               "both": {"next_rope": True, "direction_embeddings": True}}  # fmt: skip


@pytest.mark.parametrize("options", list(DAR_OPTIONS))
@pytest.mark.parametrize("name", [o for o in ORDERS if o != "raster"])
def test_cached_decoding_in_any_order_equals_the_full_forward(name, options):
    """Greedy sampling in the order on the KV cache, then the teacher-forced forward over the same tokens in the same
    order: every sampled token is the argmax of the full forward's prediction at its position (with DAR's 4D RoPE
    and direction embeddings too)."""
    core, head = tiny(**DAR_OPTIONS[options])
    labels = torch.tensor([0, 1, 2, 1])
    s = AnyOrderSampling(top_k=1, order=name)
    method = AnyOrderAR(name)
    out = method.sample(core, head, labels, s.guidance(NC), s, torch.Generator().manual_seed(0))  # (B, L) raster
    order = method.orders(name, 4, G, labels.device, lambda *shape: torch.rand(*shape, generator=torch.Generator()
                                                                                .manual_seed(0)))  # fmt: skip
    in_order = out.gather(1, order)
    with torch.no_grad():
        full = head.logits(core.hidden(in_order[:, :-1], labels, order))  # (B, L, V)
    assert torch.equal(full.argmax(-1), in_order)
    if name != "random":  # a fixed order is the same for every sample; the loss trains in it
        assert torch.equal(order[0], grid_order(name, G)) and torch.equal(order[0], order[1])


def test_dar_options_tell_each_slot_its_step_and_its_target():
    core, _ = tiny(target_aware=False, direction_embeddings=True)
    with torch.no_grad():
        core.direction.weight.copy_(torch.eye(10, core.dim))  # read the direction id back
    positions, targets = torch.tensor([[0, 3, 5, 6]]), torch.tensor([[1, 4, 1, 11]])  # right, down-left, up, down-right
    assert core.slot_inputs(positions, targets).argmax(-1).tolist() == [[5, 6, 1, 8]]
    assert core.slot_inputs(None, torch.tensor([[0]])).argmax(-1).tolist() == [[9]]  # the first step, from the prefix
    # 4D RoPE: the same fed position rotates differently for another target, and raster training uses it too
    rope4d, _ = tiny(next_rope=True)
    a, b = (
        rope4d.slot_rope(torch.tensor([5]), torch.tensor([6])),
        rope4d.slot_rope(torch.tensor([5]), torch.tensor([9])),
    )
    assert a.shape == (1, 8, 2) and not torch.equal(a, b) and torch.equal(a[:, :4], b[:, :4])
    tokens, labels = torch.randint(0, V, (2, G * G - 1)), torch.tensor([0, 1])
    with torch.no_grad():
        torch.testing.assert_close(rope4d.hidden(tokens, labels), rope4d.hidden(tokens, labels,
                                   torch.arange(G * G).expand(2, -1)))  # fmt: skip
    with pytest.raises(ValueError, match="next_rope rotates a quarter of each head per axis"):
        CausalTransformer(V, G, NC, dim=24, depth=1, n_heads=2, next_rope=True)


def test_random_orders_are_seeded_and_differ_per_sample():
    core, head = tiny()
    labels = torch.zeros(6, dtype=torch.long)
    s = AnyOrderSampling(order="random")

    def draw(seed):
        return AnyOrderAR().sample(core, head, labels, s.guidance(NC), s, torch.Generator().manual_seed(seed))

    assert torch.equal(draw(4), draw(4)) and not torch.equal(draw(4), draw(5))
    draws = Draws(0)
    _, order, _ = AnyOrderAR("random").train_inputs(torch.zeros(6, G * G, dtype=torch.long), draws)
    assert len({tuple(o.tolist()) for o in order}) == 6  # one permutation per sample
    _, again, _ = AnyOrderAR("random").train_inputs(torch.zeros(6, G * G, dtype=torch.long), Draws(0))
    assert torch.equal(order, again)  # the step's draws decide them


def test_bad_orders_are_refused_by_name():
    with pytest.raises(ValueError, match="order='hilbert' is not known; known orders: raster, random, diagonal"):
        AnyOrderSampling(order="hilbert")
    with pytest.raises(ValueError, match="order='hilbert' is not known"):
        AnyOrderAR("hilbert")
    with pytest.raises(ValueError, match="order_regions=3 must be >= 1 and divide the grid side 4"):
        grid_order("par", 4, regions=3)
    with pytest.raises(ValueError, match="decoding='sjd' verifies drafts in raster order"):
        AnyOrderSampling(decoding="sjd", order="diagonal")
    # a raster-only model has no target queries: another order would be meaningless
    core, head = tiny(target_aware=False)
    s = AnyOrderSampling(order="diagonal")
    with pytest.raises(ValueError, match="order='diagonal': sampling in an order other than raster needs a core "
                                         "trained with target-position queries"):  # fmt: skip
        AnyOrderAR("raster").sample(core, head, torch.tensor([0]), s.guidance(NC), s)


def test_the_system_refuses_conflicting_order_settings():
    kw = dict(vocab_size=V, grid_size=G, num_classes=NC)
    with pytest.raises(ValueError, match="rar=true anneals random orders to raster; model.init_args.order='diagonal'"):
        CausalARSystem(rar=True, order="diagonal", **kw)
    with pytest.raises(ValueError, match="order_regions=3 must be >= 1 and divide the grid side 4"):
        CausalARSystem(order="par", order_regions=3, **kw)
    assert CausalARSystem(order="zigzag", **kw).model.target_pos is not None  # any order adds target queries
    assert CausalARSystem(**kw).model.target_pos is None


@pytest.mark.parametrize("order", ["random", "diagonal", "par", "par parallel"])
def test_lit_ar_fits_and_predicts_in_an_order(order, debug_tokenizer, tmp_path):
    """configs/debug/any_order.yaml in RandAR's, DAR's and PAR's order, and PAR with its parallel groups: it trains in
    that order and predict writes images."""
    config = CONFIGS / "debug" / "any_order.yaml"
    name, *parallel = order.split()
    common = ["--config", str(config), *run_dir_args(tmp_path), "--model.init_args.tokenizer_ckpt",
              str(debug_tokenizer), "--model.init_args.order", name,
              *(["--model.init_args.parallel", "true"] if parallel else [])]  # fmt: skip
    cli = cli_main(["fit", *common, "--trainer.max_steps", "12", "--trainer.limit_val_batches", "1"])
    assert cli.model.method.order == name and isinstance(cli.model.method, PAR) == bool(parallel)
    cli_main(["predict", *common, "--ckpt_path", str(tmp_path / "checkpoints" / "last.ckpt")])
    samples = np.load(tmp_path / "samples.npz")
    assert samples["images"].shape == (20, 16, 16, 3)


# -- PAR's parallel groups -------------------------------------------------------------------------------------------
def test_par_over_one_region_is_raster_in_training_and_in_sampling():
    core, head = tiny()
    g = torch.Generator().manual_seed(1)
    tokens, labels = torch.randint(0, V, (4, G * G), generator=g), torch.tensor([0, 1, 2, 0])
    torch.testing.assert_close(
        PAR(1).loss(core, head, tokens, labels, Draws(0))["loss"],
        RasterAR().loss(core, head, tokens, labels, Draws(0))["loss"],
        rtol=1e-6,
        atol=1e-6,
    )
    s = AnyOrderSampling(cfg=2.0, top_k=8)
    assert torch.equal(
        PAR(1).sample(core, head, labels, s.guidance(NC), s, torch.Generator().manual_seed(3)),
        RasterAR().sample(core, head, labels, s.guidance(NC), s, torch.Generator().manual_seed(3)),
    )


def test_par_cached_parallel_decoding_equals_the_full_forward_in_k_plus_l_over_k_minus_1_calls():
    core, head = tiny(transition_tokens=3)
    method, labels = PAR(2), torch.tensor([0, 1, 2, 1])
    s = AnyOrderSampling(top_k=1, cfg=2.0)
    calls = []
    handle = core.layers[0].register_forward_hook(lambda *_: calls.append(1))
    out = method.sample(core, head, labels, s.guidance(NC), s)
    handle.remove()
    assert len(calls) == 4 + 16 // 4 - 1  # the four regions' first tokens, then three groups of four
    s1 = AnyOrderSampling(top_k=1)
    out = method.sample(core, head, labels, s1.guidance(NC), s1)
    fed, rope, mask, order, targets = method.sequence(core, out, labels)
    with torch.no_grad():
        full = head.logits(core.run_layers(fed, rope, mask))  # (B, L, V): output i predicts t_i
    assert torch.equal(full.argmax(-1), targets)


def test_a_par_group_is_predicted_without_seeing_itself():
    """Changing a token of group g (one token per region) changes no prediction of groups <= g: the group's tokens
    are drawn independently at sampling, and training saw them so."""
    core, head = tiny(transition_tokens=3)
    method, labels = PAR(2), torch.tensor([0, 1])
    tokens = torch.randint(0, V, (2, G * G), generator=torch.Generator().manual_seed(0))
    order = grid_order("par", G)
    changed = tokens.clone()
    changed[:, order[9]] = (changed[:, order[9]] + 1) % V  # t_9: group 2 (t_8 .. t_11)
    with torch.no_grad():
        a, b = (core.run_layers(*method.sequence(core, t, labels)[:3]) for t in (tokens, changed))
    assert torch.equal(a[:, :12], b[:, :12]) and not torch.equal(a[:, 12:], b[:, 12:])


def test_par_settings_are_refused_where_they_do_not_fit():
    kw = dict(vocab_size=V, grid_size=G, num_classes=NC)
    with pytest.raises(ValueError, match="parallel=true is PAR's parallel decoding of its own order; set "
                                         "model.init_args.order=par"):  # fmt: skip
        CausalARSystem(parallel=True, order="random", **kw)
    system = CausalARSystem(parallel=True, order="par", **kw)
    assert system.model.transition.shape == (3, system.model.dim)
    with pytest.raises(ValueError, match="a PAR model .parallel: true. samples in PAR's order and groups only"):
        system.sample_tokens(torch.tensor([0]), order="random")
    with pytest.raises(ValueError, match="needs a core with 3 transition tokens"):
        PAR(2).loss(*tiny(), torch.zeros(1, G * G, dtype=torch.long), torch.tensor([0]), Draws(0))
