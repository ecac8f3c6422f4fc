"""XARSystem: xAR over a frozen continuous tokenizer (the KL-VAE): `XARTransformer`, which denoises the entities
itself (no head), and xAR's method (lit_ar/methods/xar.py): next-X prediction with flow matching, the prediction unit
a setting, noisy context learning (or clean teacher forcing) in training, entity-by-entity flow sampling on the KV
cache.
"""

from typing import Literal

import torch

from lit_ar.methods.xar import ENTITY_UNITS, XAR, XARSampling, entities
from lit_ar.models.xar import XARTransformer
from lit_ar.systems.generator import GeneratorSystem


class XARSystem(GeneratorSystem):
    continuous_tokens = True
    Sampling = XARSampling
    core_name = "core"

    def __init__(
        self,
        token_dim: int | None = None,
        grid_size: int | None = None,
        dim: int = 768,
        depth: int = 12,
        n_heads: int = 12,
        mlp_ratio: float = 4.0,
        attn_dropout: float = 0.0,
        proj_dropout: float = 0.0,
        entity: Literal["token", "cell", "subsample", "image"] = "cell",
        entity_size: int = 2,
        context: Literal["noisy", "clean"] = "noisy",
        time_sampling: Literal["logit_normal", "uniform"] = "logit_normal",
        class_token: bool = False,
        posterior_sample: bool = True,
        predict_kwargs: XARSampling | None = None,
        **kwargs,
    ):
        """
        Args:
            token_dim: Width D of a continuous token; null takes the tokenizer's `latent_channels`.
            grid_size: Side of the latent token grid; null takes the tokenizer's `grid_size`.
            dim: Transformer width (xAR-B: 768, with 16 blocks: its encoder's 8 and decoder's 8).
            depth: Transformer blocks.
            n_heads: Attention heads.
            mlp_ratio: MLP hidden width as a multiple of `dim`.
            attn_dropout: Attention dropout.
            proj_dropout: Dropout after attention and MLP projections.
            entity: The prediction unit X: token, cell (k x k tokens, xAR's default), subsample (the tokens of one
                phase of a stride-k lattice, spread over the image) or image (one entity).
            entity_size: k of a cell (its side) or of a subsample (the lattice stride); it must divide the grid.
                xAR's 256-pixel models cut the 16x16 grid into 2x2 cells of 8x8 tokens.
            context: noisy (xAR's noisy context learning: every entity noised at its own time in training) or
                clean (lit_ar's ablation: clean teacher forcing, the earlier entities clean).
            time_sampling: Law of the flow time of each entity in training: logit_normal (xAR's) or uniform.
            class_token: Not xAR's: a class token in front of the sequence that every entity attends to, besides the
                class in the AdaLN condition (where, added to the time's embedding, it is small at a short budget).
            posterior_sample: Train on a sample of the KL tokenizer's posterior rather than its mean.
            predict_kwargs: Sampling settings (`XARSampling`: flow_steps, sampler, cfg and its schedule over the
                entities, guidance_interval, temperature).
        """
        super().__init__(predict_kwargs=predict_kwargs, **kwargs)
        if entity not in ENTITY_UNITS:
            raise ValueError(f"model.init_args.entity={entity!r} is not known; known units: {', '.join(ENTITY_UNITS)}")
        token_dim, grid_size = self.resolve_tokens(token_dim=token_dim, grid_size=grid_size)
        try:
            entities(entity, grid_size, entity_size)
        except ValueError as err:
            raise ValueError(f"model.init_args.{err}") from None
        self.token_dim, self.grid_size = token_dim, grid_size
        self.core = XARTransformer(token_dim, grid_size, self.hparams.num_classes, dim, depth, n_heads, mlp_ratio,
                                   attn_dropout, proj_dropout, class_token)  # fmt: skip
        self.method = XAR(entity, entity_size, context, time_sampling)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> continuous tokens (B, L, D): a sample of the KL posterior (posterior_sample) or its mean."""
        return super().encode(images, sample=self.hparams.posterior_sample)

    def batch_tokens(self, batch: dict) -> torch.Tensor:
        tokens = self.tokens_from_batch(batch).float()  # (B, L, D)
        if tokens.ndim != 3 or tokens.shape[1:] != (self.grid_size**2, self.token_dim):
            raise ValueError(f"tokens of shape {tuple(tokens.shape)} do not fit xAR's {self.grid_size}x"
                             f"{self.grid_size} grid of {self.token_dim}-wide tokens")  # fmt: skip
        return tokens

    def sampling_modules(self) -> list:
        return list(self.core.blocks)

    def sampling_kwargs(self) -> dict:
        return {"cache_dtype": self.cache_dtype()}
