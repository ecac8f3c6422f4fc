"""Metrics on features (FID closed form, precision/recall, IS, class accuracy), reconstruction metrics, extractors."""

import math

import pytest
import torch
import torchmetrics

from lit_ar.data.builtin import ShapesDataset
from lit_ar.metrics import (
    ClassifierFeatures,
    FeatureExtractor,
    InceptionFeatures,
    class_accuracy,
    codebook_usage,
    feature_statistics,
    frechet_distance,
    inception_score,
    load_extractor,
    perplexity,
    precision_recall,
    psnr,
    ssim,
)
from lit_ar.models.inception import FIDInceptionV3, resize_bilinear_tf1


def correlated_features(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) + torch.randn(d, generator=g)


def fid(a: torch.Tensor, b: torch.Tensor) -> float:
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


def test_fid_of_a_set_against_itself_is_zero_and_grows_monotonically_with_noise():
    x = correlated_features(2000, 16, seed=0)
    assert abs(fid(x, x)) < 1e-6
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=g)
    values = [fid(x, x + s * noise) for s in (0.1, 0.3, 1.0, 3.0)]
    assert values[0] > 1e-3 and all(a < b for a, b in zip(values, values[1:])), values


def test_fid_against_a_gaussian_with_known_statistics_matches_the_closed_form():
    # Diagonal (commuting) covariances: the Frechet distance is |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 0.0])
    a, b = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    expected = float((mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())  # 5 + 4 + 1 + 0 = 10
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expected, abs=1e-9)
    # Samples of N(mu1, S1) against the exact statistics of N(mu2, S2), non-commuting: the estimate converges.
    g = torch.Generator().manual_seed(0)
    l1, l2 = torch.randn(3, 3, generator=g), torch.randn(3, 3, generator=g)
    s1, s2 = l1 @ l1.T + 0.1 * torch.eye(3), l2 @ l2.T + 0.1 * torch.eye(3)
    samples = torch.randn(400_000, 3, generator=g, dtype=torch.float64) @ l1.T.double()
    samples += 0.1**0.5 * torch.randn(400_000, 3, generator=g, dtype=torch.float64) + mu1.double()
    exact = frechet_distance(mu1, s1, mu2, s2)
    estimated = frechet_distance(*feature_statistics(samples), mu2, s2)
    assert estimated == pytest.approx(exact, rel=0.02)


def test_frechet_distance_agrees_with_torchmetrics_fid():
    """The closed form on stored statistics gives torchmetrics' FrechetInceptionDistance on the same features."""

    class Identity(torch.nn.Module):
        num_features = 12

        def forward(self, x):
            return x

    real, fake = correlated_features(500, 12, seed=2), correlated_features(400, 12, seed=3)
    metric = torchmetrics.image.fid.FrechetInceptionDistance(feature=Identity(), normalize=True)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    assert fid(fake, real) == pytest.approx(float(metric.compute()), rel=1e-6)


def test_precision_recall_sanity():
    x = correlated_features(300, 8, seed=0)
    assert precision_recall(x, x, k=3) == (1.0, 1.0)
    assert precision_recall(x, x + 1000.0, k=3) == (0.0, 0.0)  # disjoint, far apart
    # Fakes are the real points of half the clusters: all realistic (precision 1), half covered (recall 0.5).
    g = torch.Generator().manual_seed(0)
    real = (100.0 * torch.randn(10, 8, generator=g)).repeat_interleave(50, 0) + torch.randn(500, 8, generator=g)
    assert precision_recall(real, real[:250], k=3) == (1.0, 0.5)
    # ... and the same clusters sampled afresh: still mostly inside the real manifold, still half covered.
    precision, recall = precision_recall(real, real[:250] + 0.1 * torch.randn(250, 8, generator=g), k=3)
    assert precision > 0.9 and 0.45 < recall <= 0.5, (precision, recall)
    with pytest.raises(ValueError, match="k=3 needs more than 3"):
        precision_recall(x[:3], x, k=3)


def test_inception_score_bounds_and_class_accuracy():
    assert inception_score(torch.zeros(100, 7)) == pytest.approx((1.0, 0.0))  # uninformative: 1
    confident = 50.0 * torch.eye(10).repeat(20, 1)  # every class equally often, each predicted surely: C
    mean, std = inception_score(confident, splits=10)
    assert mean == pytest.approx(10.0, rel=1e-6) and std < 1e-6
    labels = torch.arange(10).repeat(20)
    assert class_accuracy(confident, labels) == 1.0
    assert class_accuracy(confident, (labels + 1) % 10) == 0.0


