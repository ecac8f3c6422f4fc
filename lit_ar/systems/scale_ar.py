"""ScaleARSystem: VAR's next-scale prediction over a frozen multi-scale residual VQ tokenizer: a `ScaleTransformer`
core, the categorical head (VAR's AdaLN head inside the core) and the group method's `NextScale`
(lit_ar/methods/groups.py), whose training and sampling read the tokenizer's quantizer.
"""

import torch
import torch.nn.functional as F

from lit_ar.methods.groups import NextScale, ScaleSampling
from lit_ar.models.categorical_head import CategoricalHead
from lit_ar.models.scale_ar import ScaleTransformer
from lit_ar.performance import compile_blocks_in_place
from lit_ar.systems.generator import GeneratorSystem, eval_mode


class ScaleARSystem(GeneratorSystem):
    Sampling = ScaleSampling

    def __init__(
        self,
        depth: int = 16,
        width: int | None = None,
        heads: int | None = None,
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
        **kwargs,
    ):
        """
        Args:
            depth: Transformer blocks. VAR's presets: width = 64 * depth and heads = depth, so depth 16/20/24/30
                give VAR-d16/d20/d24/d30 (310M parameters for d16 with 1000 classes and 4096 codes of width 32).
            width: Model width; None follows VAR's rule, 64 * depth.
            heads: Attention heads; None follows VAR's rule, depth.
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
        self.model = ScaleTransformer(
            self.hparams.num_classes, tok.vocab_size, tok.latent_channels, self.scales, depth, width, heads,
            mlp_ratio, cosine_attn=cosine_attn, shared_adaln=shared_adaln, rope=rope, dropout=dropout,
            attn_dropout=attn_dropout, drop_path=drop_path,
        )  # fmt: skip
        weights = torch.tensor(scale_loss_weights or [1.0] * len(self.scales), dtype=torch.float32)
        per_token = weights[self.model.levels]  # (L,)
        self.register_buffer("token_weights", per_token / per_token.sum(), persistent=False)  # sums to 1
        self.method = NextScale(label_smoothing)
        if self.hparams.compile:
            compile_blocks_in_place(self.model.blocks)

    @property
    def head(self) -> CategoricalHead:
        """The categorical head over the core's own output layer (it holds no weights of its own)."""
        return CategoricalHead(self.model, compile=self.hparams.compile)

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

    def shared_step(self, batch: dict, draws=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The teacher-forced pass -> the core's last-block states (B, L, C), the head's class embedding (B, C) and
        the targets (B, L)."""
        draws = draws or self.draws("train" if self.training else "val", 0)
        labels = self.training_labels(batch["label"], draws) if self.training else batch["label"]
        return self.method.teacher_forced(self.model, self.tokenizer.quantizer, self.batch_tokens(batch), labels)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        hidden, cond, target = self.shared_step(batch, self.draws("val", batch_idx))
        logits = self.model.logits(hidden, cond).float()  # (B, L, V)
        ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none",
                             label_smoothing=self.hparams.label_smoothing)  # fmt: skip
        loss = self.method.weighted_loss(ce, target, self.token_weights)
        correct = (logits.argmax(-1) == target).float()  # (B, L)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/token_acc", correct.mean(), sync_dist=True)
        for k, (begin, end) in enumerate(self.model.bounds):
            s = self.scales[k]
            self.log(f"val/token_acc_{s}x{s}", correct[:, begin:end].mean(), sync_dist=True)

    # -- sampling ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_tokens(self, labels: torch.Tensor, generator: torch.Generator | None = None,
                      **settings) -> tuple[list[torch.Tensor], list[torch.Tensor]]:  # fmt: skip
        """labels (B,) -> the sampled index maps [(B, s_k^2) long per scale] and the tokenizer's cumulative latent
        map f_hat (B, Cv, G, G) after each scale, with the settings of `ScaleSampling`."""
        labels, settings, guidance = self.sampling_call(labels, settings)
        autocast = torch.is_autocast_enabled(self.device.type)
        dtype = torch.get_autocast_dtype(self.device.type) if autocast else self.model.head.weight.dtype
        # the blocks' linear weights cast once for the call (exact; see linears_in_autocast_dtype)
        with eval_mode(self.model), self.linears_cast_for_sampling(self.model.blocks):
            return self.method.sample(self.model, self.head, labels, guidance, settings, generator,
                                      quantizer=self.tokenizer.quantizer, cache_dtype=dtype)  # fmt: skip

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
