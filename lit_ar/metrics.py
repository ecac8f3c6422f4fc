"""Image-generation metrics and the feature extractors they are computed in.

Metrics take features (or logits), not images, so that reference statistics can be computed once and cached:
- `frechet_distance` (FID's closed form on stored statistics), `feature_statistics`,
- `precision_recall` (Kynkaanniemi et al. 2019, k-NN manifolds), `inception_score`, `class_accuracy`,
- `psnr`, `ssim` (per image, tokenizer reconstructions), `perplexity`, `codebook_usage`.

Feature extractors share one small protocol, `FeatureExtractor`: `features(images in [-1, 1]) -> (N, D)`, a
linear `head(features) -> logits` for the Inception Score and class accuracy, an `identity` string recorded with
every reference and result, and the input they expect. Two ship:
- `ClassifierFeatures(ckpt_path)`: a lit_ar `ClassifierSystem` checkpoint (domain features for any dataset);
- `InceptionFeatures(weights_path)`: the standard FID InceptionV3 (`pt_inception-2015-12-05-6726825d.pth`), read
  from a local file; with it the numbers are comparable with published FIDs (pytorch-fid / torch-fidelity).
"""

import hashlib
import inspect
import math
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
import torchmetrics.functional as TMF
from torch import nn

from lit_ar.models.classifier import CNNClassifier
from lit_ar.models.inception import FIDInceptionV3

ExtractorKind = Literal["classifier", "inception"]


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes: the identity of a checkpoint, weights file or sample archive."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Feature extractors


@runtime_checkable
class FeatureExtractor(Protocol):
    identity: str  # recorded with references and results, e.g. "classifier:3f2a...": a mismatch is refused
    input_size: int | None  # the image side it expects (None: any, it resizes itself)
    channels: int | None  # the channels it expects (None: 1 or 3, grey is repeated to RGB)
    feature_dim: int
    num_classes: int | None  # classes of `head` when they are the data's classes (class accuracy); else None

    def features(self, images: torch.Tensor) -> torch.Tensor: ...  # (N, C, H, W) in [-1, 1] -> (N, D) float32

    def head(self, features: torch.Tensor) -> torch.Tensor: ...  # (N, D) -> (N, K) logits


def check_extractor_path(kind: str, path: str | None, setting: str) -> None:
    """Fail early, naming the setting, when an extractor's weights are not given or not there."""
    what = {
        "classifier": "a lit_ar ClassifierSystem checkpoint (train one with `lit_ar fit --config "
        "configs/classifier/<dataset>.yaml`)",
        "inception": "the FID InceptionV3 weights file pt_inception-2015-12-05-6726825d.pth (pytorch-fid and "
        "torch-fidelity publish it; lit_ar never downloads it)",
    }
    if kind not in what:
        kind_setting = setting.removesuffix("_ckpt")
        raise ValueError(f"{kind_setting}={kind!r} is not a feature extractor; use one of {list(what)}")
    if path is None:
        raise ValueError(f"{setting} is not set: the {kind!r} feature extractor needs {what[kind]}")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{setting}={path!r}: no such file; the {kind!r} feature extractor needs {what[kind]}")


def load_classifier(ckpt_path: str, setting: str = "extractor_ckpt") -> tuple[CNNClassifier, dict]:
    """A ClassifierSystem checkpoint -> its CNNClassifier, frozen in eval mode on the CPU, and the saved settings.

    Read with plain `torch.load(weights_only=True)`, not through `ClassifierSystem`: the metrics and the evaluation
    sit below the Lightning systems and must not import them. The system saves every init argument (CNNClassifier's
    among them, by the same names) and keeps the network under `model.` in its state dict."""
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    hparams, state = checkpoint.get("hyper_parameters") or {}, checkpoint.get("state_dict") or {}
    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    missing = [k for k in ("num_classes", "image_size", "channels") if k not in hparams]
    if missing or not weights:
        lacks = f"the settings {missing}" if missing else "weights under 'model.'"
        raise ValueError(
            f"{setting}={ckpt_path!r} is not a ClassifierSystem checkpoint: it has no {lacks}; train one with "
            "`lit_ar fit --config configs/classifier/<dataset>.yaml`"
        )
    arguments = inspect.signature(CNNClassifier).parameters
    model = CNNClassifier(**{k: hparams[k] for k in arguments if k in hparams})
    model.load_state_dict(weights)
    return model.eval().requires_grad_(False), dict(hparams)


