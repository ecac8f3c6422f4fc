"""Transformer layers shared by every lit_ar generator: norms, MLPs, RoPE, attention with a static KV cache, AdaLN.

Read top to bottom: a dtype helper, norms, MLPs, rotary embeddings, the KV cache, attention, conditioning, the block.
Variants (norm, MLP, qk-norm, AdaLN, cosine attention) are constructor fields, not subclasses.
"""

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------------------------
# Dtypes


def cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in `dtype`, with no call at all when it already is (`.to` to the same dtype is still one aten call)."""
    return x if x.dtype == dtype else x.to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# Norms


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, elementwise_affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32: the mean of squares overflows/underflows in half precision
        xf = cast(x, torch.float32)
        y = cast(xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps), x.dtype)
        return y * self.weight if self.weight is not None else y


def make_norm(kind: Literal["rms", "layer"], dim: int, eps: float, affine: bool = True) -> nn.Module:
    if kind == "rms":
        return RMSNorm(dim, eps, elementwise_affine=affine)
    if kind == "layer":
        return nn.LayerNorm(dim, eps=eps, elementwise_affine=affine)
    raise ValueError(f"norm={kind!r} is not supported; use 'rms' or 'layer'")


# ---------------------------------------------------------------------------------------------------------------
# MLPs


def dropout(p: float) -> nn.Module:
    """Dropout, or nothing at p = 0: an inactive nn.Dropout still makes an aten call per forward, and sampling on a
    GPU at small batch is bound by the count of such calls, not by arithmetic."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


def llama_hidden_dim(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """LlamaGen's SwiGLU width: 2/3 of 4*dim, optionally scaled, rounded up to a multiple of `multiple_of`."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, p: float = 0.0, bias: bool = False):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=bias)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=bias)  # value
        self.w2 = nn.Linear(hidden, dim, bias=bias)
        self.dropout = dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class GELUMLP(nn.Module):
    """approximate: F.gelu's `tanh` (VAR's FFN, GPT-2) or `none`, the exact erf form (timm's nn.GELU, so MAR's)."""

    def __init__(self, dim: int, hidden: int, p: float = 0.0, bias: bool = True, approximate: str = "tanh"):
        super().__init__()
        if approximate not in ("tanh", "none"):
            raise ValueError(f"gelu_approximate={approximate!r} is not supported; use 'tanh' or 'none' (exact)")
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.dropout = dropout(p)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(F.gelu(self.fc1(x), approximate=self.approximate)))


# ---------------------------------------------------------------------------------------------------------------
# Rotary position embeddings. Tables are (T, head_dim / 2) cos and sin; pairs (x[2i], x[2i+1]) rotate together,
# as in LlamaGen's complex formulation. Prefix tokens (class, start) get the identity rotation (cos 1, sin 0).


def rope_1d(seq_len: int, head_dim: int, base: float = 10000.0, num_prefix: int = 0) -> torch.Tensor:
    """(num_prefix + seq_len, head_dim // 2, 2) table of (cos, sin) for positions 0..seq_len-1."""
    freqs = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (hd/2,)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), freqs)  # (T, hd/2)
    return _with_prefix(torch.stack([angles.cos(), angles.sin()], -1).float(), num_prefix)


