"""ARPGTransformer: ARPG's decoupled decoder (Li et al. 2025, "Autoregressive Image Generation with Randomized
Parallel Decoding"; hp-l33/ARPG models/arpg.py), LlamaGen's blocks on lit_ar's shared layers.

Two halves of depth // 2 blocks each:
- the self-decoder: causal self-attention over the class prefix and the tokens generated so far (in their random
  order), each rotated (2D RoPE) by its own grid position. Its output, normed, gives one set of keys and values
  (`to_k`, `to_v`; keys rotated by the token's position) that every cross block shares: the memory saving.
- the cross-decoder: the queries are all one learned mask-token embedding, told apart only by the rotary encoding
  of the position each must predict (the target-position query); each cross block attends from them to the shared
  keys and values, with its own query and output projections and MLP.
Query i may see keys 0..i (the prefix and tokens 0..i-1 of the order), so a query's output depends on the tokens
before it and on its target position alone: several targets can be queried at once against the same keys, which is
ARPG's parallel decoding (lit_ar/methods/arpg.py).

A sequence, with one prefix slot (P = 1): keys at slots 0 (the class) and 1 .. T (tokens 0 .. T-1 of the order);
queries 0 .. T predict tokens 0 .. T of the order.
"""

import torch
import torch.nn.functional as F
from torch import nn

from lit_ar.models.layers import (
    Block,
    KVCache,
    RMSNorm,
    SwiGLU,
    apply_rope,
    cast,
    clear_kv_caches,
    llama_hidden_dim,
    rope_2d,
    setup_kv_caches,
)

# ARPG's released sizes (ARPG-L 320M, XL 719M, XXL 1.3B with 1000 classes and vocab 16384), then CPU sizes
PRESETS: dict[str, dict[str, int]] = {
    "ARPG-L": dict(dim=1024, depth=24, n_heads=16),
    "ARPG-XL": dict(dim=1280, depth=36, n_heads=20),
    "ARPG-XXL": dict(dim=1536, depth=48, n_heads=24),
    "ARPG-nano": dict(dim=64, depth=2, n_heads=4),
    "ARPG-micro": dict(dim=128, depth=4, n_heads=4),
    "ARPG-mini": dict(dim=256, depth=6, n_heads=8),
}


class CrossBlock(nn.Module):
    """Pre-norm block whose attention reads keys and values given from outside: queries (B, Q, C) -> (B, Q, C)."""

    def __init__(self, dim: int, n_heads: int, mlp_hidden: int, norm_eps: float, resid_dropout: float):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.norm1, self.norm2 = RMSNorm(dim, norm_eps), RMSNorm(dim, norm_eps)
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.mlp = SwiGLU(dim, mlp_hidden, resid_dropout, bias=False)
        self.resid_dropout = nn.Dropout(resid_dropout)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: torch.Tensor,
                mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:  # fmt: skip
        """q (B, Q, C); k, v (B, nh, S, hd) (k already rotated); rope (B, Q, hd/2, 2) of the target positions."""
        B, Q, C = q.shape
        query = self.wq(self.norm1(q)).view(B, Q, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, Q, hd)
        query = apply_rope(query, rope)
        y = F.scaled_dot_product_attention(query, cast(k, query.dtype), cast(v, query.dtype), attn_mask=mask,
                                           is_causal=is_causal)  # fmt: skip  # (B, nh, Q, hd)
        q = q + self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, Q, C)))
        return q + self.mlp(self.norm2(q))