def test_psnr_ssim_perplexity_and_codebook_usage():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 16, 16, generator=g) * 1.6 - 0.8
    torch.testing.assert_close(ssim(images, images), torch.ones(4))
    delta = 0.1  # a constant offset: MSE = delta^2 on a data range of 2
    torch.testing.assert_close(psnr(images + delta, images), torch.full((4,), 10 * math.log10(4 / delta**2)))
    assert ssim(images + 0.5 * torch.randn(images.shape, generator=g), images).max() < 0.75  # heavy noise: far below 1
    # images smaller than the 11x11 window: the largest odd window that fits (7x7 on 8x8)
    small = images[..., :8, :8]
    torch.testing.assert_close(ssim(small, small), torch.ones(4))
    assert ssim(small.flip(-1), small).max() < 0.9
    usage, effective = codebook_usage(torch.arange(8).repeat(5), vocab_size=16)
    assert usage == 0.5 and effective == pytest.approx(8.0)
    counts = torch.bincount(torch.arange(8).repeat(5), minlength=16).float()
    assert perplexity(counts).item() == pytest.approx(8.0)


def test_psnr_and_ssim_agree_with_torchmetrics():
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    a = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    b = (a + 0.1 * torch.randn(a.shape, generator=torch.Generator().manual_seed(2))).clamp(-1, 1)
    for i in range(3):
        ref = peak_signal_noise_ratio((b[i : i + 1] + 1) / 2, (a[i : i + 1] + 1) / 2, data_range=1.0)
        assert psnr(b, a)[i].item() == pytest.approx(ref.item(), abs=1e-3)
    ref = structural_similarity_index_measure((b + 1) / 2, (a + 1) / 2, data_range=1.0)
    assert ssim(b, a).mean().item() == pytest.approx(ref.item(), abs=2e-3)
    assert ssim(a, a).min().item() == pytest.approx(1.0, abs=1e-5)


def test_tf1_bilinear_resize():
    x = torch.tensor([[[[0.0, 10.0]]]])  # (1, 1, 1, 2)
    up = resize_bilinear_tf1(x.expand(1, 1, 2, 2), 4)
    # TF1 samples source x = i * 2 / 4 = 0, 0.5, 1, 1.5 (upper neighbour clamped): no half-pixel offset
    torch.testing.assert_close(up[0, 0, 0], torch.tensor([0.0, 5.0, 10.0, 10.0]))
    y = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(resize_bilinear_tf1(y, 5), y)


def test_inception_features_from_a_weights_file(tmp_path):
    """The architecture builds and loads a state dict through the same path as the real weights file."""
    torch.manual_seed(0)
    torch.save(FIDInceptionV3().state_dict(), tmp_path / "inception.pth")
    extractor = load_extractor("inception", str(tmp_path / "inception.pth"))
    assert isinstance(extractor, InceptionFeatures) and isinstance(extractor, FeatureExtractor)
    assert extractor.identity.startswith("inception-v3-fid:") and extractor.feature_dim == 2048
    extractor.net.input_size = 75  # the smallest input this architecture takes (not 299): 16x less CPU in CI
    images = torch.rand(2, 1, 12, 12) * 2 - 1  # grey, tiny: resized and repeated to RGB inside
    with torch.no_grad():
        features = extractor.features(images)
        assert features.shape == (2, 2048) and torch.isfinite(features).all()
        assert extractor.head(features).shape == (2, 1008)
    assert not extractor.train().training, "extractors stay in eval mode"


def test_missing_or_wrong_extractor_weights_name_the_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model.init_args.extractor_ckpt='/nope.pth': no such file.*"
                       r"pt_inception-2015-12-05-6726825d.pth"):  # fmt: skip
        load_extractor("inception", "/nope.pth", setting="model.init_args.extractor_ckpt")
    with pytest.raises(ValueError, match=r"extractor_ckpt is not set: the 'classifier' feature extractor needs"):
        load_extractor("classifier", None)
    with pytest.raises(ValueError, match=r"extractor='vgg' is not a feature extractor"):
        load_extractor("vgg", "x")
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match=r"is not the FID InceptionV3 state dict"):
        load_extractor("inception", str(tmp_path / "wrong.pth"))


def test_classifier_features_and_image_level_fid(classifier_ckpt):
    extractor = ClassifierFeatures(str(classifier_ckpt))
    assert (extractor.input_size, extractor.channels, extractor.feature_dim, extractor.num_classes) == (16, 3, 32, 10)
    assert extractor.identity.startswith("classifier:")
    data = ShapesDataset(256, 16, split="validation")
    images = torch.stack([data[i][0] for i in range(256)]).float() / 127.5 - 1
    with torch.no_grad():
        real = extractor.features(images)
        assert real.shape == (256, 32) and extractor.head(real).shape == (256, 10)
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(images.shape, generator=g)
        values = [fid(extractor.features((images + s * noise).clamp(-1, 1)), real) for s in (0.0, 0.2, 0.5, 1.0)]
    assert values[0] < 1e-6 and all(a < b for a, b in zip(values, values[1:])), values
