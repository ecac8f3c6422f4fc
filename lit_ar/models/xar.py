"""XARTransformer: xAR's backbone (Ren et al. 2025, "Beyond Next-Token: Next-X Prediction for Autoregressive Visual
Generation"; OliverRensu/xAR models/xar.py): the transformer itself denoises, no separate head.

The continuous token grid (G x G tokens of width D) is cut into E entities of n tokens each (lit_ar/methods/xar.py's
`entities`: tokens, k x k cells, non-local subsamples or the whole image). The sequence holds the entities one after
the other; a token is projected to the width, rotated (2D RoPE) by its grid position, and modulated (AdaLN, every
block and the output layer) by its class and the flow time of its entity. Attention is block-causal over entities:
an entity sees itself (bidirectionally) and the entities before it. Every token's output is a velocity (B, T, D).

lit_ar's flow convention throughout: x_t = t x + (1 - t) noise, t = 0 noise, t = 1 data, velocity x - noise; a clean
entity is one at t = 1.

`class_token` (lit_ar's option, not xAR's): a class token in front of the sequence that every entity attends to,
besides the class in the AdaLN condition (FlowAR's and MAR's way). In the condition the class is a small addition to
the time's embedding, which a short training does not outgrow.
"""

import torch
import torch.nn.functional as F
from torch import nn

from lit_ar.models.flow_head import FinalLayer, TimeEmbedding
from lit_ar.models.layers import Block, clear_kv_caches, rope_2d, setup_kv_caches


class XARTransformer(nn.Module):
    def __init__(self, token_dim: int, grid_size: int, num_classes: int, dim: int = 768, depth: int = 12,
                 n_heads: int = 12, mlp_ratio: float = 4.0, attn_dropout: float = 0.0,
                 proj_dropout: float = 0.0, class_token: bool = False):  # fmt: skip
        super().__init__()
        head_dim = dim // n_heads
        if dim % n_heads or head_dim % 4:
            raise ValueError(f"dim={dim}, n_heads={n_heads}: 2D RoPE needs a head width dim/n_heads divisible by 4")
        self.token_dim, self.grid_size, self.num_classes, self.dim = token_dim, grid_size, num_classes, dim
        self.num_tokens = grid_size * grid_size
        self.prefix_len = 1 if class_token else 0  # P: the class token's slot, in front of the entities
        self.class_emb = nn.Embedding(num_classes + 1, dim)  # row num_classes is the null class of CFG
        self.time_embed = TimeEmbedding(dim)
        self.input_proj = nn.Linear(token_dim, dim)
        self.blocks = nn.ModuleList(
            Block(dim, n_heads, mlp="gelu", mlp_hidden=int(dim * mlp_ratio), norm="layer", norm_eps=1e-6, bias=True,
                  cond_dim=dim, attn_dropout=attn_dropout, resid_dropout=proj_dropout)
            for _ in range(depth)
        )  # fmt: skip
        self.final = FinalLayer(dim, token_dim)
        rope = rope_2d(grid_size, head_dim, num_prefix=self.prefix_len)  # (P + L, hd/2, 2): the prefix unrotated
        self.register_buffer("rope", rope, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for block in self.blocks:  # AdaLN starts at the identity
            nn.init.zeros_(block.ada[1].weight)
            nn.init.zeros_(block.ada[1].bias)
        nn.init.zeros_(self.final.ada[1].weight)
        nn.init.zeros_(self.final.ada[1].bias)
        nn.init.zeros_(self.final.linear.weight)  # a zero first velocity
        nn.init.zeros_(self.final.linear.bias)
        nn.init.normal_(self.class_emb.weight, std=0.02)

    def condition(self, labels: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """labels (B,), flow times (B, T) of each token's entity -> the AdaLN condition (B, T, C)."""
        B, T = t.shape
        return self.class_emb(labels)[:, None] + self.time_embed(t.flatten()).view(B, T, self.dim).to(self.dim_dtype)

    @property
    def dim_dtype(self) -> torch.dtype:
        return self.class_emb.weight.dtype

    def prefix(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The class token (B, P, C) and its AdaLN condition (B, P, C) (the class, clean: t = 1); P = 0 without."""
        B, P = labels.shape[0], self.prefix_len
        ones = torch.ones(B, P, device=labels.device)
        return self.class_emb(labels)[:, None].expand(B, P, -1), self.condition(labels, ones)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor, t: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """The whole sequence (training, and sampling without a cache): tokens x (B, T, D) at grid `positions`
        (T,), labels (B,), flow times t (B, T), `mask` (T, T) (True = may attend) -> velocities (B, T, D)."""
        P = self.prefix_len
        token, token_cond = self.prefix(labels)
        cond = torch.cat([token_cond, self.condition(labels, t)], 1)  # (B, P + T, C)
        h = torch.cat([token, self.input_proj(x.to(self.input_proj.weight.dtype))], 1)  # (B, P + T, C)
        rope = torch.cat([self.rope[:P], self.rope[P + positions]])  # (P + T, hd/2, 2)
        if P:  # every token sees the class token, which sees itself only
            mask = F.pad(mask, (P, 0, P, 0), value=True)
            mask[:P, P:] = False
        for block in self.blocks:
            h = block(h, rope, mask=mask, cond=cond)
        return self.final(h, cond)[:, P:]

    # -- entity by entity on the KV cache -------------------------------------------------------------------------
    def setup_caches(self, batch_size: int, dtype: torch.dtype) -> None:
        setup_kv_caches(self.blocks, batch_size, self.prefix_len + self.num_tokens, dtype, self.rope.device)

    def prefill(self, labels: torch.Tensor) -> None:
        """Write the class token into the caches (nothing without one)."""
        P = self.prefix_len
        if P:
            h, cond = self.prefix(labels)
            slots = torch.arange(P, device=labels.device)
            mask = torch.arange(P + self.num_tokens, device=labels.device) <= slots[:, None]
            for block in self.blocks:
                h = block(h, self.rope[:P], mask=mask, input_pos=slots, cond=cond)

    def clear_caches(self) -> None:
        clear_kv_caches(self.blocks)

    def decode(self, x: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor, t: torch.Tensor,
               slots: torch.Tensor, upto: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """Tokens x (B, T, D) at grid `positions` (T,) with flow times t (B, T), written at token `slots` (T,) (the
        cache's, after the class token), each attending to the class token and every token slot up to its `upto`
        (T,) -> velocities (B, T, D)."""
        P = self.prefix_len
        cond = self.condition(labels, t)
        h = self.input_proj(x.to(self.input_proj.weight.dtype))
        rope = self.rope[P + positions]
        mask = torch.arange(P + self.num_tokens, device=x.device) <= P + upto[:, None]  # (T, P + L)
        for block in self.blocks:
            h = block(h, rope, mask=mask, input_pos=P + slots, cond=cond)
        return self.final(h, cond)
