"""Drafter: the small feature-level draft network that LANTERN trains for speculative decoding (EAGLE's design, Li et
al. 2024; jadohu/LANTERN models/drafters/cnets_llamagen.py), over a causal core it drafts for.

The target core's last-layer state g_j (before its final norm: what its head reads to predict token j) and the
embedding of token j, drawn from it, enter one pair; `fc` fuses the pair, and `depth` causal blocks (RoPE at token j's
grid position) predict g_{j+1}, which the target's own head (final norm and output layer) turns into the draft
distribution of token j + 1. The drafter owns only `fc` and its blocks: the embeddings and the head are the target's,
read frozen, so the drafter costs one small block per drafted token.

A sequence: drafter slot j holds the pair (g_j, x_j), j = 0 .. T-1; its output predicts g_{j+1}.
"""

import torch
from torch import nn

from lit_ar.models.layers import Block, clear_kv_caches, llama_hidden_dim, setup_kv_caches


class Drafter(nn.Module):
    def __init__(self, dim: int, n_heads: int, depth: int = 1, multiple_of: int = 256, norm_eps: float = 1e-5):
        super().__init__()
        self.dim, self.depth = dim, depth
        self.fc = nn.Linear(2 * dim, dim)  # (embedding of x_j, g_j) -> the block's input, EAGLE's fusion
        hidden = llama_hidden_dim(dim, multiple_of)
        self.layers = nn.ModuleList(Block(dim, n_heads, mlp="swiglu", mlp_hidden=hidden, norm="rms", norm_eps=norm_eps,
                                          bias=False) for _ in range(depth))  # fmt: skip
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, features: torch.Tensor, embeddings: torch.Tensor, rope: torch.Tensor,
                input_pos: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Pairs of target states (B, T, C) and token embeddings (B, T, C), rotated by their tokens' positions
        (T | B, T, hd/2, 2) -> the predicted next states (B, T, C). Causal over the T pairs (training), or, with
        `input_pos` (B, T) (the slots of the pairs, per sequence), written into the caches and attending to every
        slot up to each pair's own."""
        x = self.fc(torch.cat([embeddings, features.to(embeddings.dtype)], -1))  # (B, T, C)
        mask = None
        if input_pos is not None:
            S = self.layers[0].attn.kv_cache.max_seq_len
            mask = (torch.arange(S, device=x.device) <= input_pos[..., None])[:, None]  # (B, 1, T, S)
        for layer in self.layers:
            x = layer(x, rope, mask=mask, input_pos=input_pos, is_causal=input_pos is None)
        return x

    def setup_caches(self, batch_size: int, max_seq_len: int, dtype: torch.dtype, device: torch.device) -> None:
        setup_kv_caches(self.layers, batch_size, max_seq_len, dtype, device)

    def clear_caches(self) -> None:
        clear_kv_caches(self.layers)
