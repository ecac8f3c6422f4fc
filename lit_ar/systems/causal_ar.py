"""CausalARSystem: LlamaGen / RAR over a frozen discrete tokenizer: a `CausalTransformer` core, the categorical head
and the raster method (lit_ar/methods/raster.py), which holds the training draw (RAR's random orders) and the
KV-cached sampling loop.
"""

from typing import Literal

import torch
import torch.nn.functional as F

from lit_ar.methods.raster import RasterAR, RasterSampling, random_order_ratio
from lit_ar.models.categorical_head import CategoricalHead
from lit_ar.models.causal_ar import PRESETS, CausalTransformer
from lit_ar.performance import compile_blocks_in_place
from lit_ar.systems.generator import GeneratorSystem, eval_mode

PresetName = Literal[
    "GPT-B", "GPT-L", "GPT-XL", "GPT-XXL", "GPT-XXXL", "GPT-3B", "GPT-nano", "GPT-micro", "GPT-mini"
]  # fmt: skip


class CausalARSystem(GeneratorSystem):
    Sampling = RasterSampling

    def __init__(
        self,
        preset: PresetName = "GPT-nano",
        vocab_size: int | None = None,
        grid_size: int | None = None,
        dim: int | None = None,
        n_layer: int | None = None,
        n_head: int | None = None,
        n_kv_head: int | None = None,
        cls_token_num: int = 1,
        token_dropout: float = 0.1,
        resid_dropout: float = 0.1,
        drop_path: float = 0.0,
        qk_norm: bool = False,
        prefix_rope: Literal["identity", "zero"] = "identity",
        rar: bool = False,
        rar_anneal_start: int = 0,
        rar_anneal_end: int = 0,
        predict_kwargs: RasterSampling | None = None,
        **kwargs,
    ):
        """
        Args:
            preset: Transformer size: LlamaGen's GPT-B (111M with 1000 classes and vocab 16384), GPT-L, GPT-XL,
                GPT-XXL, GPT-XXXL, GPT-3B, or a CPU size GPT-nano (dim 64, 2 layers), GPT-micro (128, 4), GPT-mini
                (256, 6).
            vocab_size: Token vocabulary; taken from the tokenizer (must agree when both are set). Needed without
                a tokenizer (training from a token cache).
            grid_size: Side of the token grid (L = grid_size**2 tokens); taken from the tokenizer like vocab_size.
            dim: Overrides the preset's width.
            n_layer: Overrides the preset's depth.
            n_head: Overrides the preset's number of attention heads.
            n_kv_head: Grouped-query attention: number of key/value heads (null: as many as n_head).
            cls_token_num: Class-prefix tokens per label (LlamaGen's class-conditional models use 1).
            token_dropout: Dropout on the input embeddings (LlamaGen: 0.1).
            resid_dropout: Dropout on each attention and MLP output (LlamaGen: 0.1).
            drop_path: Largest stochastic-depth rate (grows linearly over the layers).
            qk_norm: RMS-normalise queries and keys per head.
            prefix_rope: Rotation of the class prefix: `identity` (the class token attends like any token) or
                `zero` (LlamaGen's table, which zeroes the prefix's queries and keys; use it to load LlamaGen weights).
            rar: RAR: train in random orders with target-aware position embeddings (sampling stays raster).
            rar_anneal_start: RAR: training step until which every sample gets a random order (r = 1).
            rar_anneal_end: RAR: step from which every sample is raster (r = 0); r falls linearly in between.
            predict_kwargs: Sampling settings (see GeneratorSystem).
        """
        super().__init__(predict_kwargs=predict_kwargs, **kwargs)
        if not 0 <= rar_anneal_start <= rar_anneal_end:
            raise ValueError(
                f"model.init_args.rar_anneal_start={rar_anneal_start} and rar_anneal_end={rar_anneal_end} must "
                "satisfy 0 <= start <= end"
            )
        vocab_size, grid_size = self.resolve_tokens(vocab_size=vocab_size, grid_size=grid_size)
        sizes = dict(PRESETS[preset])
        sizes.update({k: v for k, v in dict(dim=dim, n_layer=n_layer, n_head=n_head).items() if v is not None})
        self.model = CausalTransformer(
            vocab_size, grid_size, self.hparams.num_classes, **sizes, n_kv_head=n_kv_head, cls_token_num=cls_token_num,
            prefix_rope=prefix_rope, qk_norm=qk_norm, token_dropout=token_dropout, resid_dropout=resid_dropout,
            drop_path=drop_path, target_aware=rar,
        )  # fmt: skip
        self.method = RasterAR(self.rar_ratio if rar else None)
        if self.hparams.compile:
            compile_blocks_in_place(self.model.layers)
        self._compiled_decode = None

    @property
    def head(self) -> CategoricalHead:
        """The categorical head over the core's own output layer (it holds no weights of its own)."""
        return CategoricalHead(self.model, compile=self.hparams.compile)

    # -- training ----------------------------------------------------------------------------------------------
    def rar_ratio(self, step: int) -> float:
        """Probability that a sample is trained in a random order at `step` (0 when not RAR)."""
        h = self.hparams
        return random_order_ratio(step, h.rar_anneal_start, h.rar_anneal_end) if h.rar else 0.0

    def batch_tokens(self, batch: dict) -> torch.Tensor:
        tokens = self.tokens_from_batch(batch)  # (B, L)
        if tokens.ndim != 2 or tokens.shape[1] != self.model.num_tokens:
            raise ValueError(
                f"tokens of shape {tuple(tokens.shape)} do not fit the generator's {self.model.grid_size}x"
                f"{self.model.grid_size} grid ({self.model.num_tokens} tokens per image)"
            )
        return tokens

    def train_logits(self, batch: dict, batch_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The training forward: logits (B, L, V) and targets (B, L) of the step's draw."""
        tokens, draws = self.batch_tokens(batch), self.draws("train", batch_idx)
        labels = self.training_labels(batch["label"], draws)
        fed, order, targets = self.method.train_inputs(tokens, draws)
        return self.model(fed, labels, order), targets

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.hparams.rar:
            self.log("train/rar_ratio", self.rar_ratio(self.global_step))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        tokens, labels = self.batch_tokens(batch), batch["label"]
        logits = self.model(tokens[:, :-1], labels)  # raster, true labels: what sampling sees
        self.log("val/loss", F.cross_entropy(logits.flatten(0, 1), tokens.flatten()), sync_dist=True)
        self.log("val/token_acc", (logits.argmax(-1) == tokens).float().mean(), sync_dist=True)

    # -- sampling ----------------------------------------------------------------------------------------------
    def _decode_step_is_cuda_graph(self) -> bool:
        # on CUDA the one-token step is bound by kernel launches: compiled, it replays as a CUDA graph (the static,
        # in-place KV cache keeps every address fixed), as LlamaGen's and gpt-fast's loops do
        return self.hparams.compile and self.device.type == "cuda"

    def _decode_step(self):
        if not self.hparams.compile:
            return self.model.decode_step
        if self._compiled_decode is None:
            mode = "reduce-overhead" if self._decode_step_is_cuda_graph() else "default"
            self._compiled_decode = torch.compile(self.model.decode_step, fullgraph=True, mode=mode)
        return self._compiled_decode

    @torch.no_grad()
    def generate(self, labels: torch.Tensor, generator: torch.Generator | None = None, num_tokens: int | None = None,
                 **settings) -> torch.Tensor:  # fmt: skip
        """labels (B,) -> tokens (B, num_tokens) in raster order (num_tokens defaults to the whole grid), with the
        settings of `RasterSampling` (cfg and its schedule, temperature, top_k, top_p, use_cache)."""
        labels, settings, guidance = self.sampling_call(labels, settings)
        autocast = torch.is_autocast_enabled(self.device.type)
        dtype = torch.get_autocast_dtype(self.device.type) if autocast else self.model.output.weight.dtype
        # the layers' linear weights cast once for the call (exact; see linears_in_autocast_dtype), except where the
        # decode step is a CUDA graph: the graph holds the weights' addresses, and fresh copies would move them
        cast = [] if self._decode_step_is_cuda_graph() else self.model.layers
        with eval_mode(self.model), self.linears_cast_for_sampling(cast):
            return self.method.sample(self.model, self.head, labels, guidance, settings, generator,
                                      num_tokens=num_tokens, decode_step=self._decode_step(),
                                      cache_dtype=dtype)  # fmt: skip

    def sample_tokens(self, labels: torch.Tensor, generator: torch.Generator | None = None, **settings):
        return self.generate(labels, generator, **settings)
