"""Scale-wise AR (VAR): the ScaleTransformer core, its block-causal mask and KV-cached scale steps, and the
ScaleARSystem over a real multi-scale VQ tokenizer (training, sampling, CLI, DDP)."""

import pytest
import torch

from lit_ar.models.layers import clear_kv_caches, setup_kv_caches
from lit_ar.models.scale_ar import ScaleTransformer, block_causal_mask, scale_levels

SCALES = (1, 2, 3, 4)  # L = 30 tokens
CV = 8  # codebook width


def tiny(**kw) -> ScaleTransformer:
    torch.manual_seed(0)
    args = dict(num_classes=5, vocab_size=16, codebook_dim=CV, scales=SCALES, depth=2, dim=32, n_heads=4)
    model = ScaleTransformer(**{**args, **kw}).eval()
    # VAR's init starts every block near the identity (gates ~1e-5); make them matter so the tests see the blocks
    model.init_weights(init_head=1.0, init_adaln=1.0, init_adaln_gamma=1.0)
    return model


def teacher_inputs(B: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    L = sum(s * s for s in SCALES)
    return torch.randint(0, 5, (B,), generator=g), torch.randn(B, L - 1, CV, generator=g)


def cached_logits(model: ScaleTransformer, labels: torch.Tensor, x_BLCv: torch.Tensor) -> torch.Tensor:
    """Scale by scale with the static KV caches, as sampling runs -> (B, L, V)."""
    setup_kv_caches(model.blocks, len(labels), model.seq_len, torch.float32, labels.device)
    cond, block_cond = model.condition(labels)
    x, out = model.start_tokens(cond), []
    for k, (begin, end) in enumerate(model.bounds):
        out.append(model.forward_scale(k, x, cond, block_cond))
        if k + 1 < len(model.scales):
            b, e = model.bounds[k + 1]
            x = model.embed_scale(k + 1, x_BLCv[:, b - 1 : e - 1])
    clear_kv_caches(model.blocks)
    return torch.cat(out, dim=1)


def test_d16_preset_has_var_d16_parameter_count():
    with torch.device("meta"):  # no memory, no init work: only the shapes count
        model = ScaleTransformer(num_classes=1000, vocab_size=4096, codebook_dim=32, depth=16)
    assert model.dim == 1024 and model.blocks[0].attn.n_heads == 16 and model.seq_len == 680
    assert sum(p.numel() for p in model.parameters()) == 310_283_520
    names = {n for n, _ in model.named_parameters()}
    for part in ("class_emb.weight", "pos_start", "pos_1LC", "lvl_embed.weight", "word_embed.weight",
                 "blocks.0.ada.1.weight", "blocks.0.attn.q_bias", "blocks.0.attn.v_bias", "blocks.0.attn.logit_scale",
                 "head_nm.ada.1.weight", "head.weight"):  # fmt: skip
        assert part in names
    assert model.class_emb.num_embeddings == 1001  # the last row is the null class of CFG


def test_block_causal_mask_sees_exactly_its_scale_and_coarser():
    mask = block_causal_mask(SCALES)
    levels = scale_levels(SCALES)
    assert levels.tolist() == [0] + [1] * 4 + [2] * 9 + [3] * 16
    for i in range(len(levels)):
        for j in range(len(levels)):
            assert bool(mask[i, j]) == bool(levels[j] <= levels[i])


@pytest.mark.parametrize("variant", [{}, {"shared_adaln": True}, {"rope": True}, {"cosine_attn": False}])
def test_scale_k_logits_depend_on_exactly_scales_up_to_k(variant):
    """Through the whole model: changing the input of scale j changes the logits of scales >= j only."""
    model = tiny(**variant)
    labels, x = teacher_inputs()
    base = model(labels, x)
    for j in range(1, len(SCALES)):
        b, e = model.bounds[j]
        x2 = x.clone()
        x2[:, b - 1 : e - 1] += 1.0
        diff = (model(labels, x2) - base).abs().amax(dim=(0, 2))  # (L,)
        for k, (bk, ek) in enumerate(model.bounds):
            changed = bool(diff[bk:ek].max() > 1e-6)
            assert changed == (k >= j), f"scale {k} {'ignores' if k >= j else 'sees'} scale {j}"


@pytest.mark.parametrize("variant", [{}, {"shared_adaln": True}, {"rope": True}, {"cosine_attn": False}])
def test_cached_scale_steps_match_the_teacher_forced_forward(variant):
    model = tiny(**variant)
    labels, x = teacher_inputs()
    torch.testing.assert_close(cached_logits(model, labels, x), model(labels, x), rtol=1e-4, atol=1e-5)


def test_dropout_and_drop_path_are_off_in_eval_and_on_in_train():
    model = tiny(dropout=0.2, drop_path=0.2)
    labels, x = teacher_inputs()
    torch.testing.assert_close(model(labels, x), model(labels, x))
    model.train()
    assert not torch.allclose(model(labels, x), model(labels, x))


def test_width_not_divisible_by_heads_is_refused():
    with pytest.raises(ValueError, match=r"width=30 is not divisible by heads=4"):
        tiny(dim=30)
    with pytest.raises(ValueError, match=r"rope needs a head width .* divisible by 4"):
        tiny(dim=24, n_heads=4, rope=True)


@pytest.mark.slow
def test_compiled_blocks_equal_eager():
    model = tiny()
    labels, x = teacher_inputs()
    eager = model(labels, x)
    for block in model.blocks:
        block.compile()
    torch.testing.assert_close(model(labels, x), eager, rtol=1e-4, atol=1e-5)
    assert all(not n.startswith("_orig_mod") and "._orig_mod" not in n for n in model.state_dict())
