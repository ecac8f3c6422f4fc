"""One size vocabulary across the generator families: `dim` (width), `depth` (blocks), `n_heads`, `n_kv_heads`.

Each family's former names (the causal family's n_layer / n_head / n_kv_head, the masked family's n_layers, the
scale family's width / heads) still configure the same model, so older configs and the hyper-parameters saved in
older checkpoints load; both names at once with different values are refused by name.
"""

from pathlib import Path

import pytest
import torch
import yaml

from lit_ar.systems import CausalARSystem, FlowARSystem, MaskedARSystem, ScaleARSystem

ROOT = Path(__file__).resolve().parents[1]
FORMER_NAMES = {"n_layer", "n_head", "n_kv_head", "n_layers", "width", "heads"}
GENERATORS = ("CausalARSystem", "MaskedARSystem", "ScaleARSystem", "FlowARSystem")


def causal(**sizes) -> CausalARSystem:
    torch.manual_seed(0)
    return CausalARSystem(vocab_size=16, grid_size=4, num_classes=3, **sizes)


def masked(**sizes) -> MaskedARSystem:
    torch.manual_seed(0)
    return MaskedARSystem(vocab_size=16, grid_size=4, num_classes=3, **sizes)


def blocks(system) -> list:
    core = system.core
    return list(getattr(core, "layers", None) or core.blocks)


def heads_of(system) -> tuple[int, int]:
    attn = blocks(system)[0].attn
    return attn.n_heads, attn.n_kv_heads


@pytest.mark.parametrize(
    "make, new, former",
    [
        (causal, dict(dim=32, depth=3, n_heads=4, n_kv_heads=2), dict(dim=32, n_layer=3, n_head=4, n_kv_head=2)),
        (masked, dict(dim=32, depth=3, n_heads=4), dict(dim=32, n_layers=3, n_heads=4)),
    ],
)
def test_former_names_build_the_same_model(make, new, former):
    a, b = make(**new), make(**former)
    assert len(blocks(a)) == len(blocks(b)) == 3 and heads_of(a) == heads_of(b)
    assert a.core.dim == b.core.dim == 32
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)  # same seed, same layout: the same weights


def test_the_scale_family_takes_the_vocabulary_and_its_former_names(msvq_ckpt):
    kw = dict(tokenizer_ckpt=str(msvq_ckpt), image_size=16, depth=1)
    a, b = ScaleARSystem(dim=32, n_heads=2, **kw), ScaleARSystem(width=32, heads=2, **kw)
    assert a.core.dim == b.core.dim == 32 and heads_of(a) == heads_of(b) == (2, 2)
    with pytest.raises(ValueError, match=r"model.init_args.width=64 and model.init_args.dim=32 disagree: width is the "
                                         r"former name of dim; set dim only"):  # fmt: skip
        ScaleARSystem(dim=32, width=64, n_heads=2, **kw)


def test_the_flow_family_speaks_the_vocabulary():
    system = FlowARSystem(backbone="causal", token_dim=4, grid_size=2, dim=32, depth=2, n_heads=4, head_width=16,
                          head_depth=1)  # fmt: skip
    assert len(system.core.blocks) == 2 and heads_of(system)[0] == 4 and system.core.dim == 32


def test_both_names_with_different_values_are_refused():
    with pytest.raises(ValueError, match=r"model.init_args.n_layer=1 and model.init_args.depth=2 disagree: n_layer "
                                         r"is the former name of depth; set depth only"):  # fmt: skip
        causal(depth=2, n_layer=1)
    with pytest.raises(ValueError, match=r"model.init_args.n_layers=4 and model.init_args.depth=2 disagree"):
        masked(depth=2, n_layers=4)
    assert len(blocks(causal(depth=2, n_layer=2))) == 2  # the same value under both names is no conflict


def test_a_checkpoint_saved_under_the_former_names_loads(tmp_path):
    """Hyper-parameters as a checkpoint written before the rename holds them (n_layer, n_head) load into a model of
    that size, with its weights."""
    old = causal(dim=32, n_layer=3, n_head=4)
    hparams = {k: v for k, v in old.hparams.items() if k not in ("depth", "n_heads", "n_kv_heads")}
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": old.state_dict(), "hyper_parameters": hparams, "pytorch-lightning_version": "2.5.0"},
               path)  # fmt: skip
    loaded = CausalARSystem.load_from_checkpoint(path, weights_only=True)
    assert len(blocks(loaded)) == 3 and heads_of(loaded)[0] == 4
    for key, value in old.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_shipped_configs_use_the_one_vocabulary():
    """No shipped generator config (nor a tutorial or notebook) spells a size by a former name."""
    offenders = []
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        model = (yaml.safe_load(path.read_text()) or {}).get("model") or {}
        family = str(model.get("class_path", "")).rsplit(".", 1)[-1]
        names = set((model.get("init_args") or {}).keys()) & FORMER_NAMES
        if family not in GENERATORS:  # an overlay without its class, or another system (a classifier has a width)
            names -= {"width"} if not family else names
        if names:
            offenders.append(f"{path.relative_to(ROOT)}: {sorted(names)}")
    assert not offenders, offenders
