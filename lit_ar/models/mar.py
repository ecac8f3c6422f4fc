"""MARTransformer: MAR's bidirectional encoder-decoder over continuous tokens (Li et al. 2024, "Autoregressive Image
Generation without Vector Quantization"). It turns (tokens, which of them are still unknown, class) into one
condition vector per position; a per-token flow head (lit_ar.models.flow_head) turns that into a token.

- The encoder (MAE style) sees only the known tokens plus `buffer_size` class tokens in front; the decoder sees
  every position, unknown ones replaced by a learned mask token. Attention is bidirectional; the order in which
  tokens become known is random (drawn by the caller), which is what makes MAR autoregressive.
- Every row of a batch must hide the same number of tokens (MAR masks the same count per row in training and
  sampling), so dropping the hidden tokens is a gather with a fixed shape.

The training mask and the sampling loop (N steps, cosine schedule, linear CFG) live in
lit_ar/systems/flow_ar.py.
"""

import torch
from torch import nn

from lit_ar.models.layers import Block


class MARTransformer(nn.Module):
    def __init__(
        self,
        token_dim: int,
        seq_len: int,
        num_classes: int,
        dim: int = 768,
        depth: int = 12,
        n_heads: int = 12,
        decoder_dim: int | None = None,
        decoder_depth: int | None = None,
        decoder_heads: int | None = None,
        mlp_ratio: float = 4.0,
        buffer_size: int = 64,
        attn_dropout: float = 0.0,
        proj_dropout: float = 0.0,
    ):
        super().__init__()
        if buffer_size < 1:
            raise ValueError(
                f"buffer_size={buffer_size} must be >= 1: at the first sampling step every token is unknown and "
                "the encoder sees only the buffer (class) tokens"
            )
        decoder_dim, decoder_depth = decoder_dim or dim, decoder_depth or depth
        decoder_heads = decoder_heads or n_heads
        self.token_dim, self.seq_len, self.num_classes, self.buffer_size = token_dim, seq_len, num_classes, buffer_size
        self.dim, self.depth, self.decoder_dim = dim, depth, decoder_dim

        def block(width: int, heads: int) -> Block:  # timm's ViT block, as MAR uses: LayerNorm, exact GELU, biases
            return Block(width, heads, mlp="gelu", mlp_hidden=int(width * mlp_ratio), norm="layer", norm_eps=1e-6,
                         bias=True, attn_dropout=attn_dropout, resid_dropout=proj_dropout,
                         gelu_approximate="none")  # fmt: skip

        # encoder: class embedding (row num_classes is the null class of CFG) in the buffer, known tokens after it
        self.class_emb = nn.Embedding(num_classes + 1, dim)
        self.z_proj = nn.Linear(token_dim, dim)
        self.z_proj_ln = nn.LayerNorm(dim, eps=1e-6)
        self.enc_pos = nn.Parameter(torch.zeros(1, buffer_size + seq_len, dim))
        self.encoder = nn.ModuleList([block(dim, n_heads) for _ in range(depth)])
        self.enc_norm = nn.LayerNorm(dim, eps=1e-6)
        # decoder: every position, unknown ones as the mask token
        self.dec_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.dec_pos = nn.Parameter(torch.zeros(1, buffer_size + seq_len, decoder_dim))
        self.decoder = nn.ModuleList([block(decoder_dim, decoder_heads) for _ in range(decoder_depth)])
        self.dec_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.head_pos = nn.Parameter(torch.zeros(1, seq_len, decoder_dim))  # MAR's diffusion_pos_embed_learned
        self.reset_parameters()

    @property
    def blocks(self) -> list[nn.Module]:
        return [*self.encoder, *self.decoder]

    def reset_parameters(self) -> None:
        # MAR's initialisation: xavier-uniform linears (official JAX ViT), N(0, 0.02) embeddings and mask token
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for p in (self.class_emb.weight, self.mask_token, self.enc_pos, self.dec_pos, self.head_pos):
            nn.init.normal_(p, std=0.02)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                positions: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """tokens (B, L, D) (hidden ones may hold anything), mask (B, L) bool True = unknown, labels (B,) with
        num_classes = null class -> conditions (B, L, decoder_dim) for the flow head at every position, or with
        `positions` (B, n) (token indices in [0, L)) conditions (B, n, decoder_dim) at those positions only."""
        B, L, D = tokens.shape
        if L != self.seq_len or D != self.token_dim:
            raise ValueError(f"tokens {tuple(tokens.shape)} do not match seq_len={self.seq_len}, "
                             f"token_dim={self.token_dim}")  # fmt: skip
        hidden = mask.sum(1)  # (B,)
        if bool((hidden != hidden[0]).any()):
            raise ValueError(f"every row must hide the same number of tokens; got {hidden.tolist()}")
        keep = torch.cat([mask.new_ones(B, self.buffer_size), ~mask], dim=1)  # (B, S) S = buffer + L

        # encoder over the buffer and the known tokens
        x = self.z_proj(tokens)  # (B, L, C)
        buffer = self.class_emb(labels)[:, None].expand(B, self.buffer_size, -1).to(x.dtype)  # (B, buf, C)
        x = self.z_proj_ln(torch.cat([buffer, x], dim=1) + self.enc_pos)  # (B, S, C)
        x = x[keep].reshape(B, -1, self.dim)  # (B, buf + known, C)
        for block in self.encoder:
            x = block(x)
        x = self.dec_embed(self.enc_norm(x))  # (B, buf + known, Cd)

        # decoder over every position: the mask token where the token is unknown
        full = self.mask_token.to(x.dtype).expand(B, keep.shape[1], -1).clone()  # (B, S, Cd)
        full[keep] = x.reshape(-1, self.decoder_dim)
        x = full + self.dec_pos
        for block in self.decoder[:-1]:
            x = block(x)
        if positions is None:
            x = self.dec_norm(self.decoder[-1](x))[:, self.buffer_size :]  # (B, L, Cd)
            return x + self.head_pos
        # The head reads only the positions it predicts (a sampling step's next tokens; the hidden ones in
        # training), so the last block makes outputs there alone: every position still serves as a key, but
        # attention's queries, wo and the MLP run on n rows instead of buffer + L.
        x = self.decoder[-1](x, query_index=positions + self.buffer_size)  # (B, n, Cd)
        return self.dec_norm(x) + self.head_pos[0][positions]  # (B, n, Cd)
