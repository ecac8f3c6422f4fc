"""ScaleTransformer: VAR's next-scale prediction (Tian et al. 2024) on lit_ar's shared layers.

The image is a pyramid of K token maps s_1 x s_1 ... s_K x s_K from a multi-scale residual VQ tokenizer. All
K maps are predicted in one sequence of L = sum(s_k^2) tokens:
  - scale 1's input is the start token(s): the class embedding plus a learned start position;
  - scale k+1's input is the tokenizer's cumulative code map after scales 1..k, area-downsampled to
    s_{k+1} x s_{k+1} (teacher forcing), projected from the codebook width by `word_embed`;
  - every token adds a learned position (`pos_1LC`) and the embedding of its level (scale), `lvl_embed`;
  - a block-causal mask lets each token see every token of its own scale and of the coarser ones, so one
    forward gives all K maps' logits in training, and sampling predicts a whole scale per step.
Conditioning is AdaLN on the class embedding (per block, or one linear shared by all blocks), then an AdaLN norm
before the head. Optional: cosine attention with a learned per-head scale (VAR's default) and 2D RoPE per scale.

Sizes follow VAR's depth rule: width 64 * depth, depth heads, mlp ratio 4, so `depth=16` with 1000 classes,
vocab 4096 and codebook width 32 has VAR-d16's 310,283,520 parameters (the layout, not the code, follows VAR's
models/var.py and basic_var.py).
"""

import itertools
import math

import torch
from torch import nn

from lit_ar.models.layers import Block, modulate, rope_2d


def scale_levels(scales: tuple[int, ...]) -> torch.Tensor:
    """(L,) long: the level (scale index) of each token of the flattened pyramid."""
    return torch.cat([torch.full((s * s,), k, dtype=torch.long) for k, s in enumerate(scales)])


def block_causal_mask(scales: tuple[int, ...]) -> torch.Tensor:
    """(L, L) bool, True = may attend: a token of scale k sees every token of scales <= k."""
    levels = scale_levels(scales)
    return levels[:, None] >= levels[None, :]


