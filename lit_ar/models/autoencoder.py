"""The tokenizer core: a VQGAN-style convolutional autoencoder with a pluggable quantizer, and a PatchGAN critic.

One `Autoencoder` class; the variant is a config field (`quantizer`: vq | fsq | lfq | msvq | kl) and the
architecture comes from a named preset whose fields can each be overridden (litgpt style). Generators hold it
frozen and use only:
  encode(images (B, C, H, W) in [-1, 1]) -> tokens      decode(tokens) -> images (B, C, H, W) in [-1, 1]
  discrete: (B, L) long, L = grid_size**2, raster order; msvq: list of (B, s*s) long per scale;
  kl: (B, L, latent_channels) float, already multiplied by the latent scale factor
and the attributes vocab_size, grid_size, downsample, latent_channels, scales, is_continuous, image_size,
channels. Scale-wise generators also use `quantizer.teacher_forcing_inputs`, `quantizer.next_scale_input`
and `decode_from_fhat` (see MultiScaleVQ).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from lit_ar.models.quantizers import FSQ, LFQ, DiagonalGaussian, MultiScaleVQ, QuantOut, VectorQuantizer

QUANTIZERS = ("vq", "fsq", "lfq", "msvq", "kl")
# VAR's scales for a 16x16 grid; other grids get them rescaled (see default_scales)
VAR_SCALES_16 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)

# Architecture and codebook per preset. Downsampling factor = 2 ** (len(ch_mult) - 1). The peers' tokenizers pad their
# stride-2 convs as taming-transformers does (see HalvingConv): their presets do too, so that their weights load.
PRESETS: dict[str, dict] = {
    # 64x64 shapes at 4x: 16x16 tokens, trains on a CPU in minutes
    "shapes": dict(base_channels=16, ch_mult=(1, 2, 4), num_res_blocks=1, mid_attention=False, z_channels=64,
                   codebook_size=4096, latent_dim=8, levels=(7, 5, 5, 5, 5), downsample_padding="symmetric",
                   quant_conv_kernel=1, double_z=False, decoder_level_attention=True),
    # 32x32 digits at 4x: 8x8 tokens
    "digits": dict(base_channels=32, ch_mult=(1, 2, 2), num_res_blocks=1, mid_attention=False, z_channels=32,
                   codebook_size=256, latent_dim=8, levels=(8, 5, 5), downsample_padding="symmetric",
                   quant_conv_kernel=1, double_z=False, decoder_level_attention=True),
    # LlamaGen's VQ-16 (256x256 -> 16x16, 16384 l2-normalised 8-d codes, ~72M parameters)
    "llamagen_vq16": dict(base_channels=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, mid_attention=True,
                          z_channels=256, codebook_size=16384, latent_dim=8, levels=(8, 8, 8, 5, 5, 5),
                          downsample_padding="taming", quant_conv_kernel=1, double_z=False,
                          decoder_level_attention=True),
    # VAR's multi-scale VQVAE (256x256 -> scales up to 16x16, 4096 32-d codes)
    "var_msvq16": dict(base_channels=160, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, mid_attention=True,
                       z_channels=32, codebook_size=4096, latent_dim=32, levels=(8, 8, 8, 5, 5, 5),
                       downsample_padding="taming", quant_conv_kernel=3, double_z=False,
                       decoder_level_attention=True),
    # MAR's KL-16 (LDM's KL-VAE; 256x256 -> 16x16x16 continuous latents; its encoder outputs mean and log-variance)
    "mar_kl16": dict(base_channels=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, mid_attention=True,
                     z_channels=16, codebook_size=16384, latent_dim=16, levels=(8, 8, 8, 5, 5, 5),
                     downsample_padding="taming", quant_conv_kernel=1, double_z=True,
                     decoder_level_attention=False),
}  # fmt: skip


def default_scales(grid: int) -> tuple[int, ...]:
    """VAR's 10 scales for a 16x16 grid, rescaled to `grid` (duplicates dropped, starting at 1)."""
    scales = sorted({max(1, round(s * grid / 16)) for s in VAR_SCALES_16} | {1, grid})
    return tuple(scales)


