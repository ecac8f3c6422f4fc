"""FlowARTransformer: a class-conditioned (AdaLN) transformer over groups of continuous tokens with block-causal
attention: a group sees itself and every earlier group. Its output at each position conditions the per-token flow
head (lit_ar.models.flow_head), which draws that position's token.

Two orders, one config field:
- `order="scale"` (FlowAR, Ren et al. 2024): the groups are scales that double, (1, 2, 4, 8, 16) on a 16x16 latent
  grid. Scale k's target is the latent grid area-downsampled to s_k x s_k; its input is scale k-1 (the target in
  training, the prediction in sampling) upsampled bicubically to s_k x s_k. Scale 1's input is the class token.
- `order="raster"` (continuous causal AR, GIVT / MAR's causal baseline): each group is one token in raster order;
  token i's input is token i-1 and token 0's input is the class token. This is plain causal attention.

Sampling decodes one group at a time against a static KV cache (layers.setup_kv_caches): scale by scale in
lit_ar/methods/groups.py's `FlowGroups`; in raster order token by token in lit_ar/methods/raster.py's `RasterAR`, the
loop discrete raster AR runs, through the same raster-decoding protocol as `CausalTransformer` (a one-slot class
prefix, `prefill_hidden`, `decode_hidden`).
"""

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lit_ar.models.layers import Block, RMSNorm, clear_kv_caches, setup_kv_caches


def doubling_scales(grid_size: int) -> tuple[int, ...]:
    """(1, 2, 4, ..., grid_size) for a power-of-two grid."""
    if grid_size < 1 or grid_size & (grid_size - 1):
        raise ValueError(f"grid_size={grid_size} is not a power of two; give the scales explicitly")
    return tuple(2**i for i in range(grid_size.bit_length()))