def scale_rope(scales: tuple[int, ...], head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """(L, head_dim / 2, 2) 2D RoPE table over the pyramid: each scale's positions are stretched onto the finest
    grid (a token of a 2x2 map sits where its quadrant starts on the 16x16 map), so scales share one frame."""
    side = scales[-1]
    return torch.cat([rope_2d(s, head_dim, base, pos_scale=side / s) for s in scales])


class AdaLNHead(nn.Module):
    """VAR's AdaLNBeforeHead: a LayerNorm without affine parameters, shifted and scaled by the class."""

    def __init__(self, dim: int, cond_dim: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(cond)[:, None].chunk(2, dim=-1)  # (B, 1, C) each
        return modulate(self.norm(x), shift, scale)


class ScaleTransformer(nn.Module):
    def __init__(
        self,
        num_classes: int,
        vocab_size: int,
        codebook_dim: int,
        scales: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
        depth: int = 16,
        dim: int | None = None,
        n_heads: int | None = None,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-6,
        cosine_attn: bool = True,
        shared_adaln: bool = False,
        rope: bool = False,
        rope_base: float = 10000.0,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        dim = dim or 64 * depth  # VAR's depth rule
        n_heads = n_heads or depth
        if dim % n_heads:
            raise ValueError(f"dim={dim} is not divisible by n_heads={n_heads}")
        if rope and (dim // n_heads) % 4:
            raise ValueError(f"rope needs a head width (dim / n_heads = {dim // n_heads}) divisible by 4")
        self.num_classes, self.vocab_size, self.codebook_dim = num_classes, vocab_size, codebook_dim
        self.scales, self.dim, self.depth = tuple(scales), dim, depth
        self.seq_len = sum(s * s for s in self.scales)  # L
        self.first_len = self.scales[0] ** 2  # tokens of the first scale, all fed by the start token
        ends = list(itertools.accumulate(s * s for s in self.scales))
        self.bounds = list(zip([0, *ends[:-1]], ends))  # [begin, end) of each scale in the sequence

        # inputs: class (num_classes + 1 rows: the last is the null class of CFG), start, words, positions, levels
        self.class_emb = nn.Embedding(num_classes + 1, dim)
        self.pos_start = nn.Parameter(torch.zeros(1, self.first_len, dim))
        self.word_embed = nn.Linear(codebook_dim, dim)
        self.pos_1LC = nn.Parameter(torch.zeros(1, self.seq_len, dim))
        self.lvl_embed = nn.Embedding(len(self.scales), dim)

        # with shared_adaln one linear makes the 6 modulations of every block; each block adds its own offset
        self.shared_ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim)) if shared_adaln else None
        rates = [drop_path * i / max(1, depth - 1) for i in range(depth)]  # stochastic depth grows with depth (VAR)
        self.blocks = nn.ModuleList(
            Block(dim, n_heads, mlp="gelu", mlp_hidden=round(dim * mlp_ratio), norm="layer", norm_eps=norm_eps,
                  cosine_attn=cosine_attn, bias=True, qv_bias=True, cond_dim=dim, attn_dropout=attn_dropout,
                  resid_dropout=dropout, drop_path=rates[i], shared_ada=shared_adaln)
            for i in range(depth)
        )  # fmt: skip
        self.head_nm = AdaLNHead(dim, dim, norm_eps)
        self.head = nn.Linear(dim, vocab_size)

        self.register_buffer("levels", scale_levels(self.scales), persistent=False)  # (L,)
        self.register_buffer("attn_mask", block_causal_mask(self.scales), persistent=False)  # (L, L)
        table = scale_rope(self.scales, dim // n_heads, rope_base) if rope else None
        self.register_buffer("rope", table, persistent=False)  # (L, hd/2, 2) or None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, init_head: float = 0.02, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5) -> None:
        """VAR's initialisation: truncated normal of std sqrt(1 / (3 width)), output projections divided by
        sqrt(2 depth), a small head, AdaLN shifts/scales halved and gates near zero (blocks start near identity)."""
        std = math.sqrt(1 / self.dim / 3)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=std)
        for p in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(p, std=std)
        self.head.weight.mul_(init_head)
        self.head_nm.ada[-1].weight.mul_(init_adaln)

        def scale_modulation(w: torch.Tensor) -> None:
            # layers.Block's order of the 6 chunks: shift1 scale1 gate1 shift2 scale2 gate2
            for i, chunk in enumerate(w.chunk(6, dim=0)):  # views: the in-place products write through
                chunk.mul_(init_adaln_gamma if i in (2, 5) else init_adaln)

        for block in self.blocks:
            block.attn.wo.weight.div_(math.sqrt(2 * self.depth))
            block.mlp.fc2.weight.div_(math.sqrt(2 * self.depth))
            if block.ada is not None:
                scale_modulation(block.ada[-1].weight)  # (6C, D)
            else:
                nn.init.trunc_normal_(block.ada_offset, std=std)
                scale_modulation(block.ada_offset)  # (6C,)
        if self.shared_ada is not None:
            scale_modulation(self.shared_ada[-1].weight)

    # -- inputs ------------------------------------------------------------------------------------------------
    def condition(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """labels (B,) (num_classes = null) -> the class embedding (B, C) and what the blocks take as `cond`:
        the same embedding, or with shared_adaln the shared modulation (B, 6C)."""
        cond = self.class_emb(labels)  # (B, C)
        return cond, (self.shared_ada(cond) if self.shared_ada is not None else cond)

    def level_pos(self, k: int) -> torch.Tensor:
        """(s_k^2, C): learned positions plus the level embedding of scale k's tokens."""
        begin, end = self.bounds[k]
        return self.pos_1LC[0, begin:end] + self.lvl_embed(self.levels[begin:end])

    def start_tokens(self, cond: torch.Tensor) -> torch.Tensor:
        """Class embedding (B, C) -> scale 1's input (B, s_1^2, C)."""
        return cond[:, None] + self.pos_start + self.level_pos(0)

    def embed_scale(self, k: int, x_BlCv: torch.Tensor) -> torch.Tensor:
        """Scale k's (k >= 1) tokenizer input (B, s_k^2, Cv) -> transformer input (B, s_k^2, C)."""
        return self.word_embed(x_BlCv) + self.level_pos(k)

    # -- forward -----------------------------------------------------------------------------------------------
    def logits(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_nm(x, cond))  # (B, T, V)

    def forward(self, labels: torch.Tensor, x_BLCv: torch.Tensor) -> torch.Tensor:
        """Teacher-forced forward over the whole pyramid.
        labels (B,) (already with the dropped ones set to the null class); x_BLCv (B, L - s_1^2, Cv), the
        tokenizer's inputs of scales 2..K -> logits (B, L, V) of every scale's tokens."""
        return self.logits(*self.hidden(labels, x_BLCv))

    def hidden(self, labels: torch.Tensor, x_BLCv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` up to the head: the last block's states (B, L, C) and the class embedding (B, C) the head is
        conditioned on. Apart so that training can compile `logits` with its loss."""
        cond, block_cond = self.condition(labels)
        words = self.word_embed(x_BLCv)  # (B, L - s_1^2, C)
        lvl_pos = self.pos_1LC[0] + self.lvl_embed(self.levels)  # (L, C)
        start = cond[:, None] + self.pos_start  # (B, s_1^2, C)
        x = torch.cat([start, words], dim=1) + lvl_pos  # (B, L, C)
        for block in self.blocks:
            x = block(x, self.rope, self.attn_mask, cond=block_cond)
        return x, cond

    def modulations(self, block_cond: torch.Tensor) -> list[torch.Tensor]:
        """Every block's AdaLN modulation (B, 6C): the class is fixed over a sample's scales, so sampling computes
        them once instead of once per scale."""
        return [block.modulation(block_cond) for block in self.blocks]

    def forward_scale(self, k: int, x: torch.Tensor, cond: torch.Tensor, mods: list[torch.Tensor]) -> torch.Tensor:
        """One sampling step with the blocks' KV caches (set up for `seq_len` positions): scale k's embedded input
        (B, s_k^2, C) is written to the caches at its positions and attends to every position before the end of
        scale k (what scale k's rows of the block-causal mask allow; the slots of later scales are never read)
        -> logits (B, s_k^2, V). cond: the class embedding (B, C) (for the head); mods: `modulations(block_cond)`."""
        begin, end = self.bounds[k]
        input_pos = torch.arange(begin, end, device=x.device)  # (T,)
        rope = self.rope[begin:end] if self.rope is not None else None
        for block, mod in zip(self.blocks, mods):
            x = block(x, rope, None, input_pos, mod=mod, kv_len=end)
        return self.logits(x, cond)