def Norm(c: int) -> nn.GroupNorm:
    # GroupNorm (per sample) keeps DDP and single-process training identical; 32 groups when the width allows
    return nn.GroupNorm(math.gcd(32, c), c, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = Norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = Norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions of the lowest-resolution map."""

    def __init__(self, c: int):
        super().__init__()
        self.norm, self.qkv, self.proj = Norm(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(2, 3).unbind(1)  # (B, HW, C) each
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, HW, C)
        return x + self.proj(h.transpose(1, 2).reshape(B, C, H, W))


DOWNSAMPLE_PADDINGS = ("symmetric", "taming")


class HalvingConv(nn.Conv2d):
    """A 3x3 stride-2 conv that halves the map. `symmetric` pads one pixel on every side; `taming` pads none on the
    left and top and one on the right and bottom (taming-transformers' Downsample, kept by LlamaGen's, VAR's and
    MAR's tokenizers): the same parameters, a half-pixel shift apart."""

    def __init__(self, c: int, padding: str = "symmetric"):
        if padding not in DOWNSAMPLE_PADDINGS:
            raise ValueError(f"downsample_padding={padding!r} is not known; use one of {DOWNSAMPLE_PADDINGS}")
        super().__init__(c, c, 3, stride=2, padding=1 if padding == "symmetric" else 0)
        self.taming = padding == "taming"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (0, 1, 0, 1)) if self.taming else x)  # (B, c, H / 2, W / 2)


class Encoder(nn.Module):
    """conv_in; per level `num_res_blocks` ResBlocks then a stride-2 conv (not after the last level); mid
    ResBlock + ResBlock; norm, SiLU, conv_out to `c_out` channels. `attn` adds self-attention at the lowest
    resolution (after each ResBlock of the last level and in the mid block), as LlamaGen and VAR do."""

    def __init__(self, channels: int, base: int, ch_mult: tuple[int, ...], num_res_blocks: int, attn: bool, c_out: int,
                 downsample_padding: str = "symmetric"):  # fmt: skip
        super().__init__()
        self.conv_in = nn.Conv2d(channels, base, 3, padding=1)
        blocks, c = [], base
        for i, m in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(c, base * m))
                c = base * m
                if attn and i == len(ch_mult) - 1:
                    blocks.append(AttnBlock(c))
            if i < len(ch_mult) - 1:
                blocks.append(HalvingConv(c, downsample_padding))
        self.down = nn.Sequential(*blocks)
        self.mid = nn.Sequential(ResBlock(c, c), AttnBlock(c) if attn else nn.Identity(), ResBlock(c, c))
        self.out = nn.Sequential(Norm(c), nn.SiLU(), nn.Conv2d(c, c_out, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.mid(self.down(self.conv_in(x))))  # (B, c_out, H / f, W / f)


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    """The encoder mirrored, with one more ResBlock per level (as taming/LlamaGen); nearest x2 + conv upsampling.
    `level_attn` False keeps self-attention in the mid block only (MAR's KL-16 decoder)."""

    def __init__(self, channels: int, base: int, ch_mult: tuple[int, ...], num_res_blocks: int, attn: bool, c_in: int,
                 level_attn: bool = True):  # fmt: skip
        super().__init__()
        c = base * ch_mult[-1]
        self.conv_in = nn.Conv2d(c_in, c, 3, padding=1)
        self.mid = nn.Sequential(ResBlock(c, c), AttnBlock(c) if attn else nn.Identity(), ResBlock(c, c))
        blocks = []
        for i, m in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(c, base * m))
                c = base * m
                if attn and level_attn and i == len(ch_mult) - 1:
                    blocks.append(AttnBlock(c))
            if i > 0:
                blocks.append(Upsample(c))
        self.up = nn.Sequential(*blocks)
        self.norm_out, self.conv_out = Norm(c), nn.Conv2d(c, channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, channels, H, W)


