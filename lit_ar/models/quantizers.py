"""Quantizers: the bottleneck between a tokenizer's encoder and decoder.

VectorQuantizer (VQ), FSQ, LFQ, MultiScaleVQ (VAR) and DiagonalGaussian (KL-VAE). Each takes the encoder's
latent map `z` (B, C, h, w) and returns a `QuantOut`; each computes in fp32 with autocast disabled, so bf16-mixed
training quantizes exactly as fp32 training does. Code lookups (`quantize`, `indices_to_latent`) never update
state, so a frozen tokenizer stays frozen even when a trainer switches it to train mode.

Under DDP the training system may set `all_reduce` (sum over ranks, returns the tensor) and `all_gather`
(concatenate dim 0 over ranks) on a quantizer: its code counts, EMA statistics and dead-code restarts then use
the global batch and stay identical on every rank. The quantizers never call torch.distributed themselves.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Hook = Callable[[torch.Tensor], torch.Tensor] | None


@dataclass
class QuantOut:
    z_q: torch.Tensor  # (B, C, h, w) the quantized latent, straight-through to the encoder
    loss: torch.Tensor  # scalar, already weighted (commitment, codebook, entropy or KL)
    indices: torch.Tensor | list[torch.Tensor] | None  # (B, h*w) long; multi-scale: list of (B, s*s); KL: None
    counts: torch.Tensor | None = None  # (vocab,) code counts of the batch (global when `all_reduce` is set)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # terms for logging


def fp32(z: torch.Tensor):
    """Context for an fp32 island: autocast off on z's device."""
    return torch.autocast(z.device.type, enabled=False)


def to_tokens(z: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w, C) in raster order."""
    return z.flatten(2).transpose(1, 2)


def to_map(x: torch.Tensor, side: int) -> torch.Tensor:
    """(B, side*side, C) -> (B, C, side, side)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)


