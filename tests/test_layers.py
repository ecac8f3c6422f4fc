"""Shared transformer layers: the static KV cache reproduces the full forward, RoPE, GQA, AdaLN, cosine attention."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_ar.models.layers import (
    Attention,
    Block,
    KVCache,
    apply_rope,
    clear_kv_caches,
    llama_hidden_dim,
    rope_1d,
    rope_2d,
    setup_kv_caches,
)


def tiny_stack(**kw) -> nn.ModuleList:
    torch.manual_seed(0)
    return nn.ModuleList(Block(32, 4, **kw) for _ in range(2)).eval()


def run(blocks, x, **kw):
    for b in blocks:
        x = b(x, **kw)
    return x


@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 2, "qk_norm": True}, {"mlp": "gelu", "norm": "layer"},
                                {"cosine_attn": True}])  # fmt: skip
def test_kv_cache_decode_equals_full_causal_forward(kw):
    blocks = tiny_stack(**kw)
    T = 10
    x = torch.randn(3, T, 32)
    rope = rope_2d(3, 8, num_prefix=1)  # 1 prefix token + a 3x3 grid
    full = run(blocks, x, rope=rope, is_causal=True)
    setup_kv_caches(blocks, 3, 16, torch.float32, x.device)  # cache longer than the sequence: masks do the rest
    causal = torch.ones(16, 16, dtype=torch.bool).tril()
    # prefill 4 tokens, then one token at a time
    pos = torch.arange(4)
    outs = [run(blocks, x[:, :4], rope=rope[pos], mask=causal[pos], input_pos=pos)]
    for t in range(4, T):
        pos = torch.tensor([t])
        outs.append(run(blocks, x[:, t : t + 1], rope=rope[pos], mask=causal[pos], input_pos=pos))
    clear_kv_caches(blocks)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)


def test_rope_tables_and_rotation():
    t1 = rope_1d(5, 8, num_prefix=2)
    assert t1.shape == (7, 4, 2)
    assert torch.equal(t1[:2, :, 0], torch.ones(2, 4)) and torch.equal(t1[:2, :, 1], torch.zeros(2, 4))
    t2 = rope_2d(4, 16)
    assert t2.shape == (16, 8, 2)
    # the row half depends only on the row, the column half only on the column
    assert torch.equal(t2[0, :4], t2[3, :4]) and not torch.equal(t2[0, 4:], t2[3, 4:])
    assert torch.equal(t2[0, 4:], t2[4, 4:]) and not torch.equal(t2[0, :4], t2[4, :4])
    x = torch.randn(2, 3, 16, 16)  # (B, nh, T, hd)
    y = apply_rope(x, t2)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))  # a rotation keeps norms
    # relative: <R(p)q, R(p')k> depends only on p - p' (1D)
    t = rope_1d(8, 16)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    d1 = (apply_rope(q, t[2:3]) * apply_rope(k, t[0:1])).sum()
    d2 = (apply_rope(q, t[7:8]) * apply_rope(k, t[5:6])).sum()
    torch.testing.assert_close(d1, d2)


def test_gqa_matches_repeated_heads():
    torch.manual_seed(0)
    attn = Attention(32, 4, n_kv_heads=1)
    x = torch.randn(2, 5, 32)
    q, k, v = attn.wqkv(x).split([32, 8, 8], -1)
    q = q.view(2, 5, 4, 8).transpose(1, 2)
    k = k.view(2, 5, 1, 8).transpose(1, 2).expand(-1, 4, -1, -1)
    v = v.view(2, 5, 1, 8).transpose(1, 2).expand(-1, 4, -1, -1)
    ref = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1) @ v
    torch.testing.assert_close(attn(x), attn.wo(ref.transpose(1, 2).reshape(2, 5, 32)))


def test_arbitrary_mask_blocks_attention():
    torch.manual_seed(0)
    attn = Attention(16, 2).eval()
    x = torch.randn(1, 4, 16)
    mask = torch.eye(4, dtype=torch.bool)  # each token sees only itself
    y = attn(x, mask=mask)
    x2 = x.clone()
    x2[:, 1:] = torch.randn(1, 3, 16)
    torch.testing.assert_close(attn(x2, mask=mask)[:, 0], y[:, 0])


@pytest.mark.parametrize("kw", [{"mlp": "gelu", "norm": "layer", "bias": True}, {"n_kv_heads": 2, "qk_norm": True},
                                {"cosine_attn": True, "qv_bias": True}])  # fmt: skip
def test_query_index_gives_the_full_forward_at_those_positions(kw):
    """MAR's last decoder block makes outputs only where the head reads them: the same rows as the full block."""
    torch.manual_seed(0)
    block = Block(32, 4, **kw).eval()
    x = torch.randn(3, 10, 32)
    index = torch.stack([torch.randperm(10)[:4] for _ in range(3)])  # (3, 4) different positions per row
    full = block(x, rope=rope_1d(10, 8))
    out = block(x, rope=rope_1d(10, 8), query_index=index)
    assert out.shape == (3, 4, 32)
    torch.testing.assert_close(out, full.gather(1, index[..., None].expand(-1, -1, 32)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="query_index takes full bidirectional attention"):
        block(x, is_causal=True, query_index=index)
    with pytest.raises(ValueError, match="query_index is for blocks without AdaLN"):
        Block(32, 4, cond_dim=8)(x, cond=torch.randn(3, 8), query_index=index)


def test_adaln_block_starts_as_identity_and_conditions():
    torch.manual_seed(0)
    block = Block(32, 4, cond_dim=16)
    x, c = torch.randn(2, 6, 32), torch.randn(2, 16)
    torch.testing.assert_close(block(x, cond=c), x)  # zero-initialised modulation
    nn.init.normal_(block.ada[1].weight, std=0.1)
    assert not torch.allclose(block(x, cond=c), block(x, cond=torch.randn(2, 16)))


def test_llamagen_mlp_width():
    assert llama_hidden_dim(768) == 2048 and llama_hidden_dim(1024) == 2816 and llama_hidden_dim(1280) == 3584


def test_cache_requires_positions():
    blocks = tiny_stack()
    setup_kv_caches(blocks, 1, 4, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="pass input_pos"):
        blocks[0](torch.randn(1, 1, 32))


def test_activation_checkpointing_keeps_gradients_and_names():
    from lit_ar.performance import enable_activation_checkpointing

    blocks = tiny_stack().train()
    x = torch.randn(2, 6, 32, requires_grad=True)
    run(blocks, x, is_causal=True).square().sum().backward()
    ref = {n: p.grad.clone() for n, p in blocks.named_parameters()}
    names = list(dict(blocks.state_dict()))
    blocks.zero_grad()
    assert enable_activation_checkpointing(blocks) == 2 and enable_activation_checkpointing(blocks) == 0
    run(blocks, x, is_causal=True).square().sum().backward()
    for n, p in blocks.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], msg=n)
    assert list(dict(blocks.state_dict())) == names


