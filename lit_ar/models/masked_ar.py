"""MaskedTransformer: the bidirectional token transformer of MaskGIT (and of MAR's generation order).

It sees a raster grid of discrete tokens where some are replaced by a mask token and predicts, at every position,
the distribution of the token there. A class token in front carries the condition (the null class
`num_classes` stands for "no class", for classifier-free guidance). Sampling loops and losses live in
lit_ar.systems.masked_ar; this file is architecture only.

Read top to bottom: presets, then the model (embeddings, blocks, head).
"""

from typing import Literal

import torch
from torch import nn

from lit_ar.models.layers import Block, make_norm, rope_2d

# Sizes by name. "tiny" trains in CPU-seconds (tests, tutorials); "small" fits the 64x64 shapes data on one GPU;
# "base" is MaskGIT's transformer (24 layers, 16 heads, width 768, GELU MLP 3072, ~170M parameters with a
# 1024-entry codebook).
PRESETS: dict[str, dict] = {
    "tiny": dict(dim=64, depth=2, n_heads=4),
    "small": dict(dim=384, depth=8, n_heads=6),
    "base": dict(dim=768, depth=24, n_heads=16),
}


class MaskedTransformer(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        grid_size: int,
        num_classes: int,
        dim: int = 64,
        depth: int = 2,
        n_heads: int = 4,
        n_kv_heads: int | None = None,
        mlp: Literal["gelu", "swiglu"] = "gelu",
        mlp_ratio: float | None = None,
        norm: Literal["rms", "layer"] = "layer",
        norm_eps: float = 1e-6,
        qk_norm: bool = False,
        bias: bool = True,
        pos_embed: Literal["rope2d", "learned"] = "rope2d",
        rope_base: float = 10000.0,
        dropout: float = 0.1,
        drop_path: float = 0.0,
    ):
        super().__init__()
        if pos_embed not in ("rope2d", "learned"):
            raise ValueError(f"pos_embed={pos_embed!r} is not supported; use 'rope2d' or 'learned'")
        head_dim = dim // n_heads
        if pos_embed == "rope2d" and head_dim % 4:
            raise ValueError(
                f"pos_embed='rope2d' rotates head_dim/4 pairs per axis, so dim/n_heads must be a multiple of 4; "
                f"got dim={dim}, n_heads={n_heads} (head_dim={head_dim})"
            )
        self.vocab_size, self.grid_size, self.num_classes = vocab_size, grid_size, num_classes
        self.dim, self.depth = dim, depth
        self.num_tokens = grid_size * grid_size
        self.mask_token = vocab_size  # the extra input row of the token embedding
        self.pos_embed = pos_embed

        self.tok_emb = nn.Embedding(vocab_size + 1, dim)  # codebook entries + the mask token
        self.cls_emb = nn.Embedding(num_classes + 1, dim)  # classes + the null class (CFG)
        self.drop = nn.Dropout(dropout)
        if pos_embed == "learned":
            # one vector per position, the class token's included (MaskGIT's learned position embedding)
            self.pos = nn.Parameter(torch.zeros(1, 1 + self.num_tokens, dim))  # (1, 1+L, C)
            self.register_buffer("rope", None, persistent=False)
        else:
            # 2D RoPE over the grid; the class token gets the identity rotation
            self.pos = None
            self.register_buffer("rope", rope_2d(grid_size, head_dim, rope_base, num_prefix=1), persistent=False)
        self.blocks = nn.ModuleList(
            Block(dim, n_heads, n_kv_heads, mlp=mlp, mlp_hidden=int(mlp_ratio * dim) if mlp_ratio else None, norm=norm,
                  norm_eps=norm_eps, qk_norm=qk_norm, bias=bias, resid_dropout=dropout,
                  drop_path=drop_path * i / max(depth - 1, 1))  # stochastic depth grows with depth
            for i in range(depth)
        )  # fmt: skip
        self.norm = make_norm(norm, dim, norm_eps)
        self.head = nn.Linear(dim, vocab_size)  # predicts codebook entries only, never the mask token
        self.apply(self._init_weights)
        if self.pos is not None:
            nn.init.trunc_normal_(self.pos, std=0.02)

    @classmethod
    def from_preset(cls, preset: str, vocab_size: int, grid_size: int, num_classes: int, **overrides):
        """Build a named size; `overrides` replace any field (keys with value None are ignored)."""
        if preset not in PRESETS:
            raise ValueError(f"preset={preset!r} is not known; known presets: {tuple(PRESETS)}")
        fields = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(vocab_size, grid_size, num_classes, **fields)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # BERT/MaskGIT init: truncated N(0, 0.02) weights, zero biases
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.trunc_normal_(module.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) long in [0, vocab_size] (vocab_size = masked), labels (B,) long in [0, num_classes]
        (num_classes = null class) -> logits (B, L, vocab_size) at every grid position."""
        return self.logits(self.hidden(tokens, labels))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Last-layer states (..., C) -> logits (..., vocab_size)."""
        return self.head(self.norm(h))

    def hidden(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """`forward` up to the head: the last layer's states (B, L, C). Apart so that training computes logits at
        the masked positions only, and can compile `logits` with its loss."""
        B, L = tokens.shape
        x = torch.cat([self.cls_emb(labels)[:, None], self.tok_emb(tokens)], dim=1)  # (B, 1+L, C)
        if self.pos is not None:
            x = x + self.pos[:, : 1 + L]
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope=self.rope)  # no mask: every token attends to every token
        return x[:, 1:]  # (B, L, C)