class Codebook(nn.Module):
    """`size` codes of width `dim`: nearest-code lookup, usage counts, EMA or gradient updates, dead-code restart.

    l2_norm: codes and inputs live on the unit sphere (cosine lookup, LlamaGen/ViT-VQGAN), which keeps usage high.
    ema: the codes follow an exponential moving average of the inputs assigned to them (no codebook loss).
    dead_code_steps: a code unused for this many training steps is restarted at one of the batch's encoder
    outputs that the codebook represents worst (0 disables restarts).
    """

    def __init__(self, size: int, dim: int, l2_norm: bool, ema: bool, decay: float = 0.99, dead_code_steps: int = 0):
        super().__init__()
        self.size, self.dim, self.l2_norm, self.ema, self.decay = size, dim, l2_norm, ema, decay
        self.dead_code_steps = dead_code_steps
        init = torch.randn(size, dim) if (ema or l2_norm) else torch.empty(size, dim).uniform_(-1 / size, 1 / size)
        if ema:
            self.register_buffer("weight", init)
            self.register_buffer("ema_count", torch.ones(size))
            self.register_buffer("ema_sum", init.clone())
        else:
            self.weight = nn.Parameter(init)
        self.register_buffer("steps_since_used", torch.zeros(size, dtype=torch.long))
        self.all_reduce: Hook = None
        self.all_gather: Hook = None

    def codes(self) -> torch.Tensor:
        w = self.weight.float()
        return F.normalize(w, dim=-1) if self.l2_norm else w  # (size, dim)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) if self.l2_norm else x

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """(N, dim) prepared inputs -> (N,) index of the nearest code (squared euclidean distance)."""
        c = self.codes()
        dist = x.pow(2).sum(1, keepdim=True) - 2 * x @ c.t() + c.pow(2).sum(1)[None]  # (N, size)
        return dist.argmin(1)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        return F.embedding(indices, self.codes())  # (..., dim)

    def count(self, indices: torch.Tensor) -> torch.Tensor:
        counts = torch.bincount(indices.flatten(), minlength=self.size).float()  # (size,)
        return self.all_reduce(counts) if self.all_reduce is not None else counts

    @torch.no_grad()
    def update(self, x: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> int:
        """After a training forward: EMA step and dead-code restart. x (N, dim) prepared inputs, indices (N,).
        Returns the number of codes restarted."""
        if self.ema:
            sums = torch.zeros_like(self.ema_sum).index_add_(0, indices, x)  # (size, dim)
            if self.all_reduce is not None:
                sums = self.all_reduce(sums)
            self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
            self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            n = self.ema_count.sum()
            smoothed = (self.ema_count + 1e-5) / (n + self.size * 1e-5) * n  # Laplace smoothing: no division by 0
            self.weight.copy_(self.ema_sum / smoothed[:, None])
        if self.dead_code_steps <= 0:
            return 0
        self.steps_since_used.add_(1).masked_fill_(counts > 0, 0)
        dead = (self.steps_since_used >= self.dead_code_steps).nonzero().squeeze(1)  # (n_dead,)
        if len(dead):
            self.restart(dead, x, indices)
        return len(dead)

    @torch.no_grad()
    def restart(self, dead: torch.Tensor, x: torch.Tensor, indices: torch.Tensor) -> None:
        # Candidates: the inputs worst represented by their code, the top-n of the global batch. Taking the top-n
        # of each rank's top-n gives the same set on 1 or N ranks (the batch order does not matter).
        n = len(dead)
        error = (x - self.lookup(indices)).pow(2).sum(1)  # (N,)
        top = error.topk(min(n, len(error))).indices
        top = top[torch.arange(n, device=x.device) % len(top)]  # repeat when the batch is smaller than n
        cand, cand_err = x[top], error[top]  # (n, dim), (n,)
        if self.all_gather is not None:
            cand, cand_err = self.all_gather(cand), self.all_gather(cand_err)
        order = torch.sort(cand_err, descending=True, stable=True).indices[:n]
        new = cand[order]
        # .data: the restarted rows were unused, so no gradient of this step depends on them
        self.weight.data[dead] = new.to(self.weight.dtype)
        if self.ema:
            self.ema_sum[dead], self.ema_count[dead] = new, 1.0
        self.steps_since_used[dead] = 0


class VectorQuantizer(nn.Module):
    """VQ-VAE quantizer with straight-through gradients: commitment `beta` * ||z - sg(q)||^2, plus the codebook
    loss ||sg(z) - q||^2 unless the codebook is updated by EMA."""

    def __init__(self, size: int, dim: int, beta: float = 0.25, l2_norm: bool = True, ema: bool = False,
                 decay: float = 0.99, dead_code_steps: int = 0):  # fmt: skip
        super().__init__()
        self.codebook = Codebook(size, dim, l2_norm, ema, decay, dead_code_steps)
        self.beta, self.vocab_size, self.dim = beta, size, dim

    def forward(self, z: torch.Tensor) -> QuantOut:
        with fp32(z):
            B, C, h, w = z.shape
            x = self.codebook.prepare(to_tokens(z.float()).reshape(-1, C))  # (N, C), N = B*h*w
            indices = self.codebook.nearest(x)  # (N,)
            q = self.codebook.lookup(indices)  # (N, C)
            commit = F.mse_loss(x, q.detach())
            loss = self.beta * commit + (0.0 if self.codebook.ema else F.mse_loss(q, x.detach()))
            counts = self.codebook.count(indices)
            restarted = self.codebook.update(x.detach(), indices, counts) if self.training else 0
            q = x + (q - x).detach()  # straight-through
            z_q = to_map(q.view(B, h * w, C), h)
        extra = {"commit": commit.detach(), "restarted_codes": torch.tensor(float(restarted))}
        return QuantOut(z_q, loss, indices.view(B, h * w), counts, extra)

    @torch.no_grad()
    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, h*w) code indices; no state changes."""
        with fp32(z):
            x = self.codebook.prepare(to_tokens(z.float()))  # (B, L, C)
            return self.codebook.nearest(x.reshape(-1, x.shape[-1])).view(x.shape[:2])

    def indices_to_latent(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, C, side, side)."""
        return to_map(self.codebook.lookup(indices), math.isqrt(indices.shape[1]))

    def code_vectors(self) -> torch.Tensor:
        """Every code's vector (size, dim), as decoding reads it (unit-norm with l2_norm)."""
        return self.codebook.codes()


