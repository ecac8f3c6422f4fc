"""The AR + flow family: MAR and FlowAR/raster cores, FlowARSystem training randomness and sampling, bad inputs."""

from types import SimpleNamespace

import pytest
import torch

from lit_ar.models.flowar import FlowARTransformer, doubling_scales
from lit_ar.models.mar import MARTransformer
from lit_ar.systems.flow_ar import FlowARSystem, truncated_normal
from lit_ar.systems.generator import GeneratorSystem

TINY = dict(token_dim=4, grid_size=4, dim=32, depth=2, n_heads=2, head_width=32, head_depth=2, num_classes=3,
            image_size=16)  # fmt: skip
BACKBONES = ("mar", "flowar", "causal")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops gain nothing from threads; on a shared 2-core machine two OpenMP threads mostly wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_system(backbone: str, **kwargs) -> FlowARSystem:
    torch.manual_seed(0)
    extra = {"buffer_size": 4} if backbone == "mar" else {}
    return FlowARSystem(backbone=backbone, **{**TINY, **extra, **kwargs})


def token_batch(n: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"tokens": torch.randn(n, 16, 4, generator=g), "label": torch.randint(0, 3, (n,), generator=g)}


# -- cores ---------------------------------------------------------------------------------------------------------
def test_mar_conditions_depend_on_known_tokens_only():
    torch.manual_seed(0)
    core = MARTransformer(token_dim=4, seq_len=16, num_classes=3, dim=32, depth=2, n_heads=2, buffer_size=4).eval()
    tokens, labels = torch.randn(2, 16, 4), torch.tensor([0, 2])
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [1, 5, 7]] = mask[1, [0, 2, 15]] = True
    z = core(tokens, mask, labels)
    assert z.shape == (2, 16, 32)
    changed_hidden = torch.where(mask[..., None], torch.randn(2, 16, 4), tokens)
    torch.testing.assert_close(core(changed_hidden, mask, labels), z)
    changed_known = tokens.clone()
    changed_known[0, 3] += 1.0  # position 3 of row 0 is known
    assert not torch.allclose(core(changed_known, mask, labels)[0], z[0])
    torch.testing.assert_close(core(changed_known, mask, labels)[1], z[1])  # rows do not mix
    assert not torch.allclose(core(tokens, mask, torch.tensor([1, 2]))[0], z[0])  # the class conditions
    mask[1, 3] = True
    with pytest.raises(ValueError, match=r"every row must hide the same number of tokens; got \[3, 4\]"):
        core(tokens, mask, labels)
    with pytest.raises(ValueError, match=r"buffer_size=0 must be >= 1"):
        MARTransformer(token_dim=4, seq_len=16, num_classes=3, dim=32, depth=1, n_heads=2, buffer_size=0)


@pytest.mark.parametrize("order", ["scale", "raster"])
def test_flowar_attention_is_block_causal_and_the_kv_cache_matches_the_full_pass(order):
    torch.manual_seed(0)
    core = FlowARTransformer(token_dim=4, grid_size=4, num_classes=3, order=order, dim=32, depth=2, n_heads=2).eval()
    # give AdaLN a non-zero start, so that the class reaches every block
    for block in core.blocks:
        torch.nn.init.normal_(block.ada[1].weight, std=0.05)
    tokens, labels = torch.randn(2, 16, 4), torch.tensor([0, 1])
    targets = core.targets(tokens)
    inputs = core.teacher_inputs(targets)
    z = core(inputs, labels)
    assert z.shape == (2, core.seq_len, 32) and inputs.shape == (2, core.seq_len - 1, 4)
    # perturbing group k's inputs changes groups >= k only
    k = 2
    start, end = core.starts[k], core.starts[k + 1]
    bumped = inputs.clone()
    bumped[:, start - 1 : end - 1] += 1.0  # inputs[:, i - 1] is the input of position i
    z2 = core(bumped, labels)
    torch.testing.assert_close(z2[:, :start], z[:, :start])
    assert not torch.allclose(z2[:, start:end], z[:, start:end])
    # decoding group by group against the KV cache gives the full pass's conditions
    core.setup_cache(2, torch.float32, torch.device("cpu"))
    steps, group_inputs = [], None
    for g in range(len(core.sizes)):
        steps.append(core.step(g, group_inputs, labels))
        if g + 1 < len(core.sizes):
            group_inputs = core.next_input(g, targets[:, core.starts[g] : core.starts[g + 1]])
    core.clear_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), z, atol=1e-5, rtol=1e-5)


