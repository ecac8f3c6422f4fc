"""ScaleARSystem: VAR's next-scale prediction over a frozen multi-scale residual VQ tokenizer: a `ScaleTransformer`
core, the categorical head (VAR's AdaLN head inside the core) and the group method's `NextScale`
(lit_ar/methods/groups.py), whose training and sampling read the tokenizer's quantizer.
"""

import torch

from lit_ar.methods.groups import NextScale, ScaleSampling
from lit_ar.models.scale_ar import ScaleTransformer
from lit_ar.systems.generator import GeneratorSystem, sizes_under_former_names


class ScaleARSystem(GeneratorSystem):
    Sampling = ScaleSampling

    def __init__(
        self,
        depth: int = 16,
        dim: int | None = None,
        n_heads: int | None = None,
        mlp_ratio: float = 4.0,
        cosine_attn: bool = True,
        shared_adaln: bool = False,
        rope: bool = False,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        drop_path: float = 0.0,
        scales: list[int] | None = None,
        scale_loss_weights: list[float] | None = None,
        label_smoothing: float = 0.0,
        predict_kwargs: ScaleSampling | None = None,
        width: int | None = None,
        heads: int | None = None,
        **kwargs,
    ):
        """
        Args:
            depth: Transformer blocks. VAR's presets: dim = 64 * depth and n_heads = depth, so depth 16/20/24/30
                give VAR-d16/d20/d24/d30 (310M parameters for d16 with 1000 classes and 4096 codes of width 32).
            dim: Model width; None follows VAR's rule, 64 * depth.
            n_heads: Attention heads; None follows VAR's rule, depth.
            mlp_ratio: MLP hidden width as a multiple of the width (GELU-tanh MLP, VAR's 4).
            cosine_attn: Cosine (l2-normalised q, k) attention with a learned per-head scale, as VAR.
            shared_adaln: One AdaLN linear shared by all blocks (each adds a learned offset) instead of one per block
                (VAR's shared_aln; a smaller model).
            rope: Add 2D rotary embeddings per scale, each scale's positions stretched onto the finest grid (the
                learned position and level embeddings stay).
            dropout: Dropout after attention and MLP projections.
            attn_dropout: Dropout on attention probabilities.
            drop_path: Stochastic depth of the last block, growing linearly from 0 at the first (VAR uses
                0.1 * depth / 24).
            scales: Side of each scale's token map, e.g. [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]; None takes the
                tokenizer's. Must equal the tokenizer's scales when given.
            scale_loss_weights: Weight of each scale's tokens in the loss (one per scale); None weighs every token
                equally (VAR), so finer scales, having more tokens, count more.
            label_smoothing: Cross-entropy label smoothing.
            predict_kwargs: Sampling settings (see GeneratorSystem).
            width: Former name of `dim` (configs and checkpoints written before lit_ar's one size vocabulary).
            heads: Former name of `n_heads`.
        """
        super().__init__(predict_kwargs=predict_kwargs, **kwargs)
        if self.tokenizer is None:
            raise ValueError(
                "model.init_args.tokenizer_ckpt is required: ScaleARSystem takes its vocabulary, codebook width and "
                "scales from a multi-scale VQ tokenizer checkpoint (its quantizer builds the next scale's input)"
            )
        (scales,) = self.resolve_tokens(multi_scale=True, scales=scales)
        tok = self.tokenizer
        self.scales = scales
        if scale_loss_weights is not None and (
            len(scale_loss_weights) != len(self.scales) or min(scale_loss_weights) < 0 or sum(scale_loss_weights) <= 0
        ):
            raise ValueError(
                f"model.init_args.scale_loss_weights={list(scale_loss_weights)} must be {len(self.scales)} "
                f"non-negative numbers (one per scale of {list(self.scales)}), not all zero"
            )
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"model.init_args.label_smoothing={label_smoothing} must be in [0, 1)")
        sizes = sizes_under_former_names(dict(dim=dim, n_heads=n_heads),
                                         dict(width=("dim", width), heads=("n_heads", heads)))  # fmt: skip
        self.model = ScaleTransformer(
            self.hparams.num_classes, tok.vocab_size, tok.latent_channels, self.scales, depth, **sizes,
            mlp_ratio=mlp_ratio, cosine_attn=cosine_attn, shared_adaln=shared_adaln, rope=rope, dropout=dropout,
            attn_dropout=attn_dropout, drop_path=drop_path,
        )  # fmt: skip
        weights = torch.tensor(scale_loss_weights or [1.0] * len(self.scales), dtype=torch.float32)
        per_token = weights[self.model.levels]  # (L,)
        self.register_buffer("token_weights", per_token / per_token.sum(), persistent=False)  # sums to 1
        self.method = NextScale(label_smoothing)

    # -- training ----------------------------------------------------------------------------------------------
    def batch_tokens(self, batch: dict) -> list[torch.Tensor]:
        """A batch's index maps: a list of (B, s_k^2) long (a token cache may hold them concatenated, (B, L))."""
        tokens = self.tokens_from_batch(batch)
        if isinstance(tokens, torch.Tensor):
            tokens = list(tokens.split([s * s for s in self.scales], dim=1))
        return tokens

    def method_kwargs(self) -> dict:
        # the quantizer builds the next scale's input, in training and sampling
        return {"quantizer": self.tokenizer.quantizer, "token_weights": self.token_weights}

    def sampling_kwargs(self) -> dict:
        return {"quantizer": self.tokenizer.quantizer, "cache_dtype": self.cache_dtype()}

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, generator: torch.Generator | None = None, return_scales: bool = False,
               **settings) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:  # fmt: skip
        """Class-conditional samples, scale by scale: images (B, C, H, W) in [-1, 1], with `return_scales` also the
        images decoded from the cumulative latent after each scale (the coarse-to-fine sequence, K of them)."""
        _, f_hats = self.sample_tokens(labels, generator, **settings)
        images = self.decode_fhat(f_hats[-1])
        if return_scales:
            return images, [self.decode_fhat(f) for f in f_hats]
        return images

    @torch.no_grad()
    def decode_fhat(self, f_hat: torch.Tensor) -> torch.Tensor:
        self.tokenizer.eval()
        return self.tokenizer.decode_from_fhat(f_hat).clamp(-1, 1)