def code_entropies(x: torch.Tensor, codes: torch.Tensor, temperature: float, all_reduce: Hook = None):
    """MAGVIT-v2's entropy terms over the soft assignment softmax(-|x - c|^2 / temperature) of tokens x (N, d) to
    every code c of `codes` (K, d): the mean per-token entropy (low: each token is confident) and the entropy of the
    batch's average assignment (high: every code is used). Returns (per_token, batch_entropy), scalars. The (N, K)
    assignment keeps K moderate (<= 2**14). Under DDP (`all_reduce`) the batch distribution is the global one."""
    logits = (2 * x @ codes.t() - codes.pow(2).sum(-1)) / temperature  # (N, K): -|x-c|^2 / T up to a per-row constant
    prob = logits.softmax(-1)
    per_token = -(prob * prob.clamp_min(1e-8).log()).sum(-1).mean()
    prob_sum, n = prob.sum(0), torch.tensor(float(len(prob)), device=x.device)
    if all_reduce is not None:
        # the batch distribution over all ranks; its gradient flows through this rank's share, scaled so that
        # DDP's gradient average equals the one-process gradient
        total, n_total = all_reduce(prob_sum.detach().clone()), all_reduce(n.clone())
        avg = total / n_total + (prob_sum - prob_sum.detach()) / n
    else:
        avg = prob_sum / n
    return per_token, -(avg * avg.clamp_min(1e-8).log()).sum()


class FSQ(nn.Module):
    """Finite scalar quantization (Mentzer et al. 2023): channel i is bounded and rounded to `levels[i]` values;
    the implicit codebook has prod(levels) codes and no parameters, losses or collapse."""

    def __init__(self, levels: tuple[int, ...], entropy_weight: float = 0.0, gamma: float = 1.0,
                 temperature: float = 0.01):  # fmt: skip
        super().__init__()
        if not levels or any(not isinstance(v, int) or isinstance(v, bool) or v < 2 for v in levels):
            raise ValueError(f"levels={tuple(levels)} are not valid FSQ levels: use integers >= 2, e.g. (8, 5, 5, 5)")
        self.levels_list = tuple(levels)
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.long), persistent=False)
        self.register_buffer("basis", torch.cumprod(torch.tensor((1, *levels[:-1])), 0), persistent=False)
        self.vocab_size, self.dim = math.prod(levels), len(levels)
        # optional entropy penalty (off by default, as in the FSQ paper): FSQ has no dead-code restart, and on narrow
        # data its encoder leaves corners of the level grid unused; the batch-entropy term spreads the tokens
        self.entropy_weight, self.gamma, self.temperature = entropy_weight, gamma, temperature
        if entropy_weight > 0:  # every code in level units (spacing 1): (vocab, d)
            self.register_buffer("all_codes", self.indices_to_codes(torch.arange(self.vocab_size)) * (self.levels // 2),
                                 persistent=False)  # fmt: skip
        self.all_reduce: Hook = None

    def bound(self, x: torch.Tensor) -> torch.Tensor:
        # tanh squashes channel i into a range with exactly levels[i] integers; even levels get a half-step shift
        half_l = (self.levels - 1) * (1 + 1e-3) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        return torch.tanh(x + torch.atanh(offset / half_l)) * half_l - offset

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., d) codes in [-1, 1] -> (...) indices (mixed-radix digits)."""
        half = self.levels // 2
        return ((codes * half + half).round().long() * self.basis).sum(-1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        half = self.levels // 2
        return ((indices[..., None] // self.basis) % self.levels - half) / half  # (..., d)

    def forward(self, z: torch.Tensor) -> QuantOut:
        with fp32(z):
            x = to_tokens(z.float())  # (B, L, d)
            bounded = self.bound(x)
            rounded = bounded + (bounded.round() - bounded).detach()  # straight-through rounding
            codes = rounded / (self.levels // 2)  # (B, L, d) in [-1, 1]
            indices = self.codes_to_indices(codes.detach())  # (B, L)
            counts = torch.bincount(indices.flatten(), minlength=self.vocab_size).float()
            if self.all_reduce is not None:
                counts = self.all_reduce(counts)
            z_q = to_map(codes, z.shape[-1])
            loss, extra = z.new_zeros((), dtype=torch.float32), {}
            if self.entropy_weight > 0:
                # in level units, where `bounded` rounds to its code: (B*L, d) against every code (vocab, d)
                per_token, batch_entropy = code_entropies(bounded.reshape(-1, self.dim), self.all_codes,
                                                          self.temperature, self.all_reduce)  # fmt: skip
                loss = self.entropy_weight * (per_token - self.gamma * batch_entropy)
                extra = {"token_entropy": per_token.detach(), "batch_entropy": batch_entropy.detach()}
        return QuantOut(z_q, loss, indices, counts, extra)

    @torch.no_grad()
    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        with fp32(z):
            return self.codes_to_indices(self.bound(to_tokens(z.float())).round() / (self.levels // 2))

    def indices_to_latent(self, indices: torch.Tensor) -> torch.Tensor:
        return to_map(self.indices_to_codes(indices), math.isqrt(indices.shape[1]))

    def code_vectors(self) -> torch.Tensor:
        """Every code's point of the level grid (size, d), in [-1, 1]."""
        return self.indices_to_codes(torch.arange(self.vocab_size, device=self.basis.device)).float()


