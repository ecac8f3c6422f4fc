"""ARPGSystem: ARPG over a frozen discrete tokenizer: the decoupled `ARPGTransformer` core, the categorical head and
ARPG's method (lit_ar/methods/arpg.py): random-order training, randomized parallel decoding in `steps` model calls.
"""

from typing import Literal

import torch

from lit_ar.methods.arpg import ARPG, ARPGSampling
from lit_ar.models.arpg import PRESETS, ARPGTransformer
from lit_ar.systems.generator import GeneratorSystem

PresetName = Literal["ARPG-L", "ARPG-XL", "ARPG-XXL", "ARPG-nano", "ARPG-micro", "ARPG-mini"]


class ParallelSteps:
    """What the parallel decoders' systems (ARPG, LPD) share: `steps` refused outside 1 .. L, in the config and at
    every sampling call, by name. `decoder` names the method in the message."""

    decoder = "ARPG"

    def check_steps(self, settings, setting: str) -> None:
        L = self.model.num_tokens
        if settings.steps is not None and not 1 <= settings.steps <= L:
            G = self.model.grid_size
            raise ValueError(f"{setting}.steps={settings.steps}: {self.decoder} decodes the {L} tokens of a {G}x{G} "
                             f"grid in 1 to {L} steps ({L}: one token per step)")  # fmt: skip

    def sampling_settings(self, values=None, setting: str = "sampling"):
        settings = super().sampling_settings(values, setting)
        self.check_steps(settings, setting)
        return settings


class ARPGSystem(ParallelSteps, GeneratorSystem):
    Sampling = ARPGSampling

    def __init__(
        self,
        preset: PresetName = "ARPG-nano",
        vocab_size: int | None = None,
        grid_size: int | None = None,
        dim: int | None = None,
        depth: int | None = None,
        n_heads: int | None = None,
        token_dropout: float = 0.1,
        resid_dropout: float = 0.1,
        query_position_embedding: bool = False,
        predict_kwargs: ARPGSampling | None = None,
        **kwargs,
    ):
        """
        Args:
            preset: Transformer size: ARPG's ARPG-L (320M with 1000 classes and vocab 16384), ARPG-XL, ARPG-XXL, or
                a CPU size ARPG-nano (dim 64, 2 blocks), ARPG-micro (128, 4), ARPG-mini (256, 6); half the blocks
                are the self-decoder, half the cross-decoder.
            vocab_size: Token vocabulary; taken from the tokenizer (must agree when both are set).
            grid_size: Side of the token grid; taken from the tokenizer like vocab_size.
            dim: Overrides the preset's width.
            depth: Overrides the preset's number of blocks (even: two equal halves).
            n_heads: Overrides the preset's number of attention heads.
            token_dropout: Dropout on the input embeddings (ARPG: 0.1).
            resid_dropout: Dropout on each attention and MLP output (ARPG: 0.1).
            query_position_embedding: Not ARPG's: add a learned embedding of the target position to each query.
                ARPG's queries know their target only through RoPE, which reweights the keys they attend to, so the
                first queries (one key: the class) cannot tell where they are.
            predict_kwargs: Sampling settings (`ARPGSampling`: steps, schedule, cfg and its schedule, temperature,
                top_k, top_p).
        """
        super().__init__(predict_kwargs=predict_kwargs, **kwargs)
        vocab_size, grid_size = self.resolve_tokens(vocab_size=vocab_size, grid_size=grid_size)
        sizes = {**PRESETS[preset], **{k: v for k, v in dict(dim=dim, depth=depth, n_heads=n_heads).items()
                                       if v is not None}}  # fmt: skip
        self.model = ARPGTransformer(vocab_size, grid_size, self.hparams.num_classes, **sizes,
                                     token_dropout=token_dropout, resid_dropout=resid_dropout,
                                     query_position_embedding=query_position_embedding)  # fmt: skip
        self.method = ARPG()
        # a number of steps the grid cannot take, refused now
        self.check_steps(ARPGSampling.parse(self.hparams.predict_kwargs), "model.init_args.predict_kwargs")

    def core_blocks(self) -> list:
        return self.model.blocks

    def batch_tokens(self, batch: dict) -> torch.Tensor:
        return self.grid_tokens(batch)

    def sampling_kwargs(self) -> dict:
        return {"cache_dtype": self.cache_dtype()}