def to_grid(tokens: torch.Tensor, side: int) -> torch.Tensor:
    """(B, side*side, D) raster tokens -> (B, D, side, side)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)


def from_grid(grid: torch.Tensor) -> torch.Tensor:
    """(B, D, s, s) -> (B, s*s, D) raster tokens."""
    return grid.flatten(2).transpose(1, 2)


class FlowARTransformer(nn.Module):
    def __init__(
        self,
        token_dim: int,
        grid_size: int,
        num_classes: int,
        order: Literal["scale", "raster"] = "scale",
        scales: tuple[int, ...] | None = None,
        dim: int = 768,
        depth: int = 12,
        n_heads: int = 12,
        mlp_ratio: float = 4.0,
        attn_dropout: float = 0.0,
        proj_dropout: float = 0.0,
    ):
        super().__init__()
        if order == "scale":
            scales = tuple(scales) if scales is not None else doubling_scales(grid_size)
            if list(scales) != sorted(set(scales)) or scales[0] < 1 or scales[-1] != grid_size:
                raise ValueError(
                    f"scales={list(scales)} must increase strictly from >= 1 to the token grid side {grid_size}"
                )
            sizes = [s * s for s in scales]
        elif order == "raster":
            scales, sizes = None, [1] * grid_size**2
        else:
            raise ValueError(f"order={order!r} is not supported; use 'scale' or 'raster'")
        self.token_dim, self.grid_size, self.num_classes, self.order = token_dim, grid_size, num_classes, order
        self.scales, self.sizes, self.dim, self.depth = scales, sizes, dim, depth
        self.seq_len = sum(sizes)
        # block-causal mask, True = may attend: position i sees j when j's group is not after i's
        group = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))  # (T,)
        self.register_buffer("attn_mask", group[None, :] <= group[:, None], persistent=False)  # (T, T)
        self.starts = [0, *torch.tensor(sizes).cumsum(0).tolist()]  # group k holds positions starts[k]:starts[k+1]

        self.class_emb = nn.Embedding(num_classes + 1, dim)  # row num_classes is the null class of CFG
        self.input_proj = nn.Linear(token_dim, dim)
        self.pos = nn.Parameter(torch.zeros(1, self.seq_len, dim))
        # VAR's level embedding tells the scales apart; in raster order the position already does
        self.level = nn.Embedding(len(sizes), dim) if order == "scale" else None
        self.register_buffer("group", group, persistent=False)
        self.blocks = nn.ModuleList([
            Block(dim, n_heads, mlp="gelu", mlp_hidden=int(dim * mlp_ratio), norm="layer", norm_eps=1e-6,
                  bias=True, cond_dim=dim, attn_dropout=attn_dropout, resid_dropout=proj_dropout)
            for _ in range(depth)
        ])  # fmt: skip
        self.norm = RMSNorm(dim)
        self._class_cond: torch.Tensor | None = None  # raster decoding: the class's AdaLN condition (B, C)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for block in self.blocks:  # AdaLN starts at the identity (layers.Block's zero init, undone by the loop)
            nn.init.zeros_(block.ada[1].weight)
            nn.init.zeros_(block.ada[1].bias)
        nn.init.normal_(self.class_emb.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)
        if self.level is not None:
            nn.init.normal_(self.level.weight, std=0.02)

    # -- inputs and targets of the groups --------------------------------------------------------------------------
    def targets(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L, D) raster -> what each position must produce (B, T, D): every scale's area-downsampled
        grid, concatenated coarse to fine (scale order), or the tokens themselves (raster order)."""
        if self.order == "raster":
            return tokens
        grid = to_grid(tokens.float(), self.grid_size)  # (B, D, G, G)
        return torch.cat([from_grid(F.interpolate(grid, size=(s, s), mode="area")) for s in self.scales], dim=1)

    def next_input(self, k: int, group_tokens: torch.Tensor) -> torch.Tensor:
        """The input of group k + 1 from group k's tokens (B, size_k, D): upsampled to the next scale (bicubic),
        or the token itself (raster)."""
        if self.order == "raster":
            return group_tokens
        s, s_next = self.scales[k], self.scales[k + 1]
        up = F.interpolate(to_grid(group_tokens.float(), s), size=(s_next, s_next), mode="bicubic")
        return from_grid(up)  # (B, s_next**2, D)

    def teacher_inputs(self, targets: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: the inputs (B, T - 1, D) of groups 1.. built from the targets (B, T, D) of groups 0.."""
        if self.order == "raster":
            return targets[:, :-1]
        st = self.starts
        return torch.cat([self.next_input(k, targets[:, st[k] : st[k + 1]]) for k in range(len(self.sizes) - 1)], 1)

    # -- the transformer -------------------------------------------------------------------------------------------
    def embed(self, inputs: torch.Tensor | None, labels: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Embed positions [start, end): position 0 is the class token, the rest project `inputs` (B, n, D)."""
        parts = []
        if start == 0:
            parts.append(self.class_emb(labels)[:, None])  # (B, 1, C)
        if inputs is not None:
            parts.append(self.input_proj(inputs))  # (B, n, C)
        x = torch.cat([p.to(parts[-1].dtype) for p in parts], dim=1)  # (B, end - start, C)
        x = x + self.pos[:, start:end]
        if self.level is not None:
            x = x + self.level(self.group[start:end])
        return x

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Training: inputs (B, T - 1, D) of groups 1.. (teacher_inputs), labels (B,) -> conditions (B, T, C). In
        raster order a prefix of the tokens may be given instead, (B, t, D) -> (B, t + 1, C) (decoding without a
        cache)."""
        T = self.seq_len if self.order == "scale" else inputs.shape[1] + 1
        x = self.embed(inputs, labels, 0, T)  # (B, T, C)
        cond = self.class_emb(labels).to(x.dtype)  # (B, C): AdaLN on the class in every block
        for block in self.blocks:
            x = block(x, mask=self.attn_mask[:T, :T], cond=cond)
        return self.norm(x)

    def hidden(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The conditions the head reads: the forward itself (the head is outside the core)."""
        return self(inputs, labels)

    def setup_caches(self, batch_size: int, dtype: torch.dtype) -> None:
        setup_kv_caches(self.blocks, batch_size, self.seq_len, dtype, self.pos.device)

    def clear_caches(self) -> None:
        clear_kv_caches(self.blocks)
        self._class_cond = None

    def step(self, k: int, inputs: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        """Sampling: the conditions (B, size_k, C) of group k, given its inputs (B, size_k, D) (None for group 0,
        whose input is the class token), against the KV cache filled by groups 0..k-1."""
        start, end = self.starts[k], self.starts[k + 1]
        x = self.embed(inputs, labels, start, end)  # (B, n, C)
        cond = self.class_emb(labels).to(x.dtype)
        pos = torch.arange(start, end, device=x.device)
        for block in self.blocks:  # group k sees groups 0..k, i.e. every cache position before `end`
            x = block(x, input_pos=pos, cond=cond, kv_len=end)
        return self.norm(x)

    # -- raster order: the raster-decoding protocol (lit_ar/methods/raster.py) -----------------------------------
    # position 0 is the class token (a one-slot prefix) and token i's input sits at position 1 + i, so the slots are
    # CausalTransformer's with cls_token_num = 1
    cls_token_num = 1

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    def check_decode_length(self, num_tokens: int) -> None:
        if self.order != "raster":
            raise ValueError(f"order={self.order!r} decodes scale by scale (FlowGroups), not token by token")
        if not 1 <= num_tokens <= self.num_tokens:
            raise ValueError(f"num_tokens={num_tokens}: a {self.grid_size}x{self.grid_size} grid holds between 1 and "
                             f"{self.num_tokens} tokens")  # fmt: skip

    def prefill_hidden(self, labels: torch.Tensor) -> torch.Tensor:
        """Write the class token into the cache; labels (B,) -> the condition (B, 1, C) of token 0. The class's AdaLN
        condition is kept for the decode steps (cleared with the caches)."""
        self._class_cond = self.class_emb(labels)  # (B, C)
        return self.step(0, None, labels)

    def decode_hidden(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """Feed token i (B, 1, D) at position `input_pos` (1,) = 1 + i -> the condition (B, 1, C) of token i + 1. The
        position is a tensor and the cache is masked, not sliced, so the step's shapes never change."""
        x = self.input_proj(tokens) + self.pos[:, input_pos]  # (B, 1, C)
        cond = self._class_cond.to(x.dtype)
        mask = torch.arange(self.seq_len, device=x.device)[None, :] <= input_pos[:, None]  # (1, S) True = may attend
        for block in self.blocks:
            x = block(x, mask=mask, input_pos=input_pos, cond=cond)
        return self.norm(x)