def rope_2d(grid_size: int, head_dim: int, base: float = 10000.0, num_prefix: int = 0,
            pos_scale: float = 1.0) -> torch.Tensor:  # fmt: skip
    """(num_prefix + grid**2, head_dim // 2, 2) table: the first half of each head rotates with the row, the
    second half with the column, raster order (LlamaGen's 2D RoPE). `pos_scale` stretches the integer positions
    (a coarse s x s map of a G x G image uses G / s, so every scale of a pyramid shares one coordinate frame)."""
    half = head_dim // 2
    freqs = 1.0 / base ** (torch.arange(0, half, 2, dtype=torch.float64)[: half // 2] / half)  # (hd/4,)
    pos = torch.arange(grid_size, dtype=torch.float64) * pos_scale
    rows = torch.outer(pos, freqs)[:, None, :].expand(grid_size, grid_size, -1)  # (G, G, hd/4)
    cols = torch.outer(pos, freqs)[None, :, :].expand(grid_size, grid_size, -1)  # (G, G, hd/4)
    angles = torch.cat([rows, cols], dim=-1).reshape(grid_size * grid_size, half)  # (G*G, hd/2)
    return _with_prefix(torch.stack([angles.cos(), angles.sin()], -1).float(), num_prefix)


def _with_prefix(table: torch.Tensor, num_prefix: int) -> torch.Tensor:
    identity = torch.zeros(num_prefix, table.shape[1], 2)
    identity[..., 0] = 1.0
    return torch.cat([identity, table], dim=0)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x (B, nh, T, hd), table (T, hd/2, 2) or (B, T, hd/2, 2) -> x rotated, same dtype."""
    xf = cast(x, torch.float32).reshape(*x.shape[:-1], -1, 2)  # (B, nh, T, hd/2, 2)
    t = table.unsqueeze(1) if table.ndim == 4 else table  # broadcast over heads (and batch)
    cos, sin = t[..., 0], t[..., 1]
    out = torch.stack([xf[..., 0] * cos - xf[..., 1] * sin, xf[..., 1] * cos + xf[..., 0] * sin], dim=-1)
    return cast(out.flatten(-2), x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Static KV cache: preallocated, written in place at `input_pos`, so a decode step has fixed shapes and compiles
# once (torch.compile replays it at every position).


class KVCache(nn.Module):
    def __init__(self, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | None = None):  # fmt: skip
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[2]

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nkv, T, hd) at positions `input_pos`: (T,) shared by the batch, or (B, T) per sequence (a
        speculative decoder whose sequences have advanced by different counts); return the whole cache
        (B, nkv, S, hd)."""
        if input_pos.ndim == 2:
            index = input_pos[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])  # (B, nkv, T, hd)
            self.k.scatter_(2, index, cast(k, self.k.dtype))
            self.v.scatter_(2, index, cast(v, self.v.dtype))
            return self.k, self.v
        self.k.index_copy_(2, input_pos, cast(k, self.k.dtype))
        self.v.index_copy_(2, input_pos, cast(v, self.v.dtype))
        return self.k, self.v


# ---------------------------------------------------------------------------------------------------------------
# Attention


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads, optional qk-norm or cosine (l2-normalised) attention with a
    learned per-head scale (VAR), RoPE, an arbitrary boolean mask (True = may attend), and an optional KV cache."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        qk_norm: bool = False,
        cosine_attn: bool = False,
        bias: bool = False,
        attn_dropout: float = 0.0,
        resid_dropout: float = 0.0,
        norm_eps: float = 1e-5,
        qv_bias: bool = False,
    ):
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        if dim % n_heads or n_heads % n_kv_heads:
            raise ValueError(f"dim={dim}, n_heads={n_heads}, n_kv_heads={n_kv_heads}: heads must divide evenly")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.wqkv = nn.Linear(dim, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=bias and not qv_bias)
        # VAR: learned biases on q and v only; a bias on k adds the same amount to every logit of a query, which
        # softmax ignores, so it is left out (and wqkv then has no bias of its own)
        self.q_bias = nn.Parameter(torch.zeros(n_heads * self.head_dim)) if qv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(n_kv_heads * self.head_dim)) if qv_bias else None
        if qv_bias:  # k's place in the projection's bias, always zero (not a parameter, not in checkpoints)
            self.register_buffer("k_bias", torch.zeros(n_kv_heads * self.head_dim), persistent=False)
        self.wo = nn.Linear(dim, dim, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None
        # VAR's cosine attention: logits = scale * cos(q, k), scale learned per head, clamped at 100
        self.logit_scale = nn.Parameter(torch.full((n_heads, 1, 1), math.log(4.0))) if cosine_attn else None
        self.attn_dropout, self.resid_dropout = attn_dropout, dropout(resid_dropout)
        self.kv_cache: KVCache | None = None

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
        is_causal: bool = False,
        kv_len: int | None = None,
        query_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). With a KV cache, k and v are written at `input_pos` and the queries attend to the
        cache through `mask`; `kv_len` instead restricts them to the first kv_len cache positions, all visible (a
        scale or group that may see everything written so far: no mask, and no work on the empty tail).
        `query_index` (B, n): only these positions' outputs are wanted (MAR's last decoder block); they alone query,
        every position still gives keys and values, and the output is (B, n, C). No mask, cache or causal flag."""
        if query_index is not None and (mask is not None or self.kv_cache is not None or is_causal):
            raise ValueError("query_index takes full bidirectional attention: no mask, KV cache or is_causal")
        B, T, C = x.shape
        nh, nkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        if self.q_bias is None:
            qkv = self.wqkv(x)  # (B, T, (nh + 2 nkv) hd)
        else:  # VAR's q and v biases, added by the projection itself
            qkv = F.linear(x, self.wqkv.weight, torch.cat([self.q_bias, self.k_bias, self.v_bias]))
        # views, no copies: (B, T, nh + 2 nkv, hd) -> (B, nh + 2 nkv, T, hd) -> q (B, nh, T, hd), k, v (B, nkv, T, hd)
        q, k, v = qkv.view(B, T, nh + 2 * nkv, hd).transpose(1, 2).split([nh, nkv, nkv], dim=1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        scale = None
        if self.logit_scale is not None:  # normalised in fp32, then back to v's dtype for the attention kernel
            q = F.normalize(cast(q, torch.float32), dim=-1) * self.logit_scale.clamp(max=math.log(100.0)).exp()
            k = F.normalize(cast(k, torch.float32), dim=-1)
            q, k, scale = cast(q, v.dtype), cast(k, v.dtype), 1.0
        if query_index is not None:
            # after the per-row transforms, so rope and norms apply as usual; the wasted part of the fused projection
            # is q's third of it at the positions dropped, against attention, wo and the MLP saved there
            q = q.gather(2, query_index[:, None, :, None].expand(-1, nh, -1, hd))  # (B, nh, n, hd)
            T = query_index.shape[1]
        if self.kv_cache is not None:
            if input_pos is None:
                raise ValueError("a KV cache is set up: pass input_pos (the positions being written)")
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, nkv, S, hd)
            if kv_len is not None:
                k, v = k[:, :, :kv_len], v[:, :, :kv_len]  # (B, nkv, kv_len, hd)
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, nh, S, hd)
        if T == 1 and self.kv_cache is not None:
            y = _single_query_attention(q, k, v, mask, scale)  # (B, nh, 1, hd)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.attn_dropout if self.training else 0.0,
                is_causal=is_causal and mask is None, scale=scale,
            )  # fmt: skip  # (B, nh, T, hd)
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, T, C)))


def _single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                             scale: float | None) -> torch.Tensor:  # fmt: skip
    """One decoding query against the whole cache: q (B, nh, 1, hd), k/v (B, nh, S, hd) -> (B, nh, 1, hd).
    Two small matmuls with the softmax in fp32: the fused CPU kernel is slower for a single bf16 query."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    att = cast(q @ k.transpose(-2, -1), torch.float32) * scale  # (B, nh, 1, S)
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else att + mask
    return cast(att.softmax(-1), v.dtype) @ v


