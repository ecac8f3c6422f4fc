"""LPDSystem: LPD over a frozen discrete tokenizer: LlamaGen's `CausalTransformer` core with position queries, the
categorical head and LPD's method (lit_ar/methods/lpd.py): random-order training under group-size schedules drawn
per step, locality-aware parallel decoding in `steps` model calls.
"""

import torch

from lit_ar.methods.lpd import LPD, LPDSampling
from lit_ar.models.causal_ar import PRESETS, CausalTransformer
from lit_ar.sampling import MASK_SCHEDULES
from lit_ar.systems.arpg import ParallelSteps
from lit_ar.systems.causal_ar import PresetName
from lit_ar.systems.generator import GeneratorSystem


class LPDSystem(ParallelSteps, GeneratorSystem):
    Sampling = LPDSampling
    decoder = "LPD"

    def __init__(
        self,
        preset: PresetName = "GPT-nano",
        vocab_size: int | None = None,
        grid_size: int | None = None,
        dim: int | None = None,
        depth: int | None = None,
        n_heads: int | None = None,
        token_dropout: float = 0.1,
        resid_dropout: float = 0.1,
        train_steps: list[int] | None = None,
        train_schedule: str = "cosine",
        predict_kwargs: LPDSampling | None = None,
        **kwargs,
    ):
        """
        Args:
            preset: Transformer size: LlamaGen's GPT-B ... GPT-3B (LPD's L, XL and XXL have GPT-L's, GPT-XL's and
                GPT-XXL's width and depth), or a CPU size GPT-nano (dim 64, 2 layers), GPT-micro (128, 4),
                GPT-mini (256, 6).
            vocab_size: Token vocabulary; taken from the tokenizer (must agree when both are set).
            grid_size: Side of the token grid; taken from the tokenizer like vocab_size.
            dim: Overrides the preset's width.
            depth: Overrides the preset's number of blocks.
            n_heads: Overrides the preset's number of attention heads.
            token_dropout: Dropout on the input embeddings.
            resid_dropout: Dropout on each attention and MLP output.
            train_steps: The step counts training draws a group-size schedule from, one per step (LPD trains on
                256 ... 8 steps for 256 tokens); default the tokens, halved down to 4 (64, 32, 16, 8, 4 on 8x8).
            train_schedule: The group sizes of a step count in training: cosine (LPD's), arccos, linear, power or
                sigmoid.
            predict_kwargs: Sampling settings (`LPDSampling`: steps, schedule, order, cfg and its schedule,
                temperature, top_k, top_p).
        """
        super().__init__(predict_kwargs=predict_kwargs, **kwargs)
        vocab_size, grid_size = self.resolve_tokens(vocab_size=vocab_size, grid_size=grid_size)
        sizes = {**PRESETS[preset], **{k: v for k, v in dict(dim=dim, depth=depth, n_heads=n_heads).items()
                                       if v is not None}}  # fmt: skip
        self.model = CausalTransformer(vocab_size, grid_size, self.hparams.num_classes, **sizes,
                                       token_dropout=token_dropout, resid_dropout=resid_dropout, target_aware=True,
                                       position_queries=True)  # fmt: skip
        L = self.model.num_tokens
        if train_steps is None:
            train_steps = [L >> i for i in range(L.bit_length()) if L >> i >= 4] or [L]
        if not train_steps or any(not 1 <= s <= L for s in train_steps):
            raise ValueError(f"model.init_args.train_steps={train_steps}: each step count must be between 1 and the "
                             f"{L} tokens of a {grid_size}x{grid_size} grid")  # fmt: skip
        if train_schedule not in MASK_SCHEDULES:
            raise ValueError(f"model.init_args.train_schedule={train_schedule!r} is not known; known schedules: "
                             f"{MASK_SCHEDULES}")  # fmt: skip
        self.method = LPD(train_steps, train_schedule)
        self.check_steps(LPDSampling.parse(self.hparams.predict_kwargs), "model.init_args.predict_kwargs")

    def core_blocks(self) -> list:
        return list(self.model.layers)

    def batch_tokens(self, batch: dict) -> torch.Tensor:
        return self.grid_tokens(batch)

    def sampling_kwargs(self) -> dict:
        return {"cache_dtype": self.cache_dtype()}