def test_flowar_scales_targets_and_inputs():
    assert doubling_scales(16) == (1, 2, 4, 8, 16)
    core = FlowARTransformer(token_dim=4, grid_size=4, num_classes=3, dim=32, depth=1, n_heads=2)
    assert core.scales == (1, 2, 4) and core.sizes == [1, 4, 16] and core.seq_len == 21
    tokens = torch.randn(2, 16, 4)
    targets = core.targets(tokens)
    torch.testing.assert_close(targets[:, -16:], tokens)  # the last scale is the token grid itself
    torch.testing.assert_close(targets[:, 0], tokens.mean(1))  # the 1x1 scale is the grid's mean (area)
    grid = tokens.transpose(1, 2).reshape(2, 4, 4, 4)
    torch.testing.assert_close(targets[:, 1], grid[:, :, :2, :2].mean((2, 3)))  # top-left cell of the 2x2 scale
    up = core.next_input(0, targets[:, :1])  # a 1x1 scale upsampled is constant
    torch.testing.assert_close(up, targets[:, :1].expand(-1, 4, -1))
    with pytest.raises(ValueError, match=r"scales=\[1, 2\] must increase strictly from >= 1 to the token grid side 4"):
        FlowARTransformer(token_dim=4, grid_size=4, num_classes=3, scales=(1, 2), dim=32, depth=1, n_heads=2)
    with pytest.raises(ValueError, match=r"grid_size=6 is not a power of two"):
        doubling_scales(6)


def test_mar_mask_ratio_law():
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0))
    r = truncated_normal(u, 0.7, 1.0, 1.0, 0.25)
    assert float(r.min()) >= 0.7 and float(r.max()) <= 1.0
    # the density of a normal centred at 1 rises towards 1: more mass in the upper half of [0.7, 1]
    assert 0.55 < float((r > 0.85).float().mean()) < 0.7


# -- the system ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", BACKBONES)
def test_loss_trains_and_same_seed_gives_same_samples(backbone):
    system = tiny_system(backbone, lr=3e-3)
    opt = torch.optim.AdamW(system.parameters(), lr=3e-3)
    batch = token_batch()
    system.train()
    losses = []
    for step in range(6):
        loss = system.loss(batch, torch.Generator().manual_seed(step % 2))
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-2] + losses[-1] < losses[0] + losses[1], losses
    system.eval()
    labels = torch.tensor([0, 2, 1])
    kw = dict(cfg=2.0, flow_steps=3, sampler="euler_maruyama")
    a = system.sample_tokens(labels, generator=torch.Generator().manual_seed(5), **kw)
    b = system.sample_tokens(labels, generator=torch.Generator().manual_seed(5), **kw)
    c = system.sample_tokens(labels, generator=torch.Generator().manual_seed(6), **kw)
    assert a.shape == (3, 16, 4) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_mar_sampling_fills_every_token_in_any_number_of_steps():
    system = tiny_system("mar").eval()
    labels = torch.tensor([0, 1])
    for steps in (1, 5, 16):
        out = system.sample_tokens(labels, steps=steps, flow_steps=2, generator=torch.Generator().manual_seed(0))
        assert out.shape == (2, 16, 4) and (out != 0).all(), f"steps={steps} left tokens unset"
    # temperature scales the head's noise: at a tiny temperature two seeds nearly agree
    cold = [system.sample_tokens(labels, steps=1, flow_steps=2, temperature=1e-4,
                                 generator=torch.Generator().manual_seed(s)) for s in (0, 1)]  # fmt: skip
    torch.testing.assert_close(cold[0], cold[1], atol=1e-3, rtol=0)


class FakeTrainer(SimpleNamespace):
    """What FlowARSystem.draw reads of a DDP trainer: world size, rank, step."""


@pytest.mark.parametrize("backbone", ["mar", "flowar"])
def test_draws_per_global_sample_make_two_ranks_equal_one_process(backbone):
    """DDP: the DistributedSampler deals global sample r + i * world to rank r. Drawing the step's randomness for
    the global batch and keeping the rank's rows makes the mean of the ranks' losses the one-process loss."""
    system = tiny_system(backbone, class_dropout=0.5)
    system.train()
    batch = token_batch(8)
    system._trainer = FakeTrainer(world_size=1, global_rank=0, global_step=3)
    one = system.loss(batch, system.step_generator(0, "train"))
    ranks = []
    for rank in range(2):
        system._trainer = FakeTrainer(world_size=2, global_rank=rank, global_step=3)
        shard = {k: v[rank::2] for k, v in batch.items()}
        ranks.append(system.loss(shard, system.step_generator(0, "train")))
    system._trainer = None
    torch.testing.assert_close((ranks[0] + ranks[1]) / 2, one, rtol=1e-5, atol=1e-6)
    system._trainer = FakeTrainer(world_size=1, global_rank=0, global_step=4)
    assert not torch.equal(system.loss(batch, system.step_generator(0, "train")), one), "each step draws anew"
    system._trainer = None


