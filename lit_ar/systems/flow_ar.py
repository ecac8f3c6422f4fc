"""FlowARSystem: continuous-token AR with a per-token flow-matching head (or MAR's diffusion head) over one of three
backbones, each a core and a method: `mar` (MAR: `MARTransformer` and lit_ar/methods/masked.py's `MAR`), `flowar`
(FlowAR: `FlowARTransformer` over doubling scales and lit_ar/methods/groups.py's `FlowGroups`) and `causal`
(continuous raster AR: the same core in raster order and lit_ar/methods/raster.py's `RasterAR`, discrete raster AR's
loop). The `diffusion` head is what MAR's released generators run with in lit_ar.
"""

from typing import Literal

import torch

from lit_ar.methods.base import ContinuousSampling
from lit_ar.methods.groups import FlowGroups
from lit_ar.methods.masked import MAR
from lit_ar.methods.raster import RasterAR
from lit_ar.models.diffusion_head import continuous_head
from lit_ar.models.flowar import FlowARTransformer
from lit_ar.models.mar import MARTransformer
from lit_ar.performance import compile_blocks_in_place
from lit_ar.systems.generator import GeneratorSystem

BACKBONES = ("mar", "flowar", "causal")


class FlowARSystem(GeneratorSystem):
    continuous_tokens = True
    Sampling = ContinuousSampling
    core_name = "core"

    def __init__(
        self,
        backbone: Literal["mar", "flowar", "causal"] = "mar",
        token_dim: int | None = None,
        grid_size: int | None = None,
        dim: int = 768,
        depth: int = 12,
        n_heads: int = 12,
        mlp_ratio: float = 4.0,
        attn_dropout: float = 0.0,
        proj_dropout: float = 0.0,
        decoder_depth: int | None = None,
        buffer_size: int = 64,
        mask_ratio_min: float = 0.7,
        scales: list[int] | None = None,
        head_width: int = 1024,
        head_depth: int = 6,
        head_batch_mul: int = 4,
        time_sampling: Literal["uniform", "logit_normal"] = "uniform",
        posterior_sample: bool = True,
        head: Literal["flow", "diffusion"] = "flow",
        predict_kwargs: ContinuousSampling | None = None,
        **kwargs,
    ):
        """
        Args:
            backbone: `mar` (bidirectional, random order, MAR), `flowar` (scale-wise, FlowAR) or `causal`
                (raster order, causal attention).
            token_dim: Width D of a continuous token; null takes the tokenizer's `latent_channels` (when both are
                set they must agree). Needed only without a tokenizer (tests on plain tensors).
            grid_size: Side of the latent token grid; null takes the tokenizer's `grid_size`.
            dim: Transformer width (MAR-B: 768).
            depth: Transformer blocks; for `mar` the encoder's blocks (MAR-B: 12 + 12 decoder blocks).
            n_heads: Attention heads.
            mlp_ratio: MLP hidden width as a multiple of `dim`.
            attn_dropout: Attention dropout (MAR: 0.1).
            proj_dropout: Dropout after attention and MLP projections (MAR: 0.1).
            decoder_depth: `mar` only: decoder blocks; null means `depth`.
            buffer_size: `mar` only: class (buffer) tokens in front of the sequence (MAR: 64).
            mask_ratio_min: `mar` only: the training mask ratio is drawn from a normal centred at 1 with std 0.25,
                truncated to [mask_ratio_min, 1] (MAR: 0.7).
            scales: `flowar` only: token-grid sides of the scales, increasing to the grid side; null means
                doubling (1, 2, 4, ..., grid_size).
            head_width: Width of the flow head's residual MLP (MAR-B: 1024).
            head_depth: Residual AdaLN blocks of the flow head (MAR-B: 6).
            head_batch_mul: Each token is trained with this many independent (noise, time) draws per step
                (MAR's diffusion_batch_mul: the head is cheap, the backbone's pass is shared).
            time_sampling: Law of the flow time in training: `uniform` or `logit_normal` (SD3); the diffusion head
                draws its steps uniformly (MAR).
            posterior_sample: Train on a sample of the KL tokenizer's posterior (MAR) rather than its mean. The
                tokenizer draws that noise from each process's own random state, so with it on, N DDP processes
                match one process in law but not bit for bit (every other random draw here is per global sample).
            head: `flow` (rectified flow, few ODE steps) or `diffusion` (MAR's DiffLoss: a DDPM over 1000 cosine
                steps predicting the noise and a learned variance; samples with 100 steps in MAR).
            predict_kwargs: Sampling settings (see GeneratorSystem).
        """
        super().__init__(predict_kwargs=predict_kwargs, **kwargs)
        if backbone not in BACKBONES:
            raise ValueError(f"model.init_args.backbone={backbone!r} is not known; use one of {BACKBONES}")
        if scales is not None and backbone != "flowar":
            raise ValueError(f"model.init_args.scales={scales} applies to backbone='flowar' only, not {backbone!r}")
        token_dim, grid_size = self.resolve_tokens(token_dim=token_dim, grid_size=grid_size)
        self.token_dim, self.grid_size = token_dim, grid_size
        sizes = dict(dim=dim, depth=depth, n_heads=n_heads, mlp_ratio=mlp_ratio, attn_dropout=attn_dropout,
                     proj_dropout=proj_dropout)  # fmt: skip
        if backbone == "mar":
            self.method = MAR(mask_ratio_min, head_batch_mul)
            self.core = MARTransformer(token_dim, grid_size**2, self.hparams.num_classes, decoder_depth=decoder_depth,
                                       buffer_size=buffer_size, **sizes)  # fmt: skip
        else:  # scale by scale (FlowGroups), or token by token in the loop discrete raster AR runs (RasterAR)
            flowar = backbone == "flowar"
            self.method = FlowGroups(head_batch_mul) if flowar else RasterAR(None, head_batch_mul, True)
            self.core = FlowARTransformer(token_dim, grid_size, self.hparams.num_classes, scales=scales,
                                          order="scale" if flowar else "raster", **sizes)  # fmt: skip
        # the head's condition is the core's width (MAR's decoder width is its encoder's)
        self.head = continuous_head(head, token_dim, dim, head_width, head_depth, time_sampling)

    def compile_in_place(self) -> None:
        # MAR's encoder length and head rows change at every step (the mask ratio is drawn per batch)
        dynamic = True if self.hparams.backbone == "mar" else None
        compile_blocks_in_place(self.core.blocks, dynamic)
        # the whole head, not its blocks: sampling calls it flow_steps times per AR step on a few rows, where one
        # graph a call beats a dozen eager ops around compiled blocks (`python -m benchmarks`)
        self.head.compile(dynamic=dynamic)  # in place, so checkpoint keys carry no `_orig_mod.`

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> continuous tokens (B, L, D): a sample of the KL posterior (posterior_sample) or its mean."""
        return super().encode(images, sample=self.hparams.posterior_sample)

    def batch_tokens(self, batch: dict) -> torch.Tensor:
        tokens = self.tokens_from_batch(batch).float()  # (B, L, D)
        self.head.check_tokens(tokens, "the tokenizer's tokens")
        return tokens

    def sampling_modules(self) -> list:
        # the blocks' and the head's linear weights, but not the head's time embedding: an fp32 island
        return [*self.core.blocks, *(m for name, m in self.head.named_children() if name != "time_embed")]

    def sampling_kwargs(self) -> dict:
        return {} if self.hparams.backbone == "mar" else {"cache_dtype": self.cache_dtype()}