class Autoencoder(nn.Module):
    def __init__(
        self,
        image_size: int = 64,
        channels: int = 3,
        quantizer: str = "vq",
        preset: str | None = "shapes",
        base_channels: int | None = None,
        ch_mult: tuple[int, ...] | None = None,
        num_res_blocks: int | None = None,
        mid_attention: bool | None = None,
        downsample_padding: str | None = None,
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
        dead_code_steps: int = 0,
        phi_count: int = 4,
        phi_ratio: float = 0.5,
        entropy_weight: float | None = None,
        entropy_gamma: float = 1.0,
        entropy_temperature: float = 0.01,
        kl_weight: float = 1e-6,
        latent_scale: float = 1.0,
    ):
        """Settings left None come from `preset` (see PRESETS); the system's docstring documents each one."""
        super().__init__()
        if quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer={quantizer!r} is not known; use one of {QUANTIZERS}")
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"preset={preset!r} is not known; use one of {tuple(PRESETS)} or null")
        given = dict(base_channels=base_channels, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                     mid_attention=mid_attention, downsample_padding=downsample_padding,
                     quant_conv_kernel=quant_conv_kernel, double_z=double_z,
                     decoder_level_attention=decoder_level_attention, z_channels=z_channels,
                     codebook_size=codebook_size, latent_dim=latent_dim, levels=levels)  # fmt: skip
        cfg = {**PRESETS[preset or "shapes"], **{k: v for k, v in given.items() if v is not None}}
        ch_mult, levels = tuple(cfg["ch_mult"]), tuple(cfg["levels"])
        self.downsample = 2 ** (len(ch_mult) - 1)
        if image_size % self.downsample:
            raise ValueError(
                f"image_size={image_size} is not divisible by the downsampling factor {self.downsample} = "
                f"2**(len(ch_mult) - 1) with ch_mult={ch_mult}; use a multiple of {self.downsample} (data.image_size)"
            )
        self.image_size, self.channels, self.quantizer_type = image_size, channels, quantizer
        self.grid_size = image_size // self.downsample
        size, dim = cfg["codebook_size"], cfg["latent_dim"]
        self.scales = None
        if quantizer == "vq":
            self.quantizer = VectorQuantizer(size, dim, beta, l2_norm, ema, ema_decay, dead_code_steps)
        elif quantizer == "fsq":
            self.quantizer = FSQ(levels, entropy_weight or 0.0, entropy_gamma, entropy_temperature)
        elif quantizer == "lfq":
            weight = 0.1 if entropy_weight is None else entropy_weight  # MAGVIT-v2's entropy penalty is part of LFQ
            self.quantizer = LFQ(size, beta, weight, entropy_gamma, entropy_temperature)
        elif quantizer == "msvq":
            self.scales = self.check_scales(scales if scales is not None else default_scales(self.grid_size))
            self.quantizer = MultiScaleVQ(
                size, dim, self.scales, beta, phi_count, phi_ratio, ema, ema_decay, dead_code_steps
            )
        else:
            self.quantizer = DiagonalGaussian(dim, kl_weight, latent_scale)
        self.is_continuous = quantizer == "kl"
        self.vocab_size: int | None = self.quantizer.vocab_size
        self.latent_channels: int = self.quantizer.dim
        self.config = {**cfg, "ch_mult": ch_mult, "levels": levels, "scales": self.scales, "quantizer": quantizer}

        zc = cfg["z_channels"]
        zc_enc = 2 * zc if cfg["double_z"] else zc  # LDM's KL encoders output 2 z_channels (MAR's KL-16)
        enc_out = 2 * self.latent_channels if self.is_continuous else self.latent_channels
        arch = (cfg["base_channels"], ch_mult, cfg["num_res_blocks"], cfg["mid_attention"])
        self.encoder = Encoder(channels, *arch, zc_enc, cfg["downsample_padding"])
        # to the code width (factorised codes, LlamaGen) and back; VAR's tokenizer uses 3x3 convs here
        k = cfg["quant_conv_kernel"]
        if k not in (1, 3):
            raise ValueError(f"quant_conv_kernel={k} is not supported; use 1 or 3")
        self.quant_conv = nn.Conv2d(zc_enc, enc_out, k, padding=k // 2)
        self.post_quant_conv = nn.Conv2d(self.latent_channels, zc, k, padding=k // 2)
        self.decoder = Decoder(channels, *arch, zc, cfg["decoder_level_attention"])

    def check_scales(self, scales: tuple[int, ...]) -> tuple[int, ...]:
        scales = tuple(scales)
        ok = len(scales) > 0 and all(isinstance(s, int) and s >= 1 for s in scales)
        if not ok or any(b <= a for a, b in zip(scales, scales[1:])):
            raise ValueError(f"scales={scales} must be positive integers in strictly increasing order")
        if scales[-1] != self.grid_size:
            raise ValueError(
                f"scales={scales} must end at the latent grid size {self.grid_size} (image_size={self.image_size} "
                f"/ downsampling {self.downsample}), e.g. {default_scales(self.grid_size)}"
            )
        return scales

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output conv weight: the GAN's adaptive weight balances gradient norms here."""
        return self.decoder.conv_out.weight

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, QuantOut]:
        """Training/eval pass: (B, C, H, W) -> reconstruction (B, C, H, W) (unclamped) and the quantizer output."""
        q = self.quantizer(self.quant_conv(self.encoder(images)))
        return self.decode_latent(q.z_q), q

    def decode_latent(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z_q.to(self.post_quant_conv.weight.dtype)))

    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: bool = True) -> torch.Tensor | list[torch.Tensor]:
        """Images in [-1, 1] -> tokens. `sample` (kl only): a posterior sample (what generators train on, MAR-style)
        or its mean. Never changes the codebook, whatever the module's train/eval mode."""
        z = self.quant_conv(self.encoder(images))  # (B, C', h, w)
        if self.is_continuous:
            return self.quantizer.encode(z, sample)  # (B, L, D)
        return self.quantizer.quantize(z)  # (B, L) or list of (B, s*s)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Tokens as `encode` returns them -> images (B, C, H, W) in [-1, 1]."""
        return self.decode_latent(self.quantizer.indices_to_latent(tokens)).clamp(-1.0, 1.0)

    @torch.no_grad()
    def decode_from_fhat(self, f_hat: torch.Tensor) -> torch.Tensor:
        """msvq: a (partial) f_hat (B, latent_channels, grid, grid) -> images in [-1, 1]."""
        return self.decode_latent(f_hat).clamp(-1.0, 1.0)


class PatchDiscriminator(nn.Module):
    """PatchGAN critic (pix2pix/taming): stride-2 4x4 convs, then two stride-1 convs to a map of logits. GroupNorm
    in place of BatchNorm, so that DDP and one process train the same critic."""

    def __init__(self, channels: int = 3, width: int = 64, num_layers: int = 3):
        super().__init__()
        layers, c = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2)], width
        for i in range(1, num_layers + 1):
            c_out = width * min(2**i, 8)
            stride = 2 if i < num_layers else 1
            layers += [nn.Conv2d(c, c_out, 4, stride, 1, bias=False), Norm(c_out), nn.LeakyReLU(0.2)]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():  # taming's init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    @staticmethod
    def output_size(image_size: int, num_layers: int) -> int:
        side = image_size
        for _ in range(num_layers):
            side = side // 2  # 4x4 stride-2 convs with padding 1
        return side - 2  # two 4x4 stride-1 convs with padding 1

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)  # (B, 1, h', w') logits