class ClassifierFeatures(nn.Module):
    """Penultimate features and logits of a lit_ar `ClassifierSystem` checkpoint (frozen, eval mode)."""

    def __init__(self, ckpt_path: str, setting: str = "extractor_ckpt"):
        super().__init__()
        check_extractor_path("classifier", ckpt_path, setting)
        self.model, h = load_classifier(ckpt_path, setting)
        self.input_size, self.channels = int(h["image_size"]), int(h["channels"])
        self.feature_dim, self.num_classes = self.model.feature_dim, int(h["num_classes"])
        self.identity = f"classifier:{file_sha256(ckpt_path)[:16]}"

    def train(self, mode: bool = True) -> "ClassifierFeatures":
        return super().train(False)  # always frozen, whatever the surrounding module does

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.features(images.float()).float()  # (N, feature_dim)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.head(features)  # (N, num_classes)


class InceptionFeatures(nn.Module):
    """FID InceptionV3 pool features (2048) and unbiased logits (1008, for the Inception Score) from a weights file.

    Images are quantised to uint8 first, exactly as if they had been saved as PNG: published FIDs are computed on
    8-bit images, and a float sample must not score differently from the same sample written to disk.
    """

    input_size = None
    channels = None
    feature_dim = FIDInceptionV3.feature_dim
    num_classes = None  # ImageNet-1008 logits are not the data's classes: no class accuracy from them

    def __init__(self, weights_path: str, setting: str = "extractor_ckpt"):
        super().__init__()
        check_extractor_path("inception", weights_path, setting)
        self.net = FIDInceptionV3()
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        try:
            self.net.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(
                f"{setting}={weights_path!r} is not the FID InceptionV3 state dict "
                f"(pt_inception-2015-12-05-6726825d.pth): {err}"
            ) from err
        self.net.eval().requires_grad_(False)
        self.identity = f"inception-v3-fid:{file_sha256(weights_path)[:16]}"

    def train(self, mode: bool = True) -> "InceptionFeatures":
        return super().train(False)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = ((images.float() + 1) * 127.5).round().clamp(0, 255)  # (N, C, H, W) 8-bit values, as float
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grey -> RGB, as pytorch-fid does for grey images
        return self.net(x)  # (N, 2048)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.net.logits_unbiased(features)  # (N, 1008)


def load_extractor(kind: ExtractorKind, path: str | None, setting: str = "extractor_ckpt") -> FeatureExtractor:
    """The extractor `kind` ('classifier' | 'inception') from `path`; errors name `setting`."""
    check_extractor_path(kind, path, setting)
    return ClassifierFeatures(path, setting) if kind == "classifier" else InceptionFeatures(path, setting)


# ----------------------------------------------------------------------------------------------------------------
# Distribution metrics on features


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) -> mean (D,) and unbiased covariance (D, D), in float64 (FID needs the precision)."""
    x = features.double()
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.T @ xc / (x.shape[0] - 1)


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2): the FID on stored statistics.

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)). The trace of the square root is computed as the
    sum of square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2), which is symmetric PSD: stabler than scipy's
    `sqrtm(S1 @ S2)` on the near-singular covariances FID meets, and equal to it in exact arithmetic.
    """
    mu1, mu2, sigma1, sigma2 = mu1.double(), mu2.double(), sigma1.double(), sigma2.double()
    evals, evecs = torch.linalg.eigh(sigma1)
    sqrt1 = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T  # S1^(1/2)
    inner = sqrt1 @ sigma2 @ sqrt1
    tr_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    fid = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * tr_sqrt
    return float(fid)


