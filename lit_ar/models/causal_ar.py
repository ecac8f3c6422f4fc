"""CausalTransformer: LlamaGen's class-conditional GPT over a token grid, with RAR's random-order training.

LlamaGen (Sun et al. 2024, autoregressive/models/gpt.py): a class-token prefix (row `num_classes` of the class
embedding is the null class used for classifier-free guidance), 2D RoPE over the token grid, pre-norm blocks with
RMSNorm, bias-free qkv/out projections and a SwiGLU MLP, a final RMSNorm and a zero-initialised, bias-free output
layer. RAR (Yu et al. 2024): training in a random token order, with a learned *target-aware* position embedding
added to every slot that tells it which grid position it must predict next; the probability of a random order is
annealed to 0, after which training is plain raster order (and sampling is always raster).

A sequence, with P = cls_token_num prefix slots, L = grid_size**2 tokens and T <= L - 1 tokens fed:
    slots 0 .. P-1       the class prefix            (RoPE: identity, or zero as in LlamaGen with prefix_rope="zero")
    slots P .. P+T-1     tokens x_0 .. x_{T-1}        (RoPE: the 2D grid position of each token)
    outputs are read at slots P-1 .. P+T-1: T + 1 predictions; prediction j is the distribution of token j.
With `target_aware`, the slot holding prediction j also gets `target_pos[position of token j]` added to its input.
In raster order that is the fixed addition target_pos[0 .. T] over slots P-1 .. P+T-1, which is exactly what a
random order reduces to when the order is the identity (the test of "RAR at r=0 equals raster").
"""

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lit_ar.models.layers import Block, RMSNorm, clear_kv_caches, llama_hidden_dim, rope_2d, setup_kv_caches

# LlamaGen's class-conditional sizes (GPT-B 111M ... GPT-XXXL 3.9B with 1000 classes and vocab 16384), then small
# sizes for CPU work: nano for tests, micro/mini for the shapes configs and the benchmarks.
PRESETS: dict[str, dict[str, int]] = {
    "GPT-B": dict(dim=768, depth=12, n_heads=12),
    "GPT-L": dict(dim=1024, depth=24, n_heads=16),
    "GPT-XL": dict(dim=1280, depth=36, n_heads=20),
    "GPT-XXL": dict(dim=1536, depth=48, n_heads=24),
    "GPT-XXXL": dict(dim=2560, depth=48, n_heads=40),
    "GPT-3B": dict(dim=3200, depth=24, n_heads=32),  # LlamaGen's released c2i 3B model (3.1B)
    "GPT-nano": dict(dim=64, depth=2, n_heads=4),
    "GPT-micro": dict(dim=128, depth=4, n_heads=4),
    "GPT-mini": dict(dim=256, depth=6, n_heads=8),
}