# ---------------------------------------------------------------------------------------------------------------
# Conditioning and the block


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN: x (B, T, C), shift/scale (B, 1, C) or (B, T, C) -> x * (1 + scale) + shift (two calls, not three)."""
    return torch.addcmul(shift, x, 1 + scale)


class DropPath(nn.Module):
    """Stochastic depth: drops a sample's whole residual branch with probability p (scaled at train time)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = torch.rand(x.shape[0], *([1] * (x.ndim - 1)), device=x.device, dtype=x.dtype) >= self.p
        return x * keep / (1 - self.p)


class Block(nn.Module):
    """Pre-norm transformer block. With `cond_dim`, AdaLN: the condition (B, cond_dim) or (B, T, cond_dim) sets
    shift, scale and gate of both branches (zero-initialised gates, so a new block starts as the identity).
    With `shared_ada` (VAR's shared_aln) one linear outside the blocks makes the modulation, passed as `cond`
    (B, 6*dim) or (B, T, 6*dim), and each block adds its own learned offset `ada_offset` (6*dim,)."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        mlp: Literal["swiglu", "gelu"] = "swiglu",
        mlp_hidden: int | None = None,
        norm: Literal["rms", "layer"] = "rms",
        norm_eps: float = 1e-5,
        qk_norm: bool = False,
        cosine_attn: bool = False,
        bias: bool = False,
        cond_dim: int | None = None,
        attn_dropout: float = 0.0,
        resid_dropout: float = 0.0,
        drop_path: float = 0.0,
        qv_bias: bool = False,
        shared_ada: bool = False,
        gelu_approximate: Literal["tanh", "none"] = "tanh",
    ):
        super().__init__()
        self.attn = Attention(dim, n_heads, n_kv_heads, qk_norm, cosine_attn, bias, attn_dropout, resid_dropout,
                              norm_eps, qv_bias)  # fmt: skip
        hidden = mlp_hidden or (llama_hidden_dim(dim) if mlp == "swiglu" else 4 * dim)
        if mlp == "swiglu":
            self.mlp = SwiGLU(dim, hidden, resid_dropout, bias)
        elif mlp == "gelu":
            self.mlp = GELUMLP(dim, hidden, resid_dropout, bias=True, approximate=gelu_approximate)
        else:
            raise ValueError(f"mlp={mlp!r} is not supported; use 'swiglu' or 'gelu'")
        # under AdaLN the modulation replaces the norms' own affine parameters
        affine = cond_dim is None and not shared_ada
        self.norm1, self.norm2 = make_norm(norm, dim, norm_eps, affine), make_norm(norm, dim, norm_eps, affine)
        self.drop_path = DropPath(drop_path)
        self.ada = None
        self.ada_offset = nn.Parameter(torch.zeros(6 * dim)) if shared_ada else None
        if cond_dim is not None and not shared_ada:
            self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim))
            nn.init.zeros_(self.ada[1].weight)
            nn.init.zeros_(self.ada[1].bias)

    def modulation(self, cond: torch.Tensor) -> torch.Tensor:
        """AdaLN: condition (B, cond_dim) or (B, T, cond_dim) -> shift, scale, gate of both branches (..., 6C)."""
        return self.ada(cond) if self.ada is not None else cond + self.ada_offset

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        is_causal: bool = False,
        mod: torch.Tensor | None = None,
        kv_len: int | None = None,
        query_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`mod`: this block's AdaLN modulation `self.modulation(cond)` computed beforehand (a sampler whose
        condition is fixed over many steps computes it once). `kv_len`: see Attention.forward. `query_index` (B, n):
        the positions whose outputs are wanted, (B, T, C) -> (B, n, C); every position still serves as a key
        (Attention.forward), and the MLP runs on those n rows alone. Blocks without AdaLN only."""
        if self.ada is None and self.ada_offset is None:
            # the residual at the wanted positions only: (B, T, C), or (B, n, C) with query_index
            res = x if query_index is None else x.gather(1, query_index[..., None].expand(-1, -1, x.shape[-1]))
            x = res + self.drop_path(self.attn(self.norm1(x), rope, mask, input_pos, is_causal, kv_len, query_index))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        if query_index is not None:
            raise ValueError("query_index is for blocks without AdaLN (cond_dim=None, shared_ada=False)")
        mod = self.modulation(cond) if mod is None else mod  # (B, 6C) or (B, T, 6C)
        if mod.ndim == 2:
            mod = mod[:, None]  # (B, 1, 6C)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
        # x + gate * branch, fused (one call instead of two: see `dropout` for why calls count)
        x = torch.addcmul(x, gate1, self.drop_path(self.attn(modulate(self.norm1(x), shift1, scale1), rope, mask,
                                                             input_pos, is_causal, kv_len)))  # fmt: skip
        return torch.addcmul(x, gate2, self.drop_path(self.mlp(modulate(self.norm2(x), shift2, scale2))))


def setup_kv_caches(blocks: nn.ModuleList, batch_size: int, max_seq_len: int, dtype: torch.dtype,
                    device: torch.device) -> None:  # fmt: skip
    """Give every block's attention a fresh static cache (call before prefill)."""
    for block in blocks:
        a = block.attn
        a.kv_cache = KVCache(batch_size, max_seq_len, a.n_kv_heads, a.head_dim, dtype, device)


def clear_kv_caches(blocks: nn.ModuleList) -> None:
    for block in blocks:
        block.attn.kv_cache = None
