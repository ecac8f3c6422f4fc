"""The AR + flow family: MAR and FlowAR/raster cores, FlowARSystem training randomness and sampling, bad inputs."""

import math
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import (
    CONFIGS,
    assert_golden_curve,
    checkpoint_for_config,
    config_for_run_path,
    head_off_zero,
    logged_scalars,
    run_dir_args,
    run_lit_ar,
)

from lit_ar.checkpoints import IncompatibleCheckpointError
from lit_ar.cli import cli_main
from lit_ar.draws import Draws
from lit_ar.methods.masked import truncated_normal
from lit_ar.models.diffusion_head import DiffusionHead
from lit_ar.models.flowar import FlowARTransformer, doubling_scales
from lit_ar.models.mar import MARTransformer
from lit_ar.systems.flow_ar import FlowARSystem
from lit_ar.systems.generator import GeneratorSystem

TINY = dict(token_dim=4, grid_size=4, dim=32, depth=2, n_heads=2, head_width=32, head_depth=2, num_classes=3,
            image_size=16)  # fmt: skip
BACKBONES = ("mar", "flowar", "causal")


@contextmanager
def single_thread():
    """Tiny ops gain nothing from threads, and on a shared 2-core machine two OpenMP threads mostly wait on each
    other (the debug MAR fit took 40 s with 2 threads, 3.4 s with 1, under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def one_thread():
    with single_thread():
        yield


def tiny_system(backbone: str, **kwargs) -> FlowARSystem:
    torch.manual_seed(0)
    extra = {"buffer_size": 4} if backbone == "mar" else {}
    return FlowARSystem(backbone=backbone, **{**TINY, **extra, **kwargs})


def token_batch(n: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"tokens": torch.randn(n, 16, 4, generator=g), "label": torch.randint(0, 3, (n,), generator=g)}


def train_and_check_the_loss_falls(system: FlowARSystem, steps: int) -> None:
    """`steps` AdamW steps on one token batch (two alternating draws): the loss is fp32 and finite, and falls."""
    opt = torch.optim.AdamW(system.parameters(), lr=3e-3)
    batch = token_batch()
    system.train()
    losses = []
    for step in range(steps):
        loss = system.loss(batch, Draws(step % 2))
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-2] + losses[-1] < losses[0] + losses[1], losses


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


def test_mar_conditions_at_chosen_positions_equal_the_full_pass_there():
    torch.manual_seed(0)
    core = MARTransformer(token_dim=4, seq_len=16, num_classes=3, dim=32, depth=2, n_heads=2, buffer_size=4).eval()
    tokens, labels = torch.randn(2, 16, 4), torch.tensor([0, 2])
    order = torch.stack([torch.randperm(16), torch.randperm(16)])  # (2, 16)
    mask = order.argsort(1) < 5  # (2, 16) the first 5 of each order hidden
    positions = order[:, 2:7]  # (2, 5) some hidden, some known
    full = core(tokens, mask, labels)  # (2, 16, 32)
    z = core(tokens, mask, labels, positions=positions)
    assert z.shape == (2, 5, 32)
    torch.testing.assert_close(z, full.gather(1, positions[..., None].expand(-1, -1, 32)), rtol=1e-5, atol=1e-5)


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
    core.setup_caches(2, torch.float32)
    steps, group_inputs = [], None
    for g in range(len(core.sizes)):
        steps.append(core.step(g, group_inputs, labels))
        if g + 1 < len(core.sizes):
            group_inputs = core.next_input(g, targets[:, core.starts[g] : core.starts[g + 1]])
    core.clear_caches()
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
    train_and_check_the_loss_falls(system, 6)
    system.eval()
    labels = torch.tensor([0, 2, 1])
    kw = dict(cfg=2.0, flow_steps=3, sampler="euler_maruyama")
    a = system.sample_tokens(labels, generator=torch.Generator().manual_seed(5), **kw)
    b = system.sample_tokens(labels, generator=torch.Generator().manual_seed(5), **kw)
    c = system.sample_tokens(labels, generator=torch.Generator().manual_seed(6), **kw)
    assert a.shape == (3, 16, 4) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_mar_loss_equals_the_head_at_every_position_weighted_by_the_mask():
    """The system runs the backbone's last block and the head at the hidden tokens only; MAR runs them everywhere
    and weights the loss by the mask. Same draws, same loss. The head embeds each hidden token's condition once for
    its head_batch_mul draws."""
    system = tiny_system("mar", class_dropout=0.0, head_batch_mul=2)
    head_off_zero(system)
    batch = token_batch(4)
    tokens, labels = batch["tokens"], batch["label"]
    B, L, D = tokens.shape
    m, C = 2, system.core.decoder_dim
    g = Draws(3).generator
    # MAR's form, the draws in the method's order: order, mask ratio, noise, times
    order = torch.rand(B, L, generator=g).argsort(dim=1)
    ratio = truncated_normal(torch.rand((), generator=g), 0.7, 1.0, 1.0, 0.25)
    mask = order.argsort(dim=1) < math.ceil(L * float(ratio))  # (B, L)
    cond = system.core(tokens, mask, labels)[:, None].expand(B, m, L, C).reshape(-1, C)
    noise = torch.randn(B, m, L, D, generator=g).reshape(-1, D)
    t = torch.rand(B, m, L, generator=g).reshape(-1)
    x1 = tokens[:, None].expand(B, m, L, D).reshape(-1, D)
    v = system.head(t[:, None] * x1 + (1 - t[:, None]) * noise, t, cond)
    weight = mask[:, None].expand(B, m, L).reshape(-1).float()
    expected = ((v - (x1 - noise)).pow(2).mean(-1) * weight).sum() / weight.sum()
    assert 0 < weight.mean() < 1  # some tokens known: the two forms differ in work
    embedded_rows = []
    system.head.cond_embed.register_forward_hook(lambda m, i, out: embedded_rows.append(out.shape[:-1].numel()))
    torch.testing.assert_close(system.loss(batch, Draws(3)), expected, rtol=1e-5, atol=1e-6)
    assert embedded_rows == [int(mask.sum())]  # each hidden token's condition embedded once, not once per draw


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
    """What GeneratorSystem.draws reads of a DDP trainer: world size, rank, step."""


@pytest.mark.parametrize("backbone, head", [("mar", "flow"), ("flowar", "flow"), ("mar", "diffusion")])
def test_draws_per_global_sample_make_two_ranks_equal_one_process(backbone, head):
    """DDP: the DistributedSampler deals global sample r + i * world to rank r. Drawing the step's randomness for
    the global batch and keeping the rank's rows makes the mean of the ranks' losses the one-process loss."""
    system = tiny_system(backbone, class_dropout=0.5, head=head)
    system.train()
    batch = token_batch(8)
    system._trainer = FakeTrainer(world_size=1, global_rank=0, global_step=3)
    one = system.loss(batch, system.draws("train", 0))
    ranks = []
    for rank in range(2):
        system._trainer = FakeTrainer(world_size=2, global_rank=rank, global_step=3)
        shard = {k: v[rank::2] for k, v in batch.items()}
        ranks.append(system.loss(shard, system.draws("train", 0)))
    system._trainer = None
    torch.testing.assert_close((ranks[0] + ranks[1]) / 2, one, rtol=1e-5, atol=1e-6)
    system._trainer = FakeTrainer(world_size=1, global_rank=0, global_step=4)
    assert not torch.equal(system.loss(batch, system.draws("train", 0)), one), "each step draws anew"
    system._trainer = None


def test_bf16_autocast_training_and_sampling_stay_finite():
    for backbone in BACKBONES:
        system = tiny_system(backbone)
        opt = torch.optim.AdamW(system.parameters(), lr=1e-2)
        system.train()
        for step in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = system.loss(token_batch(seed=step), Draws(step))
            assert loss.dtype == torch.float32 and torch.isfinite(loss), backbone
            opt.zero_grad()
            loss.backward()
            opt.step()
        system.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = system.sample_tokens(torch.tensor([0, 1]), cfg=3.0, flow_steps=3,
                                       generator=torch.Generator().manual_seed(0))  # fmt: skip
        assert out.dtype == torch.float32 and torch.isfinite(out).all(), backbone


@pytest.mark.parametrize("backbone", BACKBONES)
def test_the_diffusion_head_trains_and_samples_on_every_backbone(backbone):
    """MAR's DDPM head in place of the flow head: the loss falls, the same seed gives the same samples (100 DDPM
    steps by default, MAR's), CFG and bf16 autocast stay finite and fp32."""
    system = tiny_system(backbone, head="diffusion")
    assert isinstance(system.head, DiffusionHead) and system.head.final.linear.out_features == 8  # eps, variance
    head_off_zero(system)
    train_and_check_the_loss_falls(system, 8)
    system.eval()
    labels, steps = torch.tensor([0, 2]), {"steps": 3} if backbone == "mar" else {}
    calls = []
    system.head.register_forward_hook(lambda m, i, out: calls.append(1))
    a = system.sample_tokens(labels, cfg=2.0, generator=torch.Generator().manual_seed(5), **steps)
    per_step = len(calls) // (3 if backbone == "mar" else len(system.core.sizes))
    assert per_step == 100, "MAR's 100 DDPM steps by default"
    kw = dict(cfg=2.0, flow_steps=5, **steps)
    b = system.sample_tokens(labels, generator=torch.Generator().manual_seed(5), **kw)
    c = system.sample_tokens(labels, generator=torch.Generator().manual_seed(5), **kw)
    d = system.sample_tokens(labels, generator=torch.Generator().manual_seed(6), **kw)
    assert a.shape == b.shape == (2, 16, 4) and torch.isfinite(a).all()
    assert torch.equal(b, c) and not torch.equal(b, d)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = system.loss(token_batch(), Draws(0))
        out = system.sample_tokens(labels, generator=torch.Generator().manual_seed(5), **kw)
    assert loss.dtype == out.dtype == torch.float32 and torch.isfinite(loss) and torch.isfinite(out).all()


