"""ScaleARSystem: VAR's next-scale prediction over a frozen multi-scale VQ tokenizer.

Training: the tokenizer turns images into K index maps; its quantizer builds the teacher-forcing inputs of
scales 2..K from them; one block-causal forward gives every scale's logits; cross-entropy over all tokens
(optionally weighted per scale).
Sampling: scale by scale with KV caches: each step prefills a whole scale (s_k^2 tokens) at once, attending to
the cached keys of the coarser scales; the sampled indices go back through the tokenizer's quantizer
(`next_scale_input`, the very function that builds the training inputs) to make the next scale's input; the
final cumulative latent map is decoded to images.
"""

import torch
import torch.nn.functional as F

from lit_ar.models.layers import clear_kv_caches, setup_kv_caches
from lit_ar.models.scale_ar import ScaleTransformer
from lit_ar.sampling import (
    cfg_scale,
    check_cfg_schedule,
    check_sampling_args,
    filter_logits,
    guide,
    gumbel_noise,
    sample_logits,
)
from lit_ar.systems.generator import GeneratorSystem, compile_blocks_in_place


def smoothed_codes(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, progress: float,
                   generator: torch.Generator | None, codes: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """VAR's `more_smooth`: a Gumbel-softmax over the (filtered) logits (B, T, V), sharpened by 1 + progress and
    cooled from tau 0.27 to 0.0135 over the scales (MaskGIT's schedule, as VAR), mixing the codes (V, C) -> (B, T, C).
    With one logit left by the filters (top_k=1) the mixture is that one code: the same input as hard sampling."""
    tau = max(0.27 * (1 - progress * 0.95), 0.005)
    scores = filter_logits(logits.float() / temperature, top_k, top_p) * (1 + progress)  # (B, T, V)
    weights = ((scores + gumbel_noise(scores.shape, generator, scores.device)) / tau).softmax(dim=-1)  # (B, T, V)
    return weights @ codes  # (B, T, C)


class ScaleARSystem(GeneratorSystem):
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
        """
        super().__init__(**kwargs)
        tok, ckpt = self.tokenizer, self.hparams.tokenizer_ckpt
        if tok is None:
            raise ValueError(
                "model.init_args.tokenizer_ckpt is required: ScaleARSystem takes its vocabulary, codebook width and "
                "scales from a multi-scale VQ tokenizer checkpoint"
            )
        if tok.scales is None:
            kind = getattr(tok, "quantizer_type", type(tok.quantizer).__name__)
            raise ValueError(
                f"model.init_args.tokenizer_ckpt={ckpt} is a {kind!r} tokenizer without scales; ScaleARSystem "
                "needs a multi-scale VQ tokenizer (TokenizerSystem with quantizer 'msvq')"
            )
        if scales is not None and tuple(scales) != tuple(tok.scales):
            raise ValueError(
                f"model.init_args.scales={list(scales)} differ from the tokenizer's scales {list(tok.scales)} "
                f"({ckpt}); leave scales unset (null) to take the tokenizer's"
            )
        self.scales = tuple(tok.scales)
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
        if self.hparams.compile:
            compile_blocks_in_place(self.model.blocks)

    # -- training ----------------------------------------------------------------------------------------------
    def scale_tokens(self, batch: dict) -> list[torch.Tensor]:
        """A batch's index maps: a list of (B, s_k^2) long (a token cache may hold them concatenated, (B, L))."""
        tokens = self.tokens_from_batch(batch)
        if isinstance(tokens, torch.Tensor):
            tokens = list(tokens.split([s * s for s in self.scales], dim=1))
        return tokens

    def shared_step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The teacher-forced pass -> the core's last-block states (B, L, C), the head's class embedding (B, C) and
        the targets (B, L)."""
        indices = self.scale_tokens(batch)
        with torch.no_grad():
            x_BLCv = self.tokenizer.quantizer.teacher_forcing_inputs(indices)  # (B, L - s_1^2, Cv), fp32
        labels = self.drop_labels(batch["label"])
        hidden, cond = self.model.hidden(labels, x_BLCv)  # (B, L, C), (B, C)
        return hidden, cond, torch.cat(indices, dim=1)  # targets (B, L)

    def weighted_loss(self, ce: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy (B * L,) -> each sample's weighted sum over its tokens, averaged."""
        return (ce.view_as(target) * self.token_weights).sum(1).mean()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hidden, cond, target = self.shared_step(batch)
        ce = self.token_loss(hidden, target, cond, reduction="none", label_smoothing=self.hparams.label_smoothing)
        loss = self.weighted_loss(ce, target)
        # sync_dist: the logged loss is the global-batch loss, the same figure on 1 or N devices
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        hidden, cond, target = self.shared_step(batch)
        logits = self.model.logits(hidden, cond).float()  # (B, L, V)
        ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none",
                             label_smoothing=self.hparams.label_smoothing)  # fmt: skip
        loss = self.weighted_loss(ce, target)
        correct = (logits.argmax(-1) == target).float()  # (B, L)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/token_acc", correct.mean(), sync_dist=True)
        for k, (begin, end) in enumerate(self.model.bounds):
            s = self.scales[k]
            self.log(f"val/token_acc_{s}x{s}", correct[:, begin:end].mean(), sync_dist=True)

    # -- sampling ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_tokens(
        self,
        labels: torch.Tensor,
        cfg: float = 1.0,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        cfg_schedule: str = "linear",
        cfg_interval: tuple[float, float] = (0.0, 1.0),
        cfg_power: float = 1.0,
        more_smooth: bool = False,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """labels (B,) -> the sampled index maps [(B, s_k^2) long per scale] and the tokenizer's cumulative latent
        map f_hat (B, Cv, G, G) after each scale. See `sample` for the arguments."""
        check_sampling_args(temperature, top_k, top_p, cfg)
        check_cfg_schedule(cfg_schedule, cfg_interval)
        labels, rows = self.sampling_labels(labels, cfg)  # (B,), (B,) or (2B,) [labels; null] under CFG
        model, quantizer = self.model, self.tokenizer.quantizer
        B, K, guided = len(labels), len(self.scales), cfg != 1.0
        device_type = self.device.type
        dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                 else model.head.weight.dtype)  # fmt: skip
        # the blocks' linear weights cast once for the call (exact; see linears_in_autocast_dtype)
        with self.linears_cast_for_sampling(model.blocks):
            setup_kv_caches(model.blocks, len(rows), model.seq_len, dtype, self.device)
            try:
                cond, block_cond = model.condition(rows)  # (2B, C), (2B, C | 6C)
                mods = model.modulations(block_cond)  # per block (2B, 6C), fixed over the scales
                x = model.start_tokens(cond)  # (2B, s_1^2, C)
                f_hat, indices, f_hats = None, [], []
                for k in range(K):
                    logits = model.forward_scale(k, x, cond, mods)  # (2B, s_k^2, V)
                    if guided:
                        scale = cfg_scale(cfg_schedule, cfg, k / max(1, K - 1), cfg_interval, cfg_power)
                        logits = guide(logits[:B].float(), logits[B:].float(), scale)  # (B, s_k^2, V)
                    idx = sample_logits(logits, temperature, top_k, top_p, generator)  # (B, s_k^2)
                    # the same quantizer function that built the teacher-forcing inputs builds the next input
                    if more_smooth:  # (B, s_k^2, Cv): a Gumbel-softmax mixture of the codes in place of idx's codes
                        vectors = smoothed_codes(logits, temperature, top_k, top_p, k / max(1, K - 1), generator,
                                                 quantizer.codebook.codes())  # fmt: skip
                        f_hat, nxt = quantizer.next_scale_input_from_vectors(k, f_hat, vectors)
                    else:
                        f_hat, nxt = quantizer.next_scale_input(k, f_hat, idx)  # (B, Cv, G, G), (B, s_{k+1}^2, Cv)
                    indices.append(idx)
                    f_hats.append(f_hat)
                    if nxt is not None:
                        x = model.embed_scale(k + 1, nxt)  # (B, s_{k+1}^2, C)
                        x = torch.cat([x, x]) if guided else x
            finally:
                clear_kv_caches(model.blocks)
        return indices, f_hats

    @torch.no_grad()
    def sample(
        self,
        labels: torch.Tensor,
        cfg: float = 1.0,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        cfg_schedule: str = "linear",
        cfg_interval: tuple[float, float] = (0.0, 1.0),
        cfg_power: float = 1.0,
        return_scales: bool = False,
        more_smooth: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Class-conditional samples, scale by scale.

        Args:
            labels: (B,) class indices in [0, num_classes).
            cfg: Guidance scale (1 = none). lit_ar's convention: guided logits = uncond + scale * (cond - uncond);
                VAR's `cfg=c` (logits (1 + t) cond - t uncond, t ramped 0 -> c) is cfg = 1 + c with the linear
                schedule.
            temperature, top_k, top_p: Logit filters applied to every scale.
            generator: Seeds the sampling noise (same generator state -> same images).
            cfg_schedule: Guidance over the scales, by progress k / (K - 1): 'linear' ramps 1 -> cfg (VAR),
                'constant' keeps cfg; 'interval' and 'power_cosine' as in lit_ar.sampling.cfg_scale.
            cfg_interval, cfg_power: Settings of the 'interval' and 'power_cosine' schedules.
            return_scales: Also return the images decoded from the cumulative latent after each scale (the
                coarse-to-fine sequence), a list of K (B, C, H, W) tensors.
            more_smooth: VAR's option for smoother pictures (VAR's README: for visual quality, not for FID): each
                scale adds a Gumbel-softmax mixture of the codes, sharper at finer scales, instead of the sampled
                codes. The sampled indices are returned as usual.
        Returns:
            images (B, C, H, W) in [-1, 1], or (images, per-scale images) with return_scales.
        """
        _, f_hats = self.sample_tokens(labels, cfg, temperature, top_k, top_p, generator, cfg_schedule,
                                       cfg_interval, cfg_power, more_smooth)  # fmt: skip
        images = self.decode_fhat(f_hats[-1])
        if return_scales:
            return images, [self.decode_fhat(f) for f in f_hats]
        return images

    @torch.no_grad()
    def decode_fhat(self, f_hat: torch.Tensor) -> torch.Tensor:
        self.tokenizer.eval()
        return self.tokenizer.decode_from_fhat(f_hat).clamp(-1, 1)