class CausalTransformer(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        grid_size: int,
        num_classes: int,
        dim: int = 768,
        depth: int = 12,
        n_heads: int = 12,
        n_kv_heads: int | None = None,
        cls_token_num: int = 1,
        multiple_of: int = 256,
        ffn_dim_multiplier: float | None = None,
        norm_eps: float = 1e-5,
        rope_base: float = 10000.0,
        prefix_rope: Literal["identity", "zero"] = "identity",
        qk_norm: bool = False,
        token_dropout: float = 0.0,
        resid_dropout: float = 0.0,
        attn_dropout: float = 0.0,
        drop_path: float = 0.0,
        target_aware: bool = False,
        transition_tokens: int = 0,
        next_rope: bool = False,
        direction_embeddings: bool = False,
        position_queries: bool = False,
        initializer_range: float = 0.02,
    ):
        super().__init__()
        head_dim = dim // n_heads
        if dim % n_heads or head_dim % 4:
            raise ValueError(f"dim={dim}, n_heads={n_heads}: 2D RoPE needs a head width dim/n_heads divisible by 4")
        if cls_token_num < 1:
            raise ValueError(f"cls_token_num={cls_token_num} must be >= 1 (the class prefix predicts token 0)")
        if next_rope and head_dim % 8:
            raise ValueError(f"dim={dim}, n_heads={n_heads}: next_rope rotates a quarter of each head per axis; it "
                             "needs a head width dim/n_heads divisible by 8")  # fmt: skip
        if prefix_rope not in ("identity", "zero"):
            raise ValueError(f"prefix_rope={prefix_rope!r} is not supported; use 'identity' or 'zero'")
        self.vocab_size, self.grid_size, self.num_classes = vocab_size, grid_size, num_classes
        self.num_tokens = grid_size * grid_size  # L
        self.cls_token_num = cls_token_num  # P
        self.dim, self.depth = dim, depth

        # P prefix tokens per label; row num_classes is the null class (CFG). P = 1 is LlamaGen's c2i layout.
        self.cls_embedding = nn.Embedding(num_classes + 1, cls_token_num * dim)
        self.tok_embeddings = nn.Embedding(vocab_size, dim)
        # RAR: target_pos[q] tells a slot that it predicts the token at grid position q
        self.target_pos = nn.Embedding(self.num_tokens, dim) if target_aware else None
        # DAR: the direction of each step, from the fed token's position to the one it predicts (9 compass steps,
        # and the first step from the prefix)
        self.direction = nn.Embedding(10, dim) if direction_embeddings else None
        # PAR: learnable inputs that turn sequential prediction into parallel prediction of the first group
        self.transition = nn.Parameter(torch.zeros(transition_tokens, dim)) if transition_tokens else None
        # LPD: the input of every position query, told apart by its target's embedding and RoPE (`queries`)
        self.mask_query = nn.Parameter(torch.zeros(dim)) if position_queries else None
        if position_queries and not target_aware:
            raise ValueError("position_queries (LPD) add the target position's embedding to each query: they need "
                             "target_aware=True")  # fmt: skip
        self.tok_dropout = nn.Dropout(token_dropout)
        hidden = llama_hidden_dim(dim, multiple_of, ffn_dim_multiplier)
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth grows with depth
        self.layers = nn.ModuleList(
            Block(dim, n_heads, n_kv_heads, mlp="swiglu", mlp_hidden=hidden, norm="rms", norm_eps=norm_eps,
                  qk_norm=qk_norm, bias=False, attn_dropout=attn_dropout, resid_dropout=resid_dropout,
                  drop_path=rates[i])
            for i in range(depth)
        )  # fmt: skip
        self.norm = RMSNorm(dim, norm_eps)
        self.output = nn.Linear(dim, vocab_size, bias=False)

        rope = rope_2d(grid_size, head_dim, rope_base, num_prefix=cls_token_num)  # (P + L, hd/2, 2)
        if prefix_rope == "zero":
            rope[:cls_token_num] = 0.0  # LlamaGen's table: the prefix's q and k are zeroed (only its value is read)
        self.register_buffer("rope", rope, persistent=False)
        # next_rope (DAR's 4D RoPE): half of each head rotates with the fed token's (row, column), half with the
        # position it predicts; each half is a 2D table of half the width
        self.next_rope = next_rope
        half = rope_2d(grid_size, head_dim // 2, rope_base, num_prefix=cls_token_num) if next_rope else None
        self.register_buffer("rope_half", half, persistent=False)

        self.initializer_range = initializer_range
        self.apply(self._init_weights)
        for p in (self.transition, self.mask_query):
            if p is not None:
                nn.init.normal_(p, std=initializer_range)
        nn.init.zeros_(self.output.weight)  # every logit starts at 0: a uniform first prediction

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.initializer_range)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    # -- training / full forward ---------------------------------------------------------------------------------
    def prefix(self, labels: torch.Tensor) -> torch.Tensor:
        """labels (B,) (num_classes = null) -> the prefix embeddings (B, P, C)."""
        return self.cls_embedding(labels).view(labels.shape[0], self.cls_token_num, self.dim)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
        """The whole prefix at once (training, and sampling without a cache).

        tokens (B, T) long, T <= L - 1; in raster order, or in `order` (B, L): tokens[:, i] sits at grid position
        order[:, i]. labels (B,). Returns logits (B, T + 1, V) in fp32; logits[:, j] predicts token j of the order.
        """
        return self.logits(self.hidden(tokens, labels, order))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Last-layer states (..., C) -> logits (..., V) in fp32."""
        return self.output(self.norm(h)).float()

    def hidden(self, tokens: torch.Tensor, labels: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
        """`forward` up to the head: the last layer's states (B, T + 1, C) at the slots that predict tokens 0..T.
        Apart so that training can compile `logits` with its loss."""
        B, T = tokens.shape
        P, L = self.cls_token_num, self.num_tokens
        if T > L - 1:
            raise ValueError(f"{T} tokens given; the model predicts {L} tokens from at most {L - 1} fed tokens")
        if self.cache_len:
            raise RuntimeError("KV caches are set up for sampling: call clear_caches() before a full forward")
        x = torch.cat([self.prefix(labels), self.tok_embeddings(tokens)], dim=1)  # (B, P + T, C)
        if order is None and not (self.next_rope or self.direction is not None):
            rope = self.rope[: P + T]  # (P + T, hd/2, 2)
            target = self.target_pos.weight[: T + 1] if self.target_pos is not None else None  # (T + 1, C)
        else:
            order = torch.arange(L, device=tokens.device).expand(B, L) if order is None else order
            rope = torch.cat([self.prefix_rope(B), self.slot_rope(order[:, :T], order[:, 1 : T + 1])], 1)
            target = self.slot_inputs(None, order[:, :1])  # (B, 1, C) or None: the last prefix slot's
            if target is not None:
                target = torch.cat([target, self.slot_inputs(order[:, :T], order[:, 1 : T + 1])], 1)  # (B, T + 1, C)
        if target is not None:
            x = x + F.pad(target, (0, 0, P - 1, 0))  # slots P-1 .. P+T-1 carry the position they predict
        return self.run_layers(x, rope)[:, P - 1 :]  # (B, T + 1, C)

    # -- what a slot is told of its position and its target ------------------------------------------------------
    def prefix_rope(self, batch: int) -> torch.Tensor:
        """The prefix slots' RoPE (batch, P, hd/2, 2)."""
        rows = self.rope[: self.cls_token_num]
        if self.next_rope:
            rows = self.rope_half[: self.cls_token_num].repeat(1, 2, 1)
        return rows.expand(batch, -1, -1, -1)

    def slot_rope(self, positions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """RoPE (..., T, hd/2, 2) of fed tokens at grid `positions` (..., T) predicting `targets` (..., T): their
        own position's, or with next_rope half their own, half their target's."""
        P = self.cls_token_num
        if not self.next_rope:
            return self.rope[P + positions]
        return torch.cat([self.rope_half[P + positions], self.rope_half[P + targets]], dim=-2)

    def slot_inputs(self, positions: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor | None:
        """What is added to the input of a slot predicting `targets` (..., T) from a token at `positions` (None:
        the last prefix slot): the target-aware embedding and the direction embedding, where the core has them."""
        out = self.target_pos(targets) if self.target_pos is not None else None
        if self.direction is not None:
            if positions is None:
                step = torch.full_like(targets, 9)  # the first step, from the prefix
            else:
                G = self.grid_size
                dr = (targets // G - positions // G).sign() + 1
                dc = (targets % G - positions % G).sign() + 1
                step = dr * 3 + dc  # 0..8
            d = self.direction(step)
            out = d if out is None else out + d
        return out

    def queries(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LPD's position queries: target grid positions (..., Q) -> the inputs (..., Q, C) (the one mask-query
        embedding plus the target's embedding) and their RoPE (..., Q, hd/2, 2) (the target's position)."""
        return self.mask_query + self.target_pos(targets), self.rope[self.cls_token_num + targets]

    def run_layers(self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Input embeddings (B, S, C) with their RoPE (S | B, S, hd/2, 2) -> the last layer's states (B, S, C): causal,
        or under `mask` (S, S) (True = may attend), e.g. PAR's group-wise full attention."""
        x = self.tok_dropout(x)
        for layer in self.layers:
            x = layer(x, rope, mask=mask, is_causal=mask is None)
        return x

    # -- sampling on the static KV cache ----------------------------------------------------------------------
    def setup_caches(self, batch_size: int, dtype: torch.dtype, max_seq_len: int | None = None) -> None:
        """Preallocate every layer's KV cache for `batch_size` sequences (default length P + L - 1: the prefix and
        every fed token). An existing cache of the same shape is kept, so a compiled decode step is reused."""
        max_seq_len = max_seq_len or self.cls_token_num + self.num_tokens - 1
        cache = self.layers[0].attn.kv_cache
        if cache is not None and cache.k.shape[0] == batch_size and cache.max_seq_len == max_seq_len and \
                cache.k.dtype == dtype and cache.k.device == self.rope.device:  # fmt: skip
            return
        setup_kv_caches(self.layers, batch_size, max_seq_len, dtype, self.rope.device)

    def clear_caches(self) -> None:
        clear_kv_caches(self.layers)

    @property
    def cache_len(self) -> int:
        cache = self.layers[0].attn.kv_cache
        return 0 if cache is None else cache.max_seq_len

    def check_decode_length(self, num_tokens: int) -> None:
        """Refuse, before any work, to decode more tokens than the grid or the KV cache holds."""
        if not 1 <= num_tokens <= self.num_tokens:
            raise ValueError(
                f"num_tokens={num_tokens}: a {self.grid_size}x{self.grid_size} grid holds between 1 and "
                f"{self.num_tokens} tokens"
            )
        needed = self.cls_token_num + num_tokens - 1
        if needed > self.cache_len:
            raise ValueError(
                f"num_tokens={num_tokens} needs {needed} KV-cache positions ({self.cls_token_num} class tokens + "
                f"{num_tokens - 1} fed tokens) but the cache holds {self.cache_len}; call setup_caches with "
                f"max_seq_len >= {needed}"
            )

    # -- raster decoding on the KV cache (the protocol of lit_ar/methods/raster.py, which FlowARTransformer's raster
    # order shares): prefill_hidden, then decode_hidden per token, each giving the states the head reads
    def prefill_hidden(self, labels: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """Write the prefix into the cache; labels (B,) -> the states (B, 1, C) that predict token 0, the token at
        grid position `target` (B,) under a target-aware embedding (default 0, raster's first)."""
        x = self.prefix(labels)  # (B, P, C)
        target = torch.zeros(x.shape[0], dtype=torch.long, device=x.device) if target is None else target
        t = self.slot_inputs(None, target[:, None])  # (B, 1, C) or None
        if t is not None:
            x = x + F.pad(t, (0, 0, self.cls_token_num - 1, 0))  # the last prefix slot predicts the first target
        input_pos = torch.arange(self.cls_token_num, device=x.device)  # (P,)
        return self._cached_forward(x, input_pos, self.prefix_rope(x.shape[0]))[:, -1:]

    def decode_hidden(self, tokens: torch.Tensor, input_pos: torch.Tensor, positions: torch.Tensor | None = None,
                      targets: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Feed tokens (B, T) at cache slots `input_pos` (T,), or (B, T) per sequence -> the states (B, T, C) that
        predict the next token of each. In raster order token i sits at slot P + i and predicts grid position i + 1;
        another order gives each fed token's grid position `positions` (B, T) (its RoPE) and the position it
        predicts, `targets` (B, T) (the target-aware embedding's). Fixed shapes at every position: compile it once,
        replay it L - 1 times."""
        P = self.cls_token_num
        positions = input_pos - P if positions is None else positions  # grid position of each fed token
        targets = positions + 1 if targets is None else targets  # what each slot predicts
        x = self.tok_embeddings(tokens)  # (B, T, C)
        add = self.slot_inputs(positions, targets)
        return self._cached_forward(x if add is None else x + add, input_pos, self.slot_rope(positions, targets))

    def prefill(self, labels: torch.Tensor) -> torch.Tensor:
        """`prefill_hidden` to the logits of token 0 (B, V)."""
        return self.logits(self.prefill_hidden(labels))[:, -1]

    def decode_step(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """`decode_hidden` to the logits of the next token (B, V)."""
        return self.logits(self.decode_hidden(tokens, input_pos))[:, -1]

    def decode_block(self, x: torch.Tensor, input_pos: torch.Tensor, rope: torch.Tensor,
                     upto: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Input embeddings (B, T, C) written at cache slots `input_pos` (T,) (consecutive), each seeing the whole
        block and everything before it (PAR's group-wise full attention), or every slot up to its `upto` (T,) (LPD's
        blocks of fed tokens and of queries) -> the states (B, T, C)."""
        upto = input_pos[-1:].expand(input_pos.shape[0]) if upto is None else upto
        return self._cached_forward(x, input_pos, rope, upto=upto)

    def _cached_forward(self, x: torch.Tensor, input_pos: torch.Tensor, rope: torch.Tensor | None = None,
                        upto: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        # a slot may attend to every cache position up to its own (or `upto`): (T, S) or, per sequence, (B, 1, T, S)
        upto = input_pos if upto is None else upto
        mask = torch.arange(self.cache_len, device=x.device) <= upto[..., None]
        mask = mask[:, None] if input_pos.ndim == 2 else mask
        rope = self.rope[input_pos] if rope is None else rope  # (T, hd/2, 2) or (B, T, hd/2, 2)
        for layer in self.layers:
            x = layer(x, rope, mask=mask, input_pos=input_pos)
        return x  # (B, T, C), before the final norm (the head's logits apply it)