class ARPGTransformer(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        grid_size: int,
        num_classes: int,
        dim: int = 1024,
        depth: int = 24,
        n_heads: int = 16,
        multiple_of: int = 256,
        norm_eps: float = 1e-5,
        rope_base: float = 10000.0,
        token_dropout: float = 0.0,
        resid_dropout: float = 0.0,
        query_position_embedding: bool = False,
        initializer_range: float = 0.02,
    ):
        super().__init__()
        head_dim = dim // n_heads
        if dim % n_heads or head_dim % 4:
            raise ValueError(f"dim={dim}, n_heads={n_heads}: 2D RoPE needs a head width dim/n_heads divisible by 4")
        if depth < 2 or depth % 2:
            raise ValueError(f"depth={depth}: ARPG splits its blocks into two equal halves; use an even depth >= 2")
        self.vocab_size, self.grid_size, self.num_classes = vocab_size, grid_size, num_classes
        self.num_tokens, self.cls_token_num, self.dim = grid_size * grid_size, 1, dim
        self.n_heads, self.head_dim = n_heads, head_dim

        self.cls_embedding = nn.Embedding(num_classes + 1, dim)  # row num_classes: the null class (CFG)
        self.tok_embeddings = nn.Embedding(vocab_size, dim)
        self.mask_query = nn.Parameter(torch.zeros(dim))  # every query starts as this one embedding
        # lit_ar's option: a learned embedding of the target position added to the query. RoPE alone only reweights
        # the keys a query attends to, so a query facing one key (the first, the class) cannot know its target.
        self.query_pos = nn.Embedding(self.num_tokens, dim) if query_position_embedding else None
        self.tok_dropout = nn.Dropout(token_dropout)
        hidden = llama_hidden_dim(dim, multiple_of)
        self.self_layers = nn.ModuleList(
            Block(dim, n_heads, mlp="swiglu", mlp_hidden=hidden, norm="rms", norm_eps=norm_eps, bias=False,
                  resid_dropout=resid_dropout)
            for _ in range(depth // 2)
        )  # fmt: skip
        self.kv_norm = RMSNorm(dim, norm_eps)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.cross_layers = nn.ModuleList(CrossBlock(dim, n_heads, hidden, norm_eps, resid_dropout)
                                          for _ in range(depth // 2))  # fmt: skip
        self.norm = RMSNorm(dim, norm_eps)
        self.output = nn.Linear(dim, vocab_size, bias=False)
        self.register_buffer("rope", rope_2d(grid_size, head_dim, rope_base, num_prefix=1), persistent=False)
        self.kv_cache: KVCache | None = None  # the shared keys and values, while sampling

        self.initializer_range = initializer_range
        self.apply(self._init_weights)
        nn.init.normal_(self.mask_query, std=initializer_range)
        nn.init.zeros_(self.output.weight)  # a uniform first prediction

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.initializer_range)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    @property
    def blocks(self) -> list[nn.Module]:
        return [*self.self_layers, *self.cross_layers]

    def prefix(self, labels: torch.Tensor) -> torch.Tensor:
        """labels (B,) (num_classes = null) -> the prefix embedding (B, 1, C)."""
        return self.cls_embedding(labels)[:, None]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Query states (..., C) -> logits (..., V) in fp32."""
        return self.output(self.norm(h)).float()

    def keys_values(self, x: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Self-decoder output (B, S, C) -> the shared keys (rotated by each slot's position) and values
        (B, nh, S, hd)."""
        B, S, _ = x.shape
        h = self.kv_norm(x)
        k = self.to_k(h).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.to_v(h).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        return apply_rope(k, rope), v

    def queries(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Target grid positions (B, Q) -> the mask-token queries (B, Q, C) and their RoPE (B, Q, hd/2, 2)."""
        q = self.mask_query.expand(*targets.shape, -1)
        return (q if self.query_pos is None else q + self.query_pos(targets)), self.rope[1 + targets]

    def hidden(self, tokens: torch.Tensor, labels: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: tokens (B, T) in `order` (B, L) (tokens[:, i] at grid position order[:, i]; None: raster),
        T <= L - 1, labels (B,) -> query states (B, T + 1, C); query j predicts token j of the order."""
        B, T = tokens.shape
        L = self.num_tokens
        if T > L - 1:
            raise ValueError(f"{T} tokens given; the model predicts {L} tokens from at most {L - 1} fed tokens")
        if self.kv_cache is not None:
            raise RuntimeError("KV caches are set up for sampling: call clear_caches() before a full forward")
        order = torch.arange(L, device=tokens.device).expand(B, L) if order is None else order
        x = torch.cat([self.prefix(labels), self.tok_embeddings(tokens)], 1)  # (B, 1 + T, C)
        rope = torch.cat([self.rope[:1].expand(B, -1, -1, -1), self.rope[1 + order[:, :T]]], 1)  # (B, 1+T, hd/2, 2)
        x = self.tok_dropout(x)
        for layer in self.self_layers:
            x = layer(x, rope, is_causal=True)
        k, v = self.keys_values(x, rope)  # (B, nh, 1 + T, hd)
        q, q_rope = self.queries(order[:, : T + 1])  # (B, T + 1, C)
        for layer in self.cross_layers:
            q = layer(q, k, v, q_rope, is_causal=True)  # query j sees keys 0..j
        return q

    # -- parallel decoding on static caches ---------------------------------------------------------------------
    def setup_caches(self, batch_size: int, dtype: torch.dtype) -> None:
        """Static caches for the self-decoder's layers and the shared keys and values: 1 + L slots."""
        S = 1 + self.num_tokens
        setup_kv_caches(self.self_layers, batch_size, S, dtype, self.rope.device)
        self.kv_cache = KVCache(batch_size, S, self.n_heads, self.head_dim, dtype, self.rope.device)

    def clear_caches(self) -> None:
        clear_kv_caches(self.self_layers)
        self.kv_cache = None

    def decode(self, x: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
               targets: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """One model call: write the new inputs x (B, n, C) (the prefix, or the tokens generated last step) at cache
        slots `slots` (n,), rotated by their grid `positions` (B, n) (-1: the prefix), causally among themselves;
        then query `targets` (B, Q) against every key written so far -> query states (B, Q, C)."""
        S = self.kv_cache.max_seq_len
        written = int(slots[-1]) + 1  # keys 0 .. written - 1 are visible to the queries
        rope = self.rope[1 + positions]  # (B, n, hd/2, 2); position -1 is the prefix's row 0
        mask = torch.arange(S, device=x.device) <= slots[:, None]  # (n, S) causal over the slots
        for layer in self.self_layers:
            x = layer(x, rope, mask=mask, input_pos=slots)
        k, v = self.keys_values(x, rope)
        k, v = self.kv_cache.update(slots, k, v)  # (B, nh, S, hd)
        q, q_rope = self.queries(targets)
        for layer in self.cross_layers:
            q = layer(q, k[:, :, :written], v[:, :, :written], q_rope)  # every target sees every key written
        return q
