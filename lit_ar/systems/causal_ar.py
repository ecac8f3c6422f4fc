"""CausalARSystem: LlamaGen / RAR / any-order causal AR (RandAR, DAR, PAR orders) over a frozen discrete tokenizer: a
`CausalTransformer` core, the categorical head and the any-order method (lit_ar/methods/any_order.py; in raster
order lit_ar/methods/raster.py), which holds the training draw (the order, RAR's annealed random orders),
validation and the KV-cached sampling loops (speculative Jacobi decoding among them).
"""

from typing import Literal

import torch

from lit_ar.draws import Draws
from lit_ar.methods.any_order import ORDERS, AnyOrderAR, AnyOrderSampling, grid_order
from lit_ar.methods.drafter import drafter_loss
from lit_ar.methods.par import PAR
from lit_ar.methods.raster import random_order_ratio
from lit_ar.methods.speculative_jacobi import LatentNeighbours
from lit_ar.models.causal_ar import PRESETS, CausalTransformer
from lit_ar.models.drafter import Drafter
from lit_ar.performance import compiled_decode_step
from lit_ar.systems.generator import GeneratorSystem, eval_mode, sizes_under_former_names
from lit_ar.tokenizers import code_vectors

PresetName = Literal[
    "GPT-B", "GPT-L", "GPT-XL", "GPT-XXL", "GPT-XXXL", "GPT-3B", "GPT-nano", "GPT-micro", "GPT-mini"
]  # fmt: skip


OrderName = Literal[ORDERS]