def test_bf16_autocast_training_and_sampling_stay_finite():
    for backbone in BACKBONES:
        system = tiny_system(backbone)
        opt = torch.optim.AdamW(system.parameters(), lr=1e-2)
        system.train()
        for step in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = system.loss(token_batch(seed=step), torch.Generator().manual_seed(step))
            assert loss.dtype == torch.float32 and torch.isfinite(loss), backbone
            opt.zero_grad()
            loss.backward()
            opt.step()
        system.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = system.sample_tokens(torch.tensor([0, 1]), cfg=3.0, flow_steps=3,
                                       generator=torch.Generator().manual_seed(0))  # fmt: skip
        assert out.dtype == torch.float32 and torch.isfinite(out).all(), backbone


# -- bad inputs ----------------------------------------------------------------------------------------------------
def test_bad_sampling_inputs_are_refused():
    mar, flowar = tiny_system("mar").eval(), tiny_system("flowar").eval()
    labels = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"flow_steps=0 must be an integer >= 1"):
        mar.sample_tokens(labels, flow_steps=0)
    with pytest.raises(ValueError, match=r"guidance_interval=\(0.5, 1.2\) must satisfy 0 <= low <= high <= 1"):
        mar.sample_tokens(labels, cfg=2.0, guidance_interval=(0.5, 1.2))
    with pytest.raises(ValueError, match=r"guidance_interval=\(-0.1, 0.5\) must satisfy"):
        flowar.sample_tokens(labels, cfg=2.0, guidance_interval=(-0.1, 0.5))
    with pytest.raises(ValueError, match=r"top_k=5, top_p=None: filters of discrete logits"):
        mar.sample_tokens(labels, top_k=5)
    with pytest.raises(ValueError, match=r"steps=17 must be between 1 and the number of tokens \(16\)"):
        mar.sample_tokens(labels, steps=17)
    with pytest.raises(ValueError, match=r"steps=4: backbone='flowar' takes one step per scale \(3\)"):
        flowar.sample_tokens(labels, steps=4)
    with pytest.raises(ValueError, match=r"cfg_schedule='interval' is not supported here"):
        mar.sample_tokens(labels, cfg=2.0, cfg_schedule="interval")
    with pytest.raises(ValueError, match=r"sampler='dopri5' is not known"):
        mar.sample_tokens(labels, sampler="dopri5")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        mar.sample_tokens(torch.tensor([3]))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match=r"model.init_args.backbone='var' is not known"):
        FlowARSystem(backbone="var", **TINY)
    with pytest.raises(ValueError, match=r"model.init_args.scales=\[1, 4\] applies to backbone='flowar' only"):
        FlowARSystem(backbone="mar", scales=[1, 4], **TINY)
    with pytest.raises(ValueError, match=r"model.init_args.head_batch_mul=0 must be >= 1"):
        FlowARSystem(backbone="mar", head_batch_mul=0, **TINY)
    with pytest.raises(ValueError, match=r"model.init_args.time_sampling='beta' is not known"):
        FlowARSystem(backbone="mar", time_sampling="beta", **TINY)
    with pytest.raises(ValueError, match=r"without model.init_args.tokenizer_ckpt, set model.init_args.token_dim"):
        FlowARSystem(backbone="mar", **{**TINY, "token_dim": None})
    system = tiny_system("flowar")
    wide = {"tokens": torch.randn(2, 16, 8), "label": torch.tensor([0, 1])}
    with pytest.raises(ValueError, match=r"the tokenizer's tokens have width 8 but the flow head was built for "
                                         r"token_dim=4"):  # fmt: skip
        system.loss(wide, torch.Generator())


def test_tokenizer_of_the_wrong_kind_is_refused_both_ways():
    kl = SimpleNamespace(is_continuous=True, vocab_size=None)
    vq = SimpleNamespace(is_continuous=False, vocab_size=1024)
    with pytest.raises(ValueError, match=r"FlowARSystem models continuous tokens .* but the tokenizer is discrete "
                                         r"\(vocab_size=1024\)"):  # fmt: skip
        GeneratorSystem.check_tokenizer_kind(vq, FlowARSystem.continuous_tokens, "FlowARSystem")
    with pytest.raises(ValueError, match=r"models discrete token ids .* but the tokenizer is continuous"):
        GeneratorSystem.check_tokenizer_kind(kl, GeneratorSystem.continuous_tokens, "MaskedARSystem")
    GeneratorSystem.check_tokenizer_kind(kl, True)
    GeneratorSystem.check_tokenizer_kind(vq, False)
