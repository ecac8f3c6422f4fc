"""TokenizerSystem: VQGAN-style training of every lit_ar tokenizer (VQ, FSQ, LFQ, VAR's multi-scale VQ, KL-VAE).

Manual optimization of the autoencoder ("generator") and the PatchGAN discriminator with one AdamW holding two
parameter groups, so that `trainer.global_step` counts training steps (two Lightning optimizers would count
two per step). One backward per step: the generator's adversarial term sees the discriminator through detached
weights (functional_call), the discriminator's term sees detached reconstructions, so each gradient reaches only
its own network, exactly as alternating G/D steps on the same batch would.
"""

import math
from typing import Literal

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch.utilities import rank_zero_warn
from torch.func import functional_call

from lit_ar.metrics import perplexity, psnr, ssim
from lit_ar.models.autoencoder import PRESETS, Autoencoder, PatchDiscriminator
from lit_ar.models.lpips import LPIPS
from lit_ar.systems.lr_schedule import warmup_cosine

# load_tokenizer lives below the systems, where the token cache reaches it; BEFORE_PEER_LAYOUTS and load_tokenizer
# are imported from here by name too (tests, scripts written before the move)
from lit_ar.tokenizers import BEFORE_PEER_LAYOUTS, autoencoder_kwargs, load_tokenizer  # noqa: F401


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t)
    return t


def _all_gather(t: torch.Tensor) -> torch.Tensor:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


