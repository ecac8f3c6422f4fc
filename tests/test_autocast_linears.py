"""`linears_in_autocast_dtype`: while a generator samples under autocast, its blocks' linear weights hold copies in
the autocast dtype, so neither eager nor compiled blocks cast them again at every call. It must change nothing but
speed: the same samples to the bit, the fp32 parameters back afterwards, and nothing done where it would not be
exact (grad on, autocast off, weights not in fp32)."""

import contextlib
from types import SimpleNamespace

import pytest
import torch
from conftest import head_off_zero
from torch import nn

import lit_ar.systems.generator
from lit_ar.performance import linears_in_autocast_dtype


def stack() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8), nn.LayerNorm(8))


def test_linears_hold_autocast_copies_inside_and_their_fp32_tensors_after():
    model = stack()
    linears = [p for m in model if isinstance(m, nn.Linear) for p in m.parameters()]
    before = [(p.data_ptr(), p.dtype) for p in model.parameters()]
    x = torch.randn(4, 8)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        expected = model(x)
        with linears_in_autocast_dtype([model], "cpu") as cast:
            assert cast == len(linears) == 4
            assert all(p.dtype == torch.bfloat16 for p in linears)
            assert model[3].weight.dtype == torch.float32  # not a linear: autocast runs LayerNorm in fp32
            got = model(x)
    assert torch.equal(got, expected)  # autocast would have cast these weights to the same bf16 values
    assert [(p.data_ptr(), p.dtype) for p in model.parameters()] == before


def test_parameters_come_back_when_sampling_fails():
    model = stack()
    before = [p.data_ptr() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="mid-sampling"):
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16), linears_in_autocast_dtype([model], "cpu"):
            raise RuntimeError("mid-sampling")
    assert [p.data_ptr() for p in model.parameters()] == before
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("case", ["grad on", "autocast off", "weights not fp32"])
def test_nothing_is_cast_where_it_would_not_be_exact(case):
    model = stack()
    if case == "weights not fp32":
        model.to(torch.float64)
    grad = torch.enable_grad() if case == "grad on" else torch.no_grad()
    with grad, torch.autocast("cpu", torch.bfloat16, enabled=case != "autocast off"):
        with linears_in_autocast_dtype([model], "cpu") as cast:
            assert cast == 0
            assert {p.dtype for p in model.parameters()} == {torch.float64 if case == "weights not fp32" else
                                                             torch.float32}  # fmt: skip


# -- every family samples the same tokens with and without it, eager and compiled ----------------------------------
FAMILIES = ["causal", "masked", "scale", "mar", "flowar"]


def sample(family: str, system, labels: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if family == "causal":
        return system.generate(labels, cfg=2.0, generator=g)
    if family == "masked":
        return system.generate(labels, cfg=2.0, steps=4, generator=g)
    if family == "scale":
        return torch.cat(system.sample_tokens(labels, cfg=2.0, top_k=50, generator=g)[0], dim=1)
    return system.sample_tokens(labels, cfg=2.0, generator=g, steps=8 if family == "mar" else None, flow_steps=4)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_under_bf16_autocast_is_unchanged_by_the_cast(family, compiled, tmp_path, monkeypatch):
    from benchmarks.__main__ import build

    torch._dynamo.reset()
    system = build(family, "tiny", 8, compiled, "cpu", tmp_path)
    if family in ("mar", "flowar"):
        head_off_zero(system)  # an untrained head would return its noise, cast or not
    labels = torch.arange(4)
    calls = []

    def counted(modules, device_type):
        calls.append(list(modules))
        return linears_in_autocast_dtype(calls[-1], device_type)

    monkeypatch.setattr(lit_ar.systems.generator, "linears_in_autocast_dtype", counted)
    with torch.autocast("cpu", torch.bfloat16):
        with_cast = sample(family, system, labels)
        assert calls, "the family samples through linears_in_autocast_dtype"

        # the cast off: autocast casts the fp32 weights at every matmul, as without this function
        monkeypatch.setattr(lit_ar.systems.generator, "linears_in_autocast_dtype", lambda *_: contextlib.nullcontext(0))
        without = sample(family, system, labels)
    assert torch.equal(with_cast, without)
    assert all(p.dtype == torch.float32 for p in system.parameters() if p.is_floating_point())
    if family in ("mar", "flowar"):
        cast = {id(p) for modules in calls for m in modules for p in m.parameters()}
        assert {id(p) for p in system.head.blocks.parameters()} <= cast, "the flow head's linears are cast too"
        assert not {id(p) for p in system.head.time_embed.parameters()} & cast, "not its fp32 time embedding"


def test_nothing_is_cast_under_a_strategy_that_shards_parameters(tmp_path):
    """Under FSDP the root unit holds parameters (the flow head's) that no FSDP module among the blocks shows."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    from benchmarks.__main__ import build

    system = build("flowar", "tiny", 8, False, "cpu", tmp_path)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        for strategy in (FSDPStrategy(), ModelParallelStrategy()):
            system._trainer = SimpleNamespace(strategy=strategy)
            with system.linears_cast_for_sampling([system.head]) as cast:
                assert cast == 0, type(strategy).__name__
        system._trainer = None
        with system.linears_cast_for_sampling([system.head]) as cast:
            assert cast > 0


def test_fsdp_sharded_modules_are_left_to_fsdp(tmp_path):
    """FSDP points parameters at shards or gathered copies itself; a second hand on `.data` would fight it."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = stack()
        fully_shard(model[0])
        fully_shard(model)
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            with linears_in_autocast_dtype([model], "cpu") as cast:
                assert cast == 0
                assert model(torch.randn(2, 8)).shape == (2, 8)
    finally:
        dist.destroy_process_group()


# -- training: bf16-mixed reaches every linear but the declared fp32 islands -----------------------------------------
@pytest.mark.filterwarnings("ignore:.*self.log.*")  # training_step outside a Trainer logs nothing
@pytest.mark.parametrize("family", FAMILIES)
def test_a_training_step_under_bf16_autocast_runs_every_linear_in_bf16_but_the_fp32_islands(family, tmp_path):
    """bf16-mixed is autocast around training_step: there every linear of the generator runs in bf16, except the
    declared fp32 islands (the flow head's time embedding). An island left around a big module fails here, as the
    flow head's MLP did: it trained in fp32 under bf16-mixed until the twelfth session."""
    from benchmarks.__main__ import build, random_batch

    system = build(family, "tiny", 8, False, "cpu", tmp_path).train()
    dtypes = {}

    def record(name: str):
        def hook(module, args, out) -> None:  # returns nothing: a hook's return value would replace the output
            dtypes.setdefault(name, out.dtype)

        return hook

    for name, module in system.named_modules():
        if isinstance(module, nn.Linear) and not name.startswith("tokenizer."):  # the frozen tokenizer is not trained
            module.register_forward_hook(record(name))
    with torch.autocast("cpu", torch.bfloat16):
        loss = system.training_step(random_batch(family, system, 4), 0)
    assert loss.dtype == torch.float32 and dtypes
    islands = {name for name in dtypes if name.startswith("head.time_embed.")}
    assert {name for name, dtype in dtypes.items() if dtype != torch.bfloat16} == islands
    assert bool(islands) == (family in ("mar", "flowar"))