# -- bad inputs ----------------------------------------------------------------------------------------------------
def test_bad_diffusion_head_inputs_are_refused():
    with pytest.raises(
        ValueError, match=r"model.init_args.head='ddim' is not known; use one of \('flow', 'diffusion'\)"
    ):
        tiny_system("mar", head="ddim")
    with pytest.raises(ValueError, match=r"time_sampling='logit_normal' applies to head='flow' only"):
        tiny_system("mar", head="diffusion", time_sampling="logit_normal")
    system, labels = tiny_system("mar", head="diffusion").eval(), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"sampler='euler': the diffusion head \(head='diffusion'\) samples with "
                                         r"'ddpm' only"):  # fmt: skip
        system.sample_tokens(labels, sampler="euler")
    with pytest.raises(ValueError, match=r"guidance_interval=\(0.2, 1.0\) is the flow head's"):
        system.sample_tokens(labels, cfg=2.0, guidance_interval=(0.2, 1.0))
    for bad in (0, 1001):
        with pytest.raises(ValueError, match=rf"flow_steps={bad} must be an integer in \[1, 1000\]"):
            system.sample_tokens(labels, flow_steps=bad)
    with pytest.raises(ValueError, match=r"sampler='ddpm' is not known"):  # and the flow head has no DDPM
        tiny_system("mar").eval().sample_tokens(labels, sampler="ddpm")


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
    with pytest.raises(ValueError, match=r"labels must be a 1D integer tensor of class indices; got torch.float32"):
        flowar.sample_tokens(labels.float())
    g = torch.Generator
    for system in (mar, flowar):  # any integer dtype samples alike
        int32 = system.sample_tokens(labels.int(), cfg=2.0, flow_steps=2, generator=g().manual_seed(0))
        torch.testing.assert_close(
            int32, system.sample_tokens(labels, cfg=2.0, flow_steps=2, generator=g().manual_seed(0))
        )


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match=r"model.init_args.backbone='var' is not known"):
        FlowARSystem(backbone="var", **TINY)
    with pytest.raises(ValueError, match=r"model.init_args.scales=\[1, 4\] applies to backbone='flowar' only"):
        FlowARSystem(backbone="mar", scales=[1, 4], **TINY)
    with pytest.raises(ValueError, match=r"model.init_args.head_batch_mul=0 must be >= 1"):
        FlowARSystem(backbone="mar", head_batch_mul=0, **TINY)
    with pytest.raises(ValueError, match=r"model.init_args.time_sampling='beta' is not known"):
        FlowARSystem(backbone="mar", time_sampling="beta", **TINY)
    with pytest.raises(ValueError, match=r"tokenizer_ckpt is not set, so model.init_args.token_dim"):
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