class TokenizerSystem(L.LightningModule):
    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 64,
        channels: int = 3,
        quantizer: Literal["vq", "fsq", "lfq", "msvq", "kl"] = "vq",
        preset: Literal["shapes", "digits", "llamagen_vq16", "var_msvq16", "mar_kl16"] = "shapes",
        base_channels: int | None = None,
        ch_mult: tuple[int, ...] | None = None,
        num_res_blocks: int | None = None,
        mid_attention: bool | None = None,
        downsample_padding: Literal["symmetric", "taming"] | None = None,
        quant_conv_kernel: int | None = None,
        double_z: bool | None = None,
        decoder_level_attention: bool | None = None,
        z_channels: int | None = None,
        codebook_size: int | None = None,
        latent_dim: int | None = None,
        levels: tuple[int, ...] | None = None,
        scales: tuple[int, ...] | None = None,
        beta: float = 0.25,
        l2_norm: bool = True,
        ema: bool = False,
        ema_decay: float = 0.99,
        dead_code_steps: int = 100,
        phi_count: int = 4,
        phi_ratio: float = 0.5,
        entropy_weight: float | None = None,
        entropy_gamma: float = 1.0,
        entropy_temperature: float = 0.01,
        kl_weight: float = 1e-6,
        latent_scale: float | None = None,
        rec_loss: Literal["l1", "l2"] = "l1",
        lpips_weight: float = 0.0,
        lpips_path: str | None = None,
        disc_weight: float = 0.5,
        disc_loss: Literal["hinge", "non_saturating"] = "hinge",
        disc_start: int = 0,
        disc_adaptive_weight: bool = True,
        disc_width: int = 64,
        disc_layers: int = 3,
        lecam_weight: float = 0.0,
        lecam_decay: float = 0.999,
        lr: float = 1e-4,
        disc_lr: float | None = None,
        betas: tuple[float, float] = (0.5, 0.9),
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        grad_clip: float | None = 1.0,
        usage_window: int = 100,
        usage_warn_threshold: float = 0.5,
    ):
        """
        Args:
            num_classes: Number of classes (linked from `data.num_classes`; unused by the tokenizer).
            image_size: Image side (linked from `data.image_size`); a multiple of the downsampling factor.
            channels: Image channels (linked from `data.channels`).
            quantizer: The bottleneck: `vq` (l2-normalised or EMA codebook), `fsq` (finite scalar levels), `lfq`
                (lookup-free binary), `msvq` (VAR's multi-scale residual VQ) or `kl` (continuous KL-VAE).
            preset: Architecture and codebook defaults: `shapes` (64x64, 4x), `digits` (32x32, 4x),
                `llamagen_vq16`, `var_msvq16`, `mar_kl16` (256x256, 16x; the official layouts). Every setting
                below that is null takes the preset's value.
            base_channels: Width of the first encoder level (null: preset).
            ch_mult: Width multiplier per level; the downsampling factor is 2**(len(ch_mult) - 1) (null: preset).
            num_res_blocks: ResBlocks per encoder level; the decoder has one more (null: preset).
            mid_attention: Self-attention at the lowest resolution (null: preset).
            downsample_padding: Padding of the encoder's stride-2 convs: `symmetric` (one pixel each side) or
                `taming` (right and bottom only: LlamaGen's, VAR's and MAR's tokenizers, and their presets) (null:
                preset).
            quant_conv_kernel: Kernel of the convs between the encoder output and the codes and back: 1, or 3 (VAR's
                tokenizer and the `var_msvq16` preset) (null: preset).
            double_z: The encoder outputs 2 * z_channels before the quant conv (LDM's KL-VAE layout: MAR's KL-16 and
                the `mar_kl16` preset) (null: preset).
            decoder_level_attention: With mid_attention, the decoder's lowest-resolution level attends too; false keeps
                the decoder's attention in its mid block only (MAR's KL-16 and the `mar_kl16` preset) (null: preset).
            z_channels: Channels of the encoder output and decoder input, before the quant convs (null: preset).
            codebook_size: Number of codes for vq, msvq and lfq (a power of two for lfq) (null: preset).
            latent_dim: Width of a code (vq, msvq) or of a continuous token (kl); fsq uses len(levels) and lfq
                log2(codebook_size) (null: preset).
            levels: FSQ levels per channel, integers >= 2; vocabulary = their product (null: preset).
            scales: msvq token-map sides, strictly increasing and ending at the latent grid (null: VAR's
                1,2,3,4,5,6,8,10,13,16 rescaled to the grid).
            beta: Commitment weight of vq, msvq and lfq.
            l2_norm: vq only: codes and encoder outputs on the unit sphere (cosine lookup).
            ema: vq and msvq: EMA codebook updates instead of the codebook loss.
            ema_decay: Decay of the EMA codebook.
            dead_code_steps: vq and msvq: restart a code unused for this many steps at a poorly represented encoder
                output of the current batch (0: never).
            phi_count: msvq: number of Phi refinement convs shared across scales (VAR: 4).
            phi_ratio: msvq: residual ratio of the Phi convs (VAR: 0.5).
            entropy_weight: lfq and fsq: weight of the entropy loss (per-token entropy minus entropy_gamma times the
                batch's codebook entropy, MAGVIT-v2). null: 0.1 for lfq, 0 (off, as in the FSQ paper) for fsq, where it
                raises codebook usage on narrow data (configs/tokenizer/fsq_shapes.yaml).
            entropy_gamma: lfq and fsq: weight of the batch (codebook) entropy inside the entropy loss.
            entropy_temperature: lfq and fsq: softmax temperature of the soft assignment to every code in the
                entropy loss (distances in code units: lfq codes are +-1, fsq codes one level apart).
            kl_weight: kl: weight of the KL term.
            latent_scale: kl: factor applied to latents given to generators; null sets it to 1/std of the validation
                latents after every validation epoch (kept in the checkpoint).
            rec_loss: Pixel reconstruction loss, `l1` or `l2`.
            lpips_weight: Weight of the LPIPS perceptual loss (0: off); needs `lpips_path`.
            lpips_path: Local folder with `vgg16-397923af.pth` (torchvision VGG16) and `vgg.pth` (LPIPS v0.1
                linear layers); nothing is downloaded.
            disc_weight: Weight of the adversarial loss (0: no discriminator).
            disc_loss: Discriminator loss, `hinge` or `non_saturating`.
            disc_start: Step from which the adversarial losses are on.
            disc_adaptive_weight: Scale the adversarial loss by ||grad rec|| / ||grad adv|| at the decoder's last
                layer (taming's adaptive weight).
            disc_width: Width of the PatchGAN's first layer.
            disc_layers: Stride-2 layers of the PatchGAN; images must be at least 2**disc_layers * 3 pixels.
            lecam_weight: Weight of the LeCam regularisation of the discriminator (0: off).
            lecam_decay: EMA decay of the LeCam anchors.
            lr: Peak AdamW learning rate of the autoencoder.
            disc_lr: Peak learning rate of the discriminator (null: `lr`).
            betas: AdamW betas of both networks.
            weight_decay: AdamW weight decay of the autoencoder (the discriminator has none).
            warmup_steps: Linear warm-up steps before cosine decay to the end of training.
            min_lr_ratio: Final learning rate as a fraction of the peak.
            grad_clip: Clip the gradient norm of each network to this value (null: no clipping).
            usage_window: Codebook usage is the fraction of codes used in the last this many training steps.
            usage_warn_threshold: Warn (and log a `codebook_collapse` flag) when the usage falls below this.
        """
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        scale = 2 ** (len(ch_mult if ch_mult is not None else PRESETS[preset]["ch_mult"]) - 1)
        if image_size % scale:
            raise ValueError(
                f"data.image_size={image_size} is not divisible by the tokenizer's downsampling factor {scale}; "
                f"use a multiple of {scale} or change model.init_args.ch_mult"
            )
        try:
            self.autoencoder = Autoencoder(**autoencoder_kwargs(self.hparams))
        except ValueError as err:
            raise ValueError(f"model.init_args.{err}") from None
        self.discriminator = None
        if disc_weight > 0:
            if PatchDiscriminator.output_size(image_size, disc_layers) < 1:
                raise ValueError(
                    f"model.init_args.disc_layers={disc_layers} is too deep for {image_size}x{image_size} images; "
                    f"use at most {max(1, int(math.log2(image_size / 3)))} or set disc_weight: 0"
                )
            self.discriminator = PatchDiscriminator(channels, disc_width, disc_layers)
        # LPIPS is held outside the module tree: it is neither checkpointed, nor trained, nor broadcast by DDP
        object.__setattr__(self, "lpips", None)
        if lpips_weight > 0:
            if lpips_path is None:
                raise ValueError(
                    f"model.init_args.lpips_weight={lpips_weight} needs model.init_args.lpips_path: a local folder "
                    "with vgg16-397923af.pth and vgg.pth (LPIPS v0.1); or set lpips_weight: 0"
                )
            object.__setattr__(self, "lpips", LPIPS(lpips_path, setting="model.init_args.lpips_path"))
        vocab = self.autoencoder.vocab_size or 1
        self.register_buffer("code_last_step", torch.full((vocab,), -(10**9), dtype=torch.long))
        self.register_buffer("lecam_anchors", torch.zeros(2))  # EMA of D(real), D(fake)
        self.register_buffer("val_counts", torch.zeros(vocab), persistent=False)
        self.register_buffer("val_moments", torch.zeros(3), persistent=False)  # kl: sum z, sum z^2, count
        self.val_psnr, self.val_ssim = torchmetrics.MeanMetric(), torchmetrics.MeanMetric()
        self._collapse_warned = False

    # ---- distributed hooks: the only place torch.distributed is called -------------------------------------
    def setup(self, stage: str) -> None:
        on = _distributed()
        for module in self.autoencoder.quantizer.modules():
            if hasattr(module, "all_reduce"):
                module.all_reduce = _all_reduce if on else None
            if hasattr(module, "all_gather"):
                module.all_gather = _all_gather if on else None

    def _mean_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        return _all_reduce(t.clone()) / dist.get_world_size() if _distributed() else t

    # ---- losses --------------------------------------------------------------------------------------------
    def adaptive_weight(self, nll: torch.Tensor, g_loss: torch.Tensor) -> torch.Tensor:
        last = self.autoencoder.last_layer
        g_nll = self._mean_over_ranks(torch.autograd.grad(nll, last, retain_graph=True)[0])
        g_adv = self._mean_over_ranks(torch.autograd.grad(g_loss, last, retain_graph=True)[0])
        return (g_nll.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, 1e4).detach()

    def generator_adv_loss(self, rec: torch.Tensor) -> torch.Tensor:
        frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        logits = functional_call(self.discriminator, frozen, (rec,))
        return -logits.mean() if self.hparams.disc_loss == "hinge" else F.softplus(-logits).mean()

    def discriminator_loss(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, dict]:
        lr, lf = self.discriminator(real), self.discriminator(fake.detach())
        if self.hparams.disc_loss == "hinge":
            loss = 0.5 * (F.relu(1 - lr).mean() + F.relu(1 + lf).mean())
        else:
            loss = 0.5 * (F.softplus(-lr).mean() + F.softplus(lf).mean())
        logs = {"train/logits_real": lr.mean().detach(), "train/logits_fake": lf.mean().detach()}
        if self.hparams.lecam_weight > 0:  # LeCam (Tseng et al. 2021): keep D's outputs near the other side's EMA
            means = self._mean_over_ranks(torch.stack([lr.mean(), lf.mean()]).detach())
            self.lecam_anchors.mul_(self.hparams.lecam_decay).add_(means, alpha=1 - self.hparams.lecam_decay)
            reg = F.relu(lr - self.lecam_anchors[1]).pow(2).mean() + F.relu(self.lecam_anchors[0] - lf).pow(2).mean()
            loss = loss + self.hparams.lecam_weight * reg
            logs["train/lecam"] = reg.detach()
        return loss, logs

    # ---- training ------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        h, x = self.hparams, batch["image"]
        opt, sched = self.optimizers(), self.lr_schedulers()
        rec, q = self.autoencoder(x)
        rec_loss = F.l1_loss(rec, x) if h.rec_loss == "l1" else F.mse_loss(rec, x)
        nll, logs = rec_loss, {"train/rec_loss": rec_loss.detach(), "train/quant_loss": q.loss.detach()}
        if self.lpips is not None:
            p_loss = self.lpips.to(x.device)(x, rec).mean()
            nll = nll + h.lpips_weight * p_loss
            logs["train/lpips"] = p_loss.detach()
        g_total = nll + q.loss
        d_total = torch.zeros((), device=x.device)
        if self.discriminator is not None:
            if self.global_step >= h.disc_start:
                g_loss = self.generator_adv_loss(rec)
                d_weight = self.adaptive_weight(nll, g_loss) if h.disc_adaptive_weight else x.new_ones(())
                g_total = g_total + h.disc_weight * d_weight * g_loss
                d_total, d_logs = self.discriminator_loss(x, rec)
                logs.update(d_logs, **{"train/g_loss": g_loss.detach(), "train/d_weight": d_weight})
            else:  # D waits; every parameter still joins the graph (DDP expects a gradient for each)
                d_total = 0.0 * sum(p.sum() for p in self.discriminator.parameters())
                logs["train/g_loss"] = torch.zeros((), device=x.device)
            logs["train/d_loss"] = d_total.detach()
        logs["train/loss"] = g_total.detach()
        opt.zero_grad(set_to_none=True)
        self.manual_backward(g_total + d_total)
        opt.step()
        sched.step()
        for k, v in q.extra.items():
            if v.ndim == 0:
                logs[f"train/{k}"] = v
        self.log_dict(logs, sync_dist=True)
        if q.counts is not None:
            self.log_codebook(q.counts)

    def log_codebook(self, counts: torch.Tensor) -> None:
        """Usage over the last `usage_window` steps and this batch's perplexity (counts are already global)."""
        h, step = self.hparams, self.global_step
        self.code_last_step[counts > 0] = step
        usage = (self.code_last_step > step - h.usage_window).float().mean()
        self.log_dict({"train/codebook_usage": usage, "train/perplexity": perplexity(counts)})
        if step + 1 >= h.usage_window:
            collapsed = bool(usage < h.usage_warn_threshold)
            self.log("train/codebook_collapse", float(collapsed))
            if collapsed and not self._collapse_warned:
                rank_zero_warn(
                    f"codebook collapse: only {usage:.1%} of the {counts.numel()} codes were used in the last "
                    f"{h.usage_window} steps (model.init_args.usage_warn_threshold={h.usage_warn_threshold}); "
                    "consider l2_norm, ema, a lower lr or dead_code_steps"
                )
            self._collapse_warned = collapsed

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # runs after AMP unscaling; each network is clipped on its own norm
        if self.hparams.grad_clip:
            for group, name in zip(optimizer.param_groups, ("autoencoder", "discriminator")):
                norm = torch.nn.utils.clip_grad_norm_(group["params"], self.hparams.grad_clip)
                self.log(f"train/grad_norm_{name}", norm)

    # ---- validation ----------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self.val_counts.zero_()
        self.val_moments.zero_()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        x = batch["image"]
        rec, q = self.autoencoder(x)  # eval mode: no codebook updates; kl decodes the posterior mean
        rec = rec.clamp(-1, 1)
        self.val_psnr.update(psnr(rec, x))
        self.val_ssim.update(ssim(rec, x))
        self.log("val/rec_loss", F.l1_loss(rec, x) if self.hparams.rec_loss == "l1" else F.mse_loss(rec, x),
                 sync_dist=True)  # fmt: skip
        if q.counts is not None:
            self.val_counts += q.counts
        if "mean" in q.extra:  # kl: moments of posterior samples z = mean + std * eps
            mean, std = q.extra["mean"], q.extra["std"]
            self.val_moments += torch.stack([mean.sum(), (mean**2 + std**2).sum(), mean.new_tensor(mean.numel())])

    def on_validation_epoch_end(self) -> None:
        h = self.hparams
        self.log_dict({"val/psnr": self.val_psnr.compute(), "val/ssim": self.val_ssim.compute()}, prog_bar=True)
        self.val_psnr.reset()
        self.val_ssim.reset()
        if self.autoencoder.vocab_size is not None and self.val_counts.sum() > 0:
            usage = (self.val_counts > 0).float().mean()
            self.log_dict({"val/codebook_usage": usage, "val/perplexity": perplexity(self.val_counts)})
            collapsed = bool(usage < h.usage_warn_threshold)
            self.log("val/codebook_collapse", float(collapsed))
            if collapsed and not self.trainer.sanity_checking:
                rank_zero_warn(
                    f"codebook collapse: the validation set used {usage:.1%} of the {self.val_counts.numel()} codes "
                    f"(model.init_args.usage_warn_threshold={h.usage_warn_threshold})"
                )
        if self.autoencoder.is_continuous and self.val_moments[2] > 0:
            moments = _all_reduce(self.val_moments.clone()) if _distributed() else self.val_moments
            var = moments[1] / moments[2] - (moments[0] / moments[2]) ** 2
            if h.latent_scale is None and not self.trainer.sanity_checking:
                self.autoencoder.quantizer.scale_factor.fill_(float(var.clamp_min(1e-12).rsqrt()))
            self.log("val/latent_std", var.sqrt())
            self.log("val/latent_scale", self.autoencoder.quantizer.scale_factor)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> reconstructions in [-1, 1] through encode/decode (the kl posterior mean); no state changes."""
        return self.autoencoder.decode(self.autoencoder.encode(images, sample=False))

    def configure_optimizers(self):
        h = self.hparams
        groups = [{"params": list(self.autoencoder.parameters()), "lr": h.lr, "weight_decay": h.weight_decay}]
        if self.discriminator is not None:
            disc = list(self.discriminator.parameters())
            groups.append({"params": disc, "lr": h.disc_lr or h.lr, "weight_decay": 0.0})
        opt = torch.optim.AdamW(groups, betas=tuple(h.betas))
        sched = warmup_cosine(opt, h.warmup_steps, int(self.trainer.estimated_stepping_batches), h.min_lr_ratio)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