class CausalARSystem(GeneratorSystem):
    Sampling = AnyOrderSampling

    def __init__(
        self,
        preset: PresetName = "GPT-nano",
        vocab_size: int | None = None,
        grid_size: int | None = None,
        dim: int | None = None,
        depth: int | None = None,
        n_heads: int | None = None,
        n_kv_heads: int | None = None,
        cls_token_num: int = 1,
        token_dropout: float = 0.1,
        resid_dropout: float = 0.1,
        drop_path: float = 0.0,
        qk_norm: bool = False,
        prefix_rope: Literal["identity", "zero"] = "identity",
        rar: bool = False,
        rar_anneal_start: int = 0,
        rar_anneal_end: int = 0,
        order: OrderName = "raster",
        order_regions: int = 2,
        parallel: bool = False,
        next_rope: bool = False,
        direction_embeddings: bool = False,
        drafter: bool = False,
        drafter_depth: int = 1,
        drafter_only: bool = False,
        predict_kwargs: AnyOrderSampling | None = None,
        n_layer: int | None = None,
        n_head: int | None = None,
        n_kv_head: int | None = None,
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
            depth: Overrides the preset's number of blocks.
            n_heads: Overrides the preset's number of attention heads.
            n_kv_heads: Grouped-query attention: number of key/value heads (null: as many as n_heads).
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
            order: Training order (and the default sampling order): raster (LlamaGen), random (RandAR: a fresh
                permutation per sample), diagonal or zigzag (DAR), par (PAR's region-interleaved order) or spiral.
                Any order but raster adds target-position queries (the target-aware embedding).
            order_regions: PAR: the grid is cut into order_regions x order_regions blocks.
            parallel: PAR (with order par): after the first token of every block, generate one token in every block
                per model call, with PAR's transition tokens and group-wise full attention (training and sampling).
            next_rope: DAR's 4D RoPE: half of each attention head rotates with the fed token's (row, column), half
                with the position it predicts (head width dim/n_heads divisible by 8).
            direction_embeddings: DAR's direction embeddings: each slot is told the direction of its step, from the
                fed token's position to the one it predicts.
            drafter: LANTERN's drafter (EAGLE's design, lit_ar/models/drafter.py): a small network trained beside the
                model on its frozen states, which drafts for `predict_kwargs.decoding: speculative`. Its loss never
                reaches the model's weights.
            drafter_depth: The drafter's transformer blocks (LANTERN's and EAGLE's: 1).
            drafter_only: Train the drafter only, the model frozen (LANTERN's recipe: with `init_weights` a trained
                run or released weights).
            predict_kwargs: Sampling settings (see GeneratorSystem).
            n_layer: Former name of `depth` (configs and checkpoints written before lit_ar's one size vocabulary).
            n_head: Former name of `n_heads`.
            n_kv_head: Former name of `n_kv_heads`.
        """
        super().__init__(predict_kwargs=predict_kwargs, **kwargs)
        if not 0 <= rar_anneal_start <= rar_anneal_end:
            raise ValueError(
                f"model.init_args.rar_anneal_start={rar_anneal_start} and rar_anneal_end={rar_anneal_end} must "
                "satisfy 0 <= start <= end"
            )
        vocab_size, grid_size = self.resolve_tokens(vocab_size=vocab_size, grid_size=grid_size)
        sizes = sizes_under_former_names(dict(dim=dim, depth=depth, n_heads=n_heads, n_kv_heads=n_kv_heads),
                                         dict(n_layer=("depth", n_layer), n_head=("n_heads", n_head),
                                              n_kv_head=("n_kv_heads", n_kv_head)))  # fmt: skip
        sizes = {**PRESETS[preset], **{k: v for k, v in sizes.items() if v is not None}}
        self.model = CausalTransformer(
            vocab_size, grid_size, self.hparams.num_classes, **sizes, cls_token_num=cls_token_num,
            prefix_rope=prefix_rope, qk_norm=qk_norm, token_dropout=token_dropout, resid_dropout=resid_dropout,
            drop_path=drop_path, target_aware=rar or order != "raster",
            transition_tokens=order_regions**2 - 1 if parallel else 0, next_rope=next_rope,
            direction_embeddings=direction_embeddings,
        )  # fmt: skip
        if rar and order != "raster":
            raise ValueError(f"model.init_args.rar=true anneals random orders to raster; "
                             f"model.init_args.order={order!r} trains in its own order: set one of them")  # fmt: skip
        if order not in ("raster", "random"):
            grid_order(order, grid_size, order_regions)  # refuses a bad order or order_regions now, by name
        if parallel and (next_rope or direction_embeddings):
            raise ValueError("model.init_args.parallel=true (PAR) takes neither next_rope nor direction_embeddings")
        if parallel and order != "par":
            raise ValueError(f"model.init_args.parallel=true is PAR's parallel decoding of its own order; set "
                             f"model.init_args.order=par (not {order!r})")  # fmt: skip
        rar_ratio = self.rar_ratio if rar else None
        self.method = PAR(order_regions) if parallel else AnyOrderAR(order, order_regions, rar_ratio)
        if drafter_only and not drafter:
            raise ValueError("model.init_args.drafter_only=true trains the drafter alone: set "
                             "model.init_args.drafter=true")  # fmt: skip
        if drafter and order != "raster":
            raise ValueError(f"model.init_args.drafter=true drafts in raster order (speculative decoding); "
                             f"model.init_args.order={order!r} is not raster")  # fmt: skip
        if drafter_depth < 1:
            raise ValueError(f"model.init_args.drafter_depth={drafter_depth} must be >= 1")
        self.drafter = Drafter(self.model.dim, sizes["n_heads"], drafter_depth) if drafter else None
        if drafter_only:
            self.model.requires_grad_(False)
        self._compiled_decode = None
        self._neighbours: LatentNeighbours | None = None

    def core_blocks(self) -> list:
        return list(self.model.layers)  # LlamaGen's name, which its released weights' keys carry

    # -- the drafter's loss beside the model's (or alone, drafter_only) ------------------------------------------
    def loss_terms(self, batch: dict, draws: Draws, class_dropout: bool = True) -> dict[str, torch.Tensor]:
        if self.drafter is None:
            return super().loss_terms(batch, draws, class_dropout)
        tokens = self.batch_tokens(batch)
        batch = {**batch, "tokens": tokens}  # encoded once: the model's loss reads them from the batch
        terms = {} if self.hparams.drafter_only else super().loss_terms(batch, draws, class_dropout)
        # the drafter's own class dropout, drawn after everything the model's loss draws (its draws stay the same)
        labels = self.training_labels(batch["label"], draws) if class_dropout else batch["label"]
        with eval_mode(self.model):  # the states sampling will give the drafter: no dropout
            drafted = drafter_loss(self.model, self.drafter, tokens, labels)
        loss = drafted["drafter_loss"] if self.hparams.drafter_only else terms["loss"] + drafted["drafter_loss"]
        return {**terms, **drafted, "loss": loss}

    def fresh_weights(self) -> tuple[str, ...]:
        return ("drafter.",)  # a drafter added to a run trained without one (LANTERN's recipe) starts fresh

    def validation_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        if self.drafter is None:
            return super().validation_step(batch, batch_idx)
        batch = {**batch, "tokens": self.batch_tokens(batch)}  # encoded once for both losses
        terms = super().validation_step(batch, batch_idx)
        with eval_mode(self.model):
            drafted = drafter_loss(self.model, self.drafter, batch["tokens"], batch["label"])
        for name, value in drafted.items():
            self.log(f"val/{name}", value, sync_dist=True)
        return {**terms, **drafted}

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self.hparams, "drafter_only", False):
            self.model.eval()  # frozen, as the tokenizer: the drafter learns the states sampling gives
        return self

    def rar_ratio(self, step: int) -> float:
        """Probability that a sample is trained in a random order at `step` (0 when not RAR)."""
        h = self.hparams
        return random_order_ratio(step, h.rar_anneal_start, h.rar_anneal_end) if h.rar else 0.0

    def batch_tokens(self, batch: dict) -> torch.Tensor:
        return self.grid_tokens(batch)

    # -- sampling: the method's loop, on the core's one-token step (compiled, with `compile`) -------------------
    def sampling_modules(self) -> list:
        # not where the decode step is a CUDA graph: the graph holds the weights' addresses, which the cast's fresh
        # copies would move
        return [] if self.hparams.compile and self.device.type == "cuda" else self.core_blocks()

    def sampling_kwargs(self) -> dict:
        if self.hparams.compile and self._compiled_decode is None:
            self._compiled_decode = compiled_decode_step(self.model.decode_hidden, self.device.type == "cuda")
        return {"decode_step": self._compiled_decode or self.model.decode_hidden, "cache_dtype": self.cache_dtype(),
                "neighbours": self.latent_neighbours(), "drafter": self.drafter}  # fmt: skip

    def latent_neighbours(self) -> LatentNeighbours | None:
        """The tokenizer's code neighbours (LANTERN's acceptance), built once; None without a tokenizer."""
        if self._neighbours is None and self.tokenizer is not None:
            tokenizer = self.tokenizer
            self._neighbours = LatentNeighbours(lambda: code_vectors(tokenizer))  # read only where LANTERN is asked
        return self._neighbours

    def generate(self, labels: torch.Tensor, generator: torch.Generator | None = None, num_tokens: int | None = None,
                 **settings) -> torch.Tensor:  # fmt: skip
        """labels (B,) -> tokens (B, num_tokens) in raster order (num_tokens defaults to the whole grid), with the
        settings of `AnyOrderSampling` (cfg and its schedule, temperature, top_k, top_p, use_cache, decoding, window,
        order)."""
        return self.run_sampler(labels, generator, settings, num_tokens=num_tokens)