@pytest.mark.slow
@pytest.mark.parametrize("backbone, head", [("mar", "flow"), ("flowar", "flow"), ("mar", "diffusion")])
def test_compiled_equals_eager(backbone, head):
    eager = head_off_zero(tiny_system(backbone, head=head)).eval()  # an untrained head would return its noise
    compiled = tiny_system(backbone, compile=True, head=head).eval()
    compiled.configure_model()  # where `compile` applies (the Trainer calls it)
    compiled.load_state_dict(eager.state_dict())
    assert set(compiled.state_dict()) == set(eager.state_dict()), "in-place compile keeps checkpoint keys"
    batch = token_batch()
    torch.testing.assert_close(compiled.loss(batch, Draws(0)), eager.loss(batch, Draws(0)), rtol=1e-4, atol=1e-5)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    kw = dict(cfg=2.0, flow_steps=2)
    if backbone == "mar":
        kw["steps"] = 3
    labels = torch.tensor([0, 1])
    torch.testing.assert_close(compiled.sample_tokens(labels, generator=g(), **kw),
                               eager.sample_tokens(labels, generator=g(), **kw), rtol=1e-4, atol=1e-4)  # fmt: skip


@pytest.mark.slow
def test_a_compiled_mar_stays_compiled_through_training_validation_and_sampling():
    """One run calls the shared block code in more variants than dynamo's default limit of 8 graphs (grad and no-grad,
    MAR's query-only last block, sampling's weights cast to bf16, batch sizes): with it, the compiled MAR of a real
    run validated and sampled eager after its first validation. The limit is raised when the blocks compile."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from lit_ar.models.layers import Block

    torch._dynamo.reset()  # so the graphs counted below are this test's
    with torch._dynamo.config.patch(recompile_limit=8):  # dynamo's default
        system = tiny_system("mar", compile=True)
        system.configure_model()  # where `compile` applies (the Trainer calls it)
        assert torch._dynamo.config.recompile_limit > 8
        batch, odd = token_batch(8), token_batch(5, seed=1)
        with torch.autocast("cpu", torch.bfloat16):  # as bf16-mixed
            for step in range(2):  # two mask ratios: two encoder lengths
                system.loss(batch, Draws(step)).backward()
            system.eval()
            with torch.no_grad():
                for b in (batch, odd):  # validation, with a short last batch
                    system.loss(b, Draws(0))
                for labels, steps in ((torch.tensor([0, 1]), 4), (torch.tensor([0, 1, 2]), 16)):
                    system.sample_tokens(labels, steps=steps, flow_steps=2, cfg=2.0, generator=torch.Generator())
        graphs = len(_debug_get_cache_entry_list(Block.forward.__code__))
        assert 8 <= graphs < torch._dynamo.config.recompile_limit, f"{graphs} graphs: none ran eager past the limit"


# -- the CLI, on the debug KL tokenizer ------------------------------------------------------------------------------
DEBUG = {b: CONFIGS / "debug" / f"flow_{b}.yaml" for b in ("mar", "flowar")}
GOLDEN = Path(__file__).parent / "golden" / "flow.json"
GOLDEN_DIFFUSION = Path(__file__).parent / "golden" / "flow_mar_diffusion.json"  # debug MAR, head: diffusion


@pytest.fixture(scope="session")
def kl_tokenizer(checkpoints_root) -> Path:
    """The debug KL tokenizer that the debug configs point at, freshly initialised: see the note above
    conftest.debug_tokenizer (test_tokenizer.py trains it)."""
    return checkpoint_for_config(config_for_run_path("runs/debug/tokenizer_kl/checkpoints/last.ckpt"), checkpoints_root)


@pytest.fixture(scope="session")
def trained_debug(checkpoints_root, kl_tokenizer) -> dict[str, Path]:
    """configs/debug/flow_{mar,flowar}.yaml trained through `lit_ar fit` once per session."""
    with single_thread():
        return {b: checkpoint_for_config(path, checkpoints_root, train=True,
                                         extra=["--model.init_args.tokenizer_ckpt", str(kl_tokenizer)])
                for b, path in DEBUG.items()}  # fmt: skip


def test_debug_configs_train_their_loss_falls_and_follows_the_golden_curve(trained_debug):
    """The first 10 logged train/loss values of each debug config. After an intended change, regenerate with
    `LIT_AR_UPDATE_GOLDEN=1 pytest tests/test_flow_ar.py -k golden` and say why in the commit."""
    curves = {}
    for backbone, ckpt in trained_debug.items():
        run_dir = ckpt.parent.parent
        loss = logged_scalars(run_dir, "train/loss")
        assert len(loss) == 20 and sum(loss[-5:]) < sum(loss[:5]) - 0.5, f"{backbone}: the loss falls: {loss}"
        assert logged_scalars(run_dir, "val/loss"), backbone
        curves[str(DEBUG[backbone].relative_to(CONFIGS.parent))] = loss[:10]
    assert_golden_curve(GOLDEN, curves)  # by config; their keys must match too


def test_predict_writes_samples_and_a_grid(trained_debug, kl_tokenizer, tmp_path):
    cli_main(["predict", "--config", str(DEBUG["mar"]), *run_dir_args(tmp_path), "--model.init_args.tokenizer_ckpt",
              str(kl_tokenizer), "--ckpt_path", str(trained_debug["mar"])])  # fmt: skip
    samples = np.load(tmp_path / "samples.npz")
    assert samples["images"].shape == (20, 16, 16, 3) and samples["images"].dtype == np.uint8
    assert samples["labels"].tolist() == [c for c in range(10) for _ in range(2)]
    assert (tmp_path / "grid.png").is_file()


@pytest.mark.parametrize("backbone", ["mar", "flowar"])
def test_a_trained_checkpoint_samples_the_same_images_for_the_same_seed(trained_debug, backbone):
    system = FlowARSystem.load_from_checkpoint(trained_debug[backbone], weights_only=True)
    labels = torch.arange(4)
    kw = dict(cfg=2.0, flow_steps=4, sampler="heun", guidance_interval=(0.1, 0.9))
    a = system.sample(labels, generator=torch.Generator().manual_seed(7), **kw)
    b = system.sample(labels, generator=torch.Generator().manual_seed(7), **kw)
    c = system.sample(labels, generator=torch.Generator().manual_seed(8), **kw)
    assert a.shape == (4, 3, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= -1 and float(a.max()) <= 1


def test_the_debug_mar_trains_with_the_diffusion_head_through_the_cli_and_its_golden_curve(kl_tokenizer, tmp_path):
    """`--model.init_args.head diffusion`: MAR as published (its DDPM head), through `lit_ar fit` and `predict`."""
    with single_thread():
        cli = cli_main(["fit", "--config", str(DEBUG["mar"]), *run_dir_args(tmp_path), "--model.init_args.head",
                        "diffusion", "--model.init_args.tokenizer_ckpt", str(kl_tokenizer), "--trainer.max_steps",
                        "30", "--trainer.limit_val_batches", "2"])  # fmt: skip
    loss = logged_scalars(tmp_path, "train/loss")
    assert len(loss) == 15 and sum(loss[-4:]) < sum(loss[:4]), loss
    assert isinstance(cli.model.head, DiffusionHead)
    # its golden curve: the first 10 logged losses (regenerate as the flow configs' below, and say why)
    assert_golden_curve(GOLDEN_DIFFUSION, loss[:10])
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    cli_main(["predict", "--config", str(DEBUG["mar"]), *run_dir_args(tmp_path / "predict"), "--model.init_args.head",
              "diffusion", "--model.init_args.tokenizer_ckpt", str(kl_tokenizer), "--ckpt_path", str(ckpt),
              "--model.init_args.predict_kwargs", '{"steps": 4, "flow_steps": 20, "cfg": 1.5}'])  # fmt: skip
    samples = np.load(tmp_path / "predict" / "samples.npz")
    assert samples["images"].shape == (20, 16, 16, 3)
    # the config's head is not the checkpoint's: refused before sampling, naming the setting
    with pytest.raises(IncompatibleCheckpointError, match=r"model.init_args.head: 'diffusion' in the checkpoint, "
                                                          r"'flow' in this config"):  # fmt: skip
        cli_main(["predict", "--config", str(DEBUG["mar"]), *run_dir_args(tmp_path / "other"),
                  "--model.init_args.tokenizer_ckpt", str(kl_tokenizer), "--ckpt_path", str(ckpt)])  # fmt: skip


@pytest.mark.parametrize("backbone", ["mar", "flowar"])
def test_bf16_mixed_debug_run_has_no_nan(backbone, kl_tokenizer, tmp_path):
    cli = cli_main(["fit", "--config", str(DEBUG[backbone]), *run_dir_args(tmp_path),
                    "--model.init_args.tokenizer_ckpt", str(kl_tokenizer), "--trainer.precision", "bf16-mixed",
                    "--trainer.max_steps", "12", "--trainer.limit_val_batches", "2",
                    "--trainer.val_check_interval", "6"])  # fmt: skip
    loss = logged_scalars(tmp_path, "train/loss")
    assert len(loss) == 6 and all(math.isfinite(v) for v in loss), loss
    assert all(math.isfinite(v) for v in logged_scalars(tmp_path, "val/loss"))
    system = cli.model.eval()
    assert all(torch.isfinite(p).all() for p in system.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        images = system.sample(torch.arange(4), cfg=3.0, flow_steps=4, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(images).all()


def test_tokenizers_of_the_wrong_kind_or_width_are_refused(kl_tokenizer, checkpoints_root):
    vq = checkpoint_for_config(config_for_run_path("runs/debug/tokenizer_vq/checkpoints/last.ckpt"), checkpoints_root)
    kw = dict(num_classes=10, image_size=16, dim=32, depth=1, n_heads=2, head_width=16, head_depth=1)
    with pytest.raises(ValueError, match=r"tokenizer_ckpt: FlowARSystem models continuous tokens .* the tokenizer "
                                         r"is discrete \(vocab_size="):  # fmt: skip
        FlowARSystem(tokenizer_ckpt=str(vq), **kw)
    with pytest.raises(ValueError, match=r"tokenizer_ckpt: GeneratorSystem models discrete token ids .* the "
                                         r"tokenizer is continuous"):  # fmt: skip
        GeneratorSystem(tokenizer_ckpt=str(kl_tokenizer), num_classes=10, image_size=16)
    with pytest.raises(ValueError, match=r"model.init_args.token_dim=8 differs from the tokenizer's latent width "
                                         r"latent_channels=4"):  # fmt: skip
        FlowARSystem(tokenizer_ckpt=str(kl_tokenizer), token_dim=8, **kw)
    with pytest.raises(ValueError, match=r"model.init_args.grid_size=8 differs from the tokenizer's grid_size=4"):
        FlowARSystem(tokenizer_ckpt=str(kl_tokenizer), grid_size=8, **kw)
    system = FlowARSystem(tokenizer_ckpt=str(kl_tokenizer), backbone="flowar", **kw)
    assert system.token_dim == 4 and system.grid_size == 4 and system.core.scales == (1, 2, 4)


@pytest.mark.slow
@pytest.mark.parametrize("head", ["flow", "diffusion"])
def test_ddp_two_processes_agree_with_one(tmp_path, kl_tokenizer, head):
    """Class dropout, MAR's orders and mask ratio, and the flow noise and times are drawn per global sample from a
    generator seeded per step (FlowARSystem.draw), so 2 gloo processes at batch 8 train exactly like 1 process at
    batch 16. Off here: the KL posterior sample (the tokenizer draws it from each process's own random state) and
    nn.Dropout (off in the debug config), whose noise would match in law only."""
    common = ["fit", "--config", str(DEBUG["mar"]), "--model.init_args.tokenizer_ckpt", str(kl_tokenizer),
              "--model.init_args.class_dropout", "0.5", "--model.init_args.posterior_sample", "false",
              "--model.init_args.head", head,
              "--trainer.max_steps", "8", "--data.shuffle", "false",
              "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "0"]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    run_lit_ar([*common, *run_dir_args(one), "--data.batch_size", "16", "--trainer.devices", "1"])
    run_lit_ar([*common, *run_dir_args(two), "--data.batch_size", "8", "--trainer.devices", "2",
                "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"])  # fmt: skip
    loss1, loss2 = logged_scalars(one, "train/loss"), logged_scalars(two, "train/loss")
    assert len(loss1) == len(loss2) == 8 and sum(loss1[-3:]) < sum(loss1[:3]), loss1
    torch.testing.assert_close(torch.tensor(loss2), torch.tensor(loss1), rtol=2e-3, atol=1e-5)


def test_help_lists_the_family_and_the_base_settings(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--model.help", "lit_ar.systems.FlowARSystem"])
    out = " ".join(capsys.readouterr().out.split())
    assert "MAR's diffusion_batch_mul" in out and "tokenizer_ckpt" in out and "backbone" in out
