"""MaskedARSystem: MaskGIT over a frozen discrete tokenizer: a `MaskedTransformer` core, the categorical head and the
masked method (lit_ar/methods/masked.py), which holds the training draw (mask ratio and positions) and the parallel
decoding loop, and validation (loss and accuracy at the masked positions).
"""

from typing import Literal

import torch

from lit_ar.methods.masked import MaskedSampling, MaskGIT
from lit_ar.models.masked_ar import PRESETS, MaskedTransformer
from lit_ar.sampling import MASK_SCHEDULES
from lit_ar.systems.generator import GeneratorSystem, sizes_under_former_names


class MaskedARSystem(GeneratorSystem):
    Sampling = MaskedSampling
    samples_null_class = True  # unconditional samples, when trained with class dropout

    def __init__(
        self,
        preset: Literal["tiny", "small", "base"] = "tiny",
        vocab_size: int | None = None,
        grid_size: int | None = None,
        dim: int | None = None,
        depth: int | None = None,
        n_heads: int | None = None,
        mlp: Literal["gelu", "swiglu"] = "gelu",
        norm: Literal["rms", "layer"] = "layer",
        qk_norm: bool = False,
        pos_embed: Literal["rope2d", "learned"] = "rope2d",
        dropout: float = 0.1,
        drop_path: float = 0.0,
        mask_schedule: str = "cosine",
        mask_power: float = 2.0,
        label_smoothing: float = 0.1,
        predict_kwargs: MaskedSampling | None = None,
        n_layers: int | None = None,
        **kwargs,
    ):
        """
        Args:
            preset: Transformer size: tiny (CPU tests), small (shapes on one GPU), base (MaskGIT: 24 layers, width
                768, 16 heads). `dim`, `depth`, `n_heads` override it.
            vocab_size: Codebook size; None takes the tokenizer's (if given it must equal the tokenizer's).
            grid_size: Token grid side (L = grid_size**2 tokens); None takes the tokenizer's.
            dim: Width (overrides the preset).
            depth: Number of transformer blocks (overrides the preset).
            n_heads: Attention heads (overrides the preset).
            mlp: MLP type: gelu (MaskGIT, 4x width) or swiglu (LLaMA).
            norm: Normalisation: layer (MaskGIT) or rms.
            qk_norm: RMS-normalise queries and keys (stabilises large models in bf16).
            pos_embed: Positions: rope2d (2D rotary, row/column) or learned (MaskGIT's absolute embedding).
            dropout: Dropout on embeddings and residual branches (MaskGIT: 0.1).
            drop_path: Stochastic depth rate of the last block (grows linearly from 0 over depth).
            mask_schedule: Schedule mapping u ~ U(0, 1) to each training sample's mask ratio; one of cosine
                (MaskGIT), arccos, linear, power, sigmoid.
            mask_power: Exponent of the `power` schedule (ratio = 1 - u**mask_power).
            label_smoothing: Label smoothing of the cross-entropy on masked tokens (MaskGIT: 0.1).
            predict_kwargs: Sampling settings (see GeneratorSystem).
            n_layers: Former name of `depth` (configs and checkpoints written before lit_ar's one size vocabulary).
        """
        super().__init__(predict_kwargs=predict_kwargs, **kwargs)
        if preset not in PRESETS:
            raise ValueError(f"model.init_args.preset={preset!r} is not known; known presets: {tuple(PRESETS)}")
        if mask_schedule not in MASK_SCHEDULES:
            raise ValueError(
                f"model.init_args.mask_schedule={mask_schedule!r} is not known; known schedules: {MASK_SCHEDULES}"
            )
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"model.init_args.label_smoothing={label_smoothing} must be in [0, 1)")
        vocab_size, grid_size = self.resolve_tokens(vocab_size=vocab_size, grid_size=grid_size)
        sizes = sizes_under_former_names(dict(dim=dim, depth=depth, n_heads=n_heads), {"n_layers": ("depth", n_layers)})
        self.model = MaskedTransformer.from_preset(
            preset, vocab_size, grid_size, self.hparams.num_classes, **sizes, mlp=mlp, norm=norm, qk_norm=qk_norm,
            pos_embed=pos_embed, dropout=dropout, drop_path=drop_path,
        )  # fmt: skip
        self.method = MaskGIT(mask_schedule, mask_power, label_smoothing)
        self._checked_token_range = False

    def batch_tokens(self, batch: dict) -> torch.Tensor:
        tokens = self.tokens_from_batch(batch)  # (B, L)
        L, V = self.model.num_tokens, self.model.vocab_size
        if tokens.ndim != 2 or tokens.shape[1] != L:
            raise ValueError(f"expected tokens of shape (B, {L}) for grid_size={self.model.grid_size}, got "
                             f"{tuple(tokens.shape)}")  # fmt: skip
        if not self._checked_token_range:  # once: a .max() per step would synchronise the device every step
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= V:
                raise ValueError(f"token ids from {lo} to {hi} fall outside the vocabulary [0, {V})")
            self._checked_token_range = True
        return tokens.long()

    def generate(self, labels: torch.Tensor, generator: torch.Generator | None = None, return_trace: bool = False,
                 **settings):  # fmt: skip
        """labels (B,) -> tokens (B, L) by MaskGIT parallel decoding, with the settings of `MaskedSampling`; with
        return_trace also the grid before each step and after the last (see MaskGIT.sample). Labels may be the null
        class (unconditional) when the model was trained with class dropout."""
        return self.run_sampler(labels, generator, settings, return_trace=return_trace)