def test_var_attention_equals_its_reference_computation():
    """q/v biases added by the projection, heads split by views, cosine attention with the clamped learned scale."""
    torch.manual_seed(0)
    attn = Attention(32, 4, bias=True, qv_bias=True, cosine_attn=True).eval()
    with torch.no_grad():
        for p in (attn.q_bias, attn.v_bias, attn.logit_scale):
            p.normal_()
    x = torch.randn(2, 5, 32)
    q, k, v = attn.wqkv(x).split([32, 32, 32], -1)
    q, v = q + attn.q_bias, v + attn.v_bias
    q, k, v = (t.view(2, 5, 4, 8).transpose(1, 2) for t in (q, k, v))
    cosine = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)  # (B, nh, T, T)
    logits = cosine * attn.logit_scale.clamp(max=math.log(100)).exp()
    ref = torch.softmax(logits, -1) @ v
    torch.testing.assert_close(attn(x), attn.wo(ref.transpose(1, 2).reshape(2, 5, 32)))


def test_an_eval_block_makes_no_no_op_calls():
    """Sampling on a GPU at small batch is bound by the number of aten calls (VAR-d16 eager against VAR's sampler):
    no inactive dropout, no cast to the dtype a tensor already has, no unfused AdaLN arithmetic."""
    from torch.profiler import ProfilerActivity, profile

    block = Block(32, 4, mlp="gelu", norm="layer", cosine_attn=True, bias=True, qv_bias=True, cond_dim=32).eval()
    x, mod = torch.randn(2, 5, 32), torch.randn(2, 6 * 32)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        block(x, mod=mod)
    calls = [e.name for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None]
    assert not {"aten::dropout", "aten::to", "aten::type_as"} & set(calls), calls
    assert calls.count("aten::addcmul") == 4 and "aten::add" in calls  # AdaLN twice, gated residual twice
    assert len(calls) <= 40, f"{len(calls)} aten calls for one block forward: {calls}"


def test_an_fp32_llamagen_block_with_a_kv_cache_makes_no_same_dtype_casts():
    """The causal family's decode step (RMSNorm, qk-norm, RoPE, one query against the KV cache) in fp32: no cast
    to the dtype a tensor already has, and no inactive dropout."""
    from torch.profiler import ProfilerActivity, profile

    block = Block(32, 4, qk_norm=True).eval()
    block.attn.kv_cache = KVCache(2, 8, 4, 8, torch.float32)
    x, rope = torch.randn(2, 1, 32), rope_1d(8, 8)[3:4]
    input_pos, mask = torch.tensor([3]), torch.ones(1, 8, dtype=torch.bool)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        block(x, rope=rope, input_pos=input_pos, mask=mask)
    calls = [e.name for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None]
    assert not {"aten::dropout", "aten::to", "aten::type_as"} & set(calls), calls


def test_gelu_mlps_use_the_gelu_of_the_peer_they_follow():
    """MAR's blocks are timm's (nn.GELU, the exact erf form); VAR's FFN uses the tanh approximation. The two differ
    by up to about 1e-3 per activation, so a block with the wrong one is a different network from the peer's."""
    from lit_ar.models.mar import MARTransformer
    from lit_ar.models.scale_ar import ScaleTransformer

    def gelu_of(mlp, approximate):
        x = torch.linspace(-4, 4, 64)[:, None].expand(64, mlp.fc1.in_features)
        ref = mlp.fc2(F.gelu(mlp.fc1(x), approximate=approximate))
        other = mlp.fc2(F.gelu(mlp.fc1(x), approximate="tanh" if approximate == "none" else "none"))
        assert not torch.allclose(ref, other, rtol=0, atol=1e-6)  # the input tells the two apart
        return torch.equal(mlp(x), ref)

    torch.manual_seed(0)
    mar = MARTransformer(token_dim=4, seq_len=16, num_classes=3, dim=32, depth=1, n_heads=2, buffer_size=4).eval()
    assert all(gelu_of(b.mlp, "none") for b in mar.blocks)
    var = ScaleTransformer(num_classes=3, vocab_size=16, codebook_dim=4, scales=(1, 2), depth=1, dim=32, n_heads=2)
    assert all(gelu_of(b.mlp, "tanh") for b in var.blocks)
    with pytest.raises(ValueError, match=r"gelu_approximate='erf' is not supported; use 'tanh' or 'none'"):
        Block(32, 4, mlp="gelu", gelu_approximate="erf")