def _kth_neighbour_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """(N, D) -> (N,) distance of each point to its k-th nearest other point."""
    radii = []
    for start in range(0, x.shape[0], chunk):
        d = torch.cdist(x[start : start + chunk], x)  # (chunk, N)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # +1: the point itself, at distance 0
    return torch.cat(radii)


def _inside_any(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> torch.Tensor:
    """(N,) bool: point i lies in at least one ball (centre j, radius j)."""
    inside = []
    for start in range(0, points.shape[0], chunk):
        d = torch.cdist(points[start : start + chunk], centres)  # (chunk, M)
        inside.append((d <= radii[None]).any(dim=1))
    return torch.cat(inside)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """k-NN precision and recall (Kynkaanniemi et al. 2019) of `fake` (N, D) against `real` (M, D) features.

    Each set's manifold is the union of balls around its points, of radius the distance to the k-th nearest
    neighbour. Precision: the fraction of fake points inside the real manifold (fidelity); recall: the fraction
    of real points inside the fake manifold (coverage). Computed in float32 on the features' device.
    """
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} real and fake samples")
    real, fake = real.float(), fake.float()
    real_radii = _kth_neighbour_radii(real, k, chunk)
    fake_radii = _kth_neighbour_radii(fake, k, chunk)
    precision = _inside_any(fake, real, real_radii, chunk).float().mean()
    recall = _inside_any(real, fake, fake_radii, chunk).float().mean()
    return float(precision), float(recall)


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) || p(y))) of (N, K) logits, mean and std over `splits` consecutive chunks.

    As Salimans et al. and torch-fidelity: no shuffling (pass samples in a fixed order), population std.
    """
    log_p = torch.log_softmax(logits.double(), dim=1)  # (N, K)
    scores = []
    for part in torch.tensor_split(log_p, splits):
        log_py = torch.logsumexp(part, dim=0) - math.log(part.shape[0])  # log of the marginal p(y), (K,)
        kl = (part.exp() * (part - log_py)).sum(dim=1).mean()
        scores.append(kl.exp())
    scores = torch.stack(scores)
    return float(scores.mean()), float(scores.std(correction=0))


def class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of class-conditional samples that the classifier assigns to the class they were asked for."""
    return float(TMF.classification.multiclass_accuracy(logits, labels, num_classes=logits.shape[1], average="micro"))


# ----------------------------------------------------------------------------------------------------------------
# Reconstruction metrics (tokenizers)


def psnr(reconstructions: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of (B, C, H, W) images in [-1, 1] (the figure on [0, 1] or uint8 is the same) -> (B,)."""
    mse = ((reconstructions.float() - images.float()) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def ssim(
    reconstructions: torch.Tensor, images: torch.Tensor, kernel_size: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004: Gaussian window, valid region) of (B, C, H, W) images in [-1, 1], computed on
    [0, 1] -> (B,). Images smaller than the window use the largest odd window that fits."""
    a, b = (reconstructions.float() + 1) / 2, (images.float() + 1) / 2
    k = min(kernel_size, a.shape[-1], a.shape[-2])
    k -= 1 - k % 2  # odd
    x = torch.arange(k, dtype=torch.float32, device=a.device) - (k - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(a.shape[1], 1, k, k)  # (C, 1, k, k): depthwise

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=a.shape[1])

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """Code counts (vocab,) -> exp(entropy) of the code distribution: the effective number of codes used."""
    p = counts / counts.sum().clamp_min(1)
    return torch.exp(-(p * p.clamp_min(1e-12).log()).sum())


def codebook_usage(indices: torch.Tensor, vocab_size: int) -> tuple[float, float]:
    """Token indices (any shape) -> (fraction of the codebook used, perplexity of the code distribution)."""
    counts = torch.bincount(indices.flatten().long(), minlength=vocab_size).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float((counts > 0).double().mean()), float(entropy.exp())