class LFQ(nn.Module):
    """Lookup-free quantization (MAGVIT-v2): each of log2(size) channels becomes its sign (+-1). The entropy loss
    is the per-token entropy (be confident) minus `gamma` times the batch's codebook entropy (use every code),
    over the softmax of -distance / temperature to all codes; so `size` is kept moderate (<= 2**14)."""

    def __init__(self, size: int, beta: float = 0.25, entropy_weight: float = 0.1, gamma: float = 1.0,
                 temperature: float = 0.01):  # fmt: skip
        super().__init__()
        bits = int(math.log2(size)) if size > 1 else 0
        if size < 2 or 2**bits != size:
            raise ValueError(f"codebook_size={size} is not valid for lfq: use a power of two (e.g. 1024 = 2**10)")
        self.vocab_size, self.dim, self.beta, self.entropy_weight = size, bits, beta, entropy_weight
        self.gamma, self.temperature = gamma, temperature
        self.register_buffer("bit_values", 2 ** torch.arange(bits), persistent=False)
        all_codes = ((torch.arange(size)[:, None] // self.bit_values) % 2) * 2.0 - 1  # (size, bits) of +-1
        self.register_buffer("all_codes", all_codes, persistent=False)
        self.all_reduce: Hook = None

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        return ((codes > 0).long() * self.bit_values).sum(-1)

    def forward(self, z: torch.Tensor) -> QuantOut:
        with fp32(z):
            x = to_tokens(z.float())  # (B, L, d)
            q = torch.where(x > 0, 1.0, -1.0)
            indices = self.codes_to_indices(q)  # (B, L)
            commit = F.mse_loss(x, q)
            per_token, batch_entropy = code_entropies(x.reshape(-1, self.dim), self.all_codes, self.temperature,
                                                      self.all_reduce)  # fmt: skip
            loss = self.beta * commit + self.entropy_weight * (per_token - self.gamma * batch_entropy)
            counts = torch.bincount(indices.flatten(), minlength=self.vocab_size).float()
            if self.all_reduce is not None:
                counts = self.all_reduce(counts)
            z_q = to_map(x + (q - x).detach(), z.shape[-1])
        extra = {"commit": commit.detach(), "token_entropy": per_token.detach()}
        extra["batch_entropy"] = batch_entropy.detach()
        return QuantOut(z_q, loss, indices, counts, extra)

    @torch.no_grad()
    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        return self.codes_to_indices(to_tokens(z.float()))

    def indices_to_latent(self, indices: torch.Tensor) -> torch.Tensor:
        return to_map(self.all_codes[indices], math.isqrt(indices.shape[1]))

    def code_vectors(self) -> torch.Tensor:
        """Every code's +-1 bits (size, bits): euclidean distance between them is 2 sqrt(Hamming distance)."""
        return self.all_codes


class Phi(nn.Conv2d):
    """VAR's residual refinement of an upsampled code map: (1 - ratio) * h + ratio * conv3x3(h)."""

    def __init__(self, dim: int, ratio: float):
        super().__init__(dim, dim, 3, padding=1)
        self.ratio = ratio

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1 - self.ratio) + super().forward(h) * self.ratio


class MultiScaleVQ(nn.Module):
    """VAR's multi-scale residual VQ. For scale k (side s_k): area-downsample the residual to s_k x s_k, look up
    the nearest codes in one shared codebook, bicubic-upsample them to the full grid, refine with a Phi conv
    (`phi_count` Phis shared across scales by relative depth), add to f_hat and subtract from the residual.

    Generator interface (VAR's `idxBl_to_var_input` / `get_next_autoregressive_input`):
      teacher_forcing_inputs(indices_list) -> (B, sum(s_k^2 for k >= 1), C) inputs of scales 2..K
      next_scale_input(k, f_hat, indices_k) -> (f_hat, (B, s_{k+1}^2, C) or None after the last scale)
      indices_to_latent(indices_list) -> f_hat (B, C, H, W), which Autoencoder.decode_from_fhat decodes
    """

    def __init__(self, size: int, dim: int, scales: tuple[int, ...], beta: float = 0.25, phi_count: int = 4,
                 phi_ratio: float = 0.5, ema: bool = False, decay: float = 0.99, dead_code_steps: int = 0):  # fmt: skip
        super().__init__()
        self.codebook = Codebook(size, dim, l2_norm=False, ema=ema, decay=decay, dead_code_steps=dead_code_steps)
        self.scales, self.beta, self.vocab_size, self.dim = tuple(scales), beta, size, dim
        self.phis = nn.ModuleList(Phi(dim, phi_ratio) for _ in range(phi_count))

    def phi(self, k: int) -> Phi:
        """The Phi of scale k: the one whose tick (spread over [0, 1]) is nearest to k / (K - 1), computed as VAR does,
        in float64 with numpy: with 4 Phis, scales 3 and 8 of VAR's 10 (and scale 4 of 7) lie exactly halfway
        between two ticks, and float32 rounding picked the other Phi than VAR's tokenizer does."""
        n, depth = len(self.phis), k / max(1, len(self.scales) - 1)
        ticks = np.linspace(1 / 3 / n, 1 - 1 / 3 / n, n)
        return self.phis[int(np.argmin(np.abs(ticks - depth)))]

    def upsample(self, h: torch.Tensor, k: int) -> torch.Tensor:
        """Code map of scale k (B, C, s_k, s_k) -> refined full-grid contribution (B, C, H, H)."""
        side = self.scales[-1]
        if h.shape[-1] != side:
            h = F.interpolate(h, size=(side, side), mode="bicubic")
        return self.phi(k)(h)

    def forward(self, z: torch.Tensor) -> QuantOut:
        with fp32(z):
            f = z.float()  # (B, C, H, W)
            f_detached = f.detach()
            rest, f_hat = f_detached.clone(), torch.zeros_like(f_detached)
            loss, all_x, all_idx, indices = 0.0, [], [], []
            for k, s in enumerate(self.scales):
                small = F.interpolate(rest, size=(s, s), mode="area") if s != rest.shape[-1] else rest
                x = to_tokens(small).reshape(-1, self.dim)  # (B*s*s, C)
                idx = self.codebook.nearest(x)
                h = self.upsample(to_map(self.codebook.lookup(idx).view(f.shape[0], s * s, -1), s), k)
                f_hat = f_hat + h
                rest = rest - h.detach()
                loss = loss + self.beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f_detached)
                all_x.append(x)
                all_idx.append(idx)
                indices.append(idx.view(f.shape[0], s * s))
            loss = loss / len(self.scales)
            all_idx = torch.cat(all_idx)
            counts = self.codebook.count(all_idx)
            restarted = self.codebook.update(torch.cat(all_x), all_idx, counts) if self.training else 0
            z_q = f_hat.detach() - f_detached + f  # straight-through to the encoder
        return QuantOut(z_q, loss, indices, counts, {"restarted_codes": torch.tensor(float(restarted))})

    @torch.no_grad()
    def quantize(self, z: torch.Tensor) -> list[torch.Tensor]:
        with fp32(z):
            rest, indices = z.float(), []
            for k, s in enumerate(self.scales):
                small = F.interpolate(rest, size=(s, s), mode="area") if s != rest.shape[-1] else rest
                idx = self.codebook.nearest(to_tokens(small).reshape(-1, self.dim)).view(z.shape[0], s * s)
                rest = rest - self.upsample(to_map(self.codebook.lookup(idx), s), k)
                indices.append(idx)
            return indices

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, L) code indices -> (B, L, C) code vectors."""
        return self.codebook.lookup(indices)

    def indices_to_latent(self, indices: list[torch.Tensor]) -> torch.Tensor:
        f_hat = None
        for k in range(len(indices)):
            f_hat, _ = self.next_scale_input(k, f_hat, indices[k])
        return f_hat  # (B, C, H, W)

    def next_scale_input(
        self, k: int, f_hat: torch.Tensor | None, indices_k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Add scale k's codes (B, s_k^2) to f_hat (None before scale 0); return the new f_hat (B, C, H, W) and the
        input of scale k + 1, f_hat area-downsampled to (B, s_{k+1}^2, C) (None after the last scale)."""
        return self.next_scale_input_from_vectors(k, f_hat, self.embed(indices_k))

    def next_scale_input_from_vectors(
        self, k: int, f_hat: torch.Tensor | None, vectors_k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`next_scale_input` from scale k's code vectors (B, s_k^2, C) rather than their indices: a mixture of codes
        too (VAR's smoothed sampling)."""
        with fp32(vectors_k):
            s = self.scales[k]
            h = self.upsample(to_map(vectors_k.float(), s), k)  # (B, C, H, W)
            f_hat = h if f_hat is None else f_hat.float() + h
            if k + 1 == len(self.scales):
                return f_hat, None
            nxt = self.scales[k + 1]
            return f_hat, to_tokens(F.interpolate(f_hat, size=(nxt, nxt), mode="area"))

    def teacher_forcing_inputs(self, indices: list[torch.Tensor]) -> torch.Tensor:
        """Ground-truth indices of all K scales -> inputs of scales 2..K (B, L - s_1^2, C): input k + 1 is the
        running f_hat of scales 1..k area-downsampled to s_{k+1} (VAR's idxBl_to_var_input); sampling rebuilds the
        same inputs one scale at a time with `next_scale_input`."""
        side, inputs = self.scales[-1], []
        with fp32(indices[0]):
            f_hat = torch.zeros(indices[0].shape[0], self.dim, side, side, device=indices[0].device)
            for k in range(len(self.scales) - 1):
                f_hat = f_hat + self.upsample(to_map(self.embed(indices[k]), self.scales[k]), k)
                nxt = self.scales[k + 1]
                inputs.append(to_tokens(F.interpolate(f_hat, size=(nxt, nxt), mode="area")))  # (B, s_{k+1}^2, C)
        return torch.cat(inputs, dim=1)


class DiagonalGaussian(nn.Module):
    """KL-VAE bottleneck: the encoder predicts mean and log-variance; the decoder sees a sample (training) or the
    mean (eval). `kl_weight` scales the KL to N(0, I); `scale_factor` (a buffer, kept in checkpoints) multiplies
    the latents that `encode` hands to generators so that they have about unit variance."""

    def __init__(self, dim: int, kl_weight: float = 1e-6, scale_factor: float = 1.0):
        super().__init__()
        self.dim, self.kl_weight, self.vocab_size = dim, kl_weight, None
        self.register_buffer("scale_factor", torch.tensor(float(scale_factor)))

    def moments(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = z.float().chunk(2, dim=1)  # (B, D, h, w) each
        return mean, logvar.clamp(-30.0, 20.0)

    def forward(self, z: torch.Tensor, sample: bool | None = None) -> QuantOut:
        with fp32(z):
            mean, logvar = self.moments(z)
            std = torch.exp(0.5 * logvar)
            sample = self.training if sample is None else sample
            latent = mean + std * torch.randn_like(mean) if sample else mean
            kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3)).mean()
        return QuantOut(latent, self.kl_weight * kl, None, None, {"kl": kl.detach(), "mean": mean, "std": std})

    def encode(self, z: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """(B, 2D, h, w) -> (B, h*w, D) latents times `scale_factor`: a posterior sample or its mean."""
        with fp32(z):
            return to_tokens(self.forward(z, sample).z_q) * self.scale_factor

    def indices_to_latent(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, D) scaled latents -> (B, D, side, side) unscaled."""
        with fp32(tokens):
            return to_map(tokens.float() / self.scale_factor, math.isqrt(tokens.shape[1]))
