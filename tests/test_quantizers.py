"""Quantizers and the autoencoder core: gradients, exactness, multi-scale consistency, KL, restarts, fp32 islands."""

import pytest
import torch
import torch.nn.functional as F

from lit_ar.models.autoencoder import Autoencoder, PatchDiscriminator, default_scales
from lit_ar.models.lpips import LIN_FILE, LPIPS, VGG_CONVS, VGG_FILE, VGG_WIDTHS
from lit_ar.models.quantizers import FSQ, LFQ, Codebook, DiagonalGaussian, MultiScaleVQ, VectorQuantizer

QUANTIZERS = ["vq", "fsq", "lfq", "msvq", "kl"]
TINY = dict(base_channels=8, num_res_blocks=1, z_channels=16, codebook_size=64, latent_dim=4, levels=(4, 4, 4))


def tiny(quantizer: str, image_size: int = 16, **kwargs) -> Autoencoder:
    torch.manual_seed(0)
    scales = (1, 2, 4) if quantizer == "msvq" else None
    return Autoencoder(image_size, 3, quantizer, **{**TINY, "scales": scales, **kwargs})


def images(n: int = 4, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_straight_through_gradients_reach_the_encoder(quantizer):
    ae = tiny(quantizer).train()
    rec, q = ae(images())
    F.mse_loss(rec, images()).backward()  # the reconstruction loss alone, not the quantizer's own loss
    grad = ae.encoder.conv_in.weight.grad
    assert grad is not None and grad.abs().sum() > 0, f"{quantizer}: no gradient reached the encoder"


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_interface_shapes_and_encode_decode(quantizer):
    ae = tiny(quantizer).eval()
    x = images()
    assert (ae.grid_size, ae.downsample, ae.image_size, ae.channels) == (4, 4, 16, 3)
    assert ae.is_continuous == (quantizer == "kl") and (ae.vocab_size is None) == (quantizer == "kl")
    tokens = ae.encode(x, sample=False)
    if quantizer == "msvq":
        assert ae.scales == (1, 2, 4) and [t.shape for t in tokens] == [(4, 1), (4, 4), (4, 16)]
    elif quantizer == "kl":
        assert tokens.shape == (4, 16, ae.latent_channels) and tokens.dtype == torch.float32
    else:
        assert tokens.shape == (4, 16) and tokens.dtype == torch.long and int(tokens.max()) < ae.vocab_size
    out = ae.decode(tokens)
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    rec, _ = ae(x)  # the training pass (eval mode: the kl mean) decodes to the same images
    torch.testing.assert_close(out, rec.clamp(-1, 1), atol=1e-5, rtol=1e-5)


def test_encode_never_changes_the_codebook_even_in_train_mode():
    ae = tiny("vq", dead_code_steps=1, ema=True).train()
    before = {k: v.clone() for k, v in ae.state_dict().items()}
    ae.encode(images())
    assert all(torch.equal(before[k], v) for k, v in ae.state_dict().items())
    ae(images())  # a training forward does update the EMA codebook
    assert not torch.equal(before["quantizer.codebook.weight"], ae.state_dict()["quantizer.codebook.weight"])


def test_fsq_codes_are_exact_and_round_trip():
    fsq = FSQ((8, 5, 5, 3))
    assert fsq.vocab_size == 600 and fsq.dim == 4
    every = torch.arange(fsq.vocab_size)
    codes = fsq.indices_to_codes(every)  # (600, 4)
    half = fsq.levels // 2
    assert torch.equal(codes * half, (codes * half).round()), "codes are exact multiples of 1 / (L // 2)"
    assert torch.equal(fsq.codes_to_indices(codes), every) and len(set(map(tuple, codes.tolist()))) == 600
    z = torch.randn(3, 4, 5, 5) * 3
    out = fsq(z)
    assert torch.equal(fsq.codes_to_indices(out.z_q.flatten(2).transpose(1, 2)), out.indices)
    assert torch.equal(fsq.quantize(z), out.indices)
    torch.testing.assert_close(fsq.indices_to_latent(out.indices), out.z_q, atol=0, rtol=0)
    # every level is reachable: each channel takes exactly `levels` distinct values on wide inputs
    wide = fsq(torch.linspace(-6, 6, 400).view(1, 1, 20, 20).expand(1, 4, 20, 20).contiguous())
    for c, levels in enumerate((8, 5, 5, 3)):
        assert len(wide.z_q[0, c].unique()) == levels


def test_fsq_entropy_term_spreads_tokens_over_more_codes():
    fsq = FSQ((5, 5, 5), entropy_weight=1.0, temperature=0.3)
    assert fsq(torch.randn(1, 3, 4, 4)).extra["batch_entropy"] <= torch.log(torch.tensor(125.0)) + 1e-5
    torch.manual_seed(0)
    z = (0.3 * torch.randn(4, 3, 8, 8)).requires_grad_()  # (B, d, h, w): a narrow encoder output, few codes used
    used_before = len(fsq(z).indices.unique())
    opt = torch.optim.Adam([z], lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        fsq(z).loss.backward()
        opt.step()
    assert len(fsq(z).indices.unique()) > 2 * used_before
    assert FSQ((5, 5, 5))(z).loss == 0  # off by default, as in the FSQ paper


@pytest.mark.parametrize("levels", [(8, 1), (8, 2.5), ()])
def test_fsq_rejects_bad_levels(levels):
    with pytest.raises(ValueError, match=r"levels=.* are not valid FSQ levels: use integers >= 2"):
        FSQ(levels)


def test_lfq_round_trip_entropy_and_bad_size():
    lfq = LFQ(16)
    every = torch.arange(16)
    assert torch.equal(lfq.codes_to_indices(lfq.all_codes[every]), every)
    z = torch.randn(2, 4, 3, 3)
    out = lfq(z)
    assert set(out.z_q.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(lfq.indices_to_latent(out.indices), out.z_q) and torch.equal(lfq.quantize(z), out.indices)
    assert 0 <= out.extra["batch_entropy"] <= torch.log(torch.tensor(16.0)) + 1e-5
    with pytest.raises(ValueError, match=r"codebook_size=12 is not valid for lfq: use a power of two"):
        LFQ(12)


def msvq_with_rich_codebook() -> tuple[MultiScaleVQ, torch.Tensor]:
    torch.manual_seed(0)
    q = MultiScaleVQ(4096, 4, (1, 2, 3, 4, 6, 8, 12, 16)).eval()
    q.codebook.weight.data = torch.randn(4096, 4) * 0.7
    coarse = F.interpolate(torch.randn(2, 4, 4, 4), size=(16, 16), mode="bicubic")
    return q, coarse + 0.3 * torch.randn(2, 4, 16, 16)  # (B, C, 16, 16): coarse structure plus detail


def test_msvq_error_falls_as_scales_are_added():
    q, z = msvq_with_rich_codebook()
    indices, f_hat, errors = q.quantize(z), None, []
    for k in range(len(q.scales)):
        f_hat, _ = q.next_scale_input(k, f_hat, indices[k])
        errors.append(F.mse_loss(f_hat, z).item())
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.1 * errors[0]


def test_msvq_teacher_forcing_inputs_match_what_sampling_rebuilds():
    q, z = msvq_with_rich_codebook()
    out = q(z)
    assert torch.equal(torch.stack([i for i in q.quantize(z)[:1]]), torch.stack(out.indices[:1]))
    teacher = q.teacher_forcing_inputs(out.indices)
    assert teacher.shape == (2, sum(s * s for s in q.scales[1:]), 4)
    f_hat, rebuilt = None, []
    for k in range(len(q.scales)):  # sampling: one scale at a time, feeding the indices back
        f_hat, nxt = q.next_scale_input(k, f_hat, out.indices[k])
        if nxt is not None:
            rebuilt.append(nxt)
    assert nxt is None and len(rebuilt) == len(q.scales) - 1
    torch.testing.assert_close(torch.cat(rebuilt, 1), teacher, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(f_hat, out.z_q, atol=1e-5, rtol=1e-5)  # the decoder sees the same f_hat
    torch.testing.assert_close(q.indices_to_latent(out.indices), out.z_q, atol=1e-5, rtol=1e-5)


def test_msvq_scales_are_checked():
    with pytest.raises(ValueError, match=r"scales=\(1, 3, 2, 4\) must be positive integers in strictly increasing"):
        tiny("msvq", scales=(1, 3, 2, 4))
    with pytest.raises(ValueError, match=r"scales=\(1, 2, 3\) must end at the latent grid size 4"):
        tiny("msvq", scales=(1, 2, 3))
    assert default_scales(16) == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16) and default_scales(8)[-1] == 8


def test_kl_loss_sampling_and_scale():
    q = DiagonalGaussian(2, kl_weight=0.5, scale_factor=2.0)
    mean, logvar = torch.ones(3, 2, 4, 4), torch.zeros(3, 2, 4, 4)
    z = torch.cat([mean, logvar], 1)  # (B, 2D, h, w)
    out = q.train()(z)
    assert out.z_q.shape == (3, 2, 4, 4) and out.indices is None and out.counts is None
    assert out.extra["kl"].item() == pytest.approx(0.5 * 2 * 16)  # 0.5 * sum(mean^2) per image
    assert out.loss.item() == pytest.approx(0.5 * 16)  # times kl_weight
    assert not torch.equal(out.z_q, mean), "training samples the posterior"
    big = q(torch.cat([torch.zeros(1, 2, 64, 64), torch.full((1, 2, 64, 64), 2 * torch.log(torch.tensor(0.5)))], 1))
    assert big.z_q.std().item() == pytest.approx(0.5, rel=0.05)  # std = exp(logvar / 2)
    assert torch.equal(q.eval()(z).z_q, mean)
    tokens = q.encode(z, sample=False)
    assert tokens.shape == (3, 16, 2) and torch.equal(tokens, 2.0 * mean.flatten(2).transpose(1, 2))
    torch.testing.assert_close(q.indices_to_latent(tokens), mean)
    assert q(torch.cat([torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4)], 1)).extra["kl"] == 0


def test_dead_code_restart_revives_unused_codes():
    torch.manual_seed(0)
    book = Codebook(16, 2, l2_norm=False, ema=False, dead_code_steps=2)
    book.weight.data[:4] = torch.randn(4, 2) * 0.1
    book.weight.data[4:] = 100 + torch.randn(12, 2)  # far from the data: never chosen
    vq = VectorQuantizer(16, 2, l2_norm=False, dead_code_steps=2)
    vq.codebook = book
    z = torch.randn(4, 2, 8, 8)  # 256 inputs near the origin
    first = vq.train()(z)
    assert int((first.counts > 0).sum()) <= 4 and first.extra["restarted_codes"] == 0
    second = vq(z)  # the 12 far codes have now been unused for 2 steps
    assert second.extra["restarted_codes"] == 12
    assert book.weight[4:].abs().max() < 10, "restarted codes sit on encoder outputs"
    after = vq.eval()(z)
    assert int((after.counts > 0).sum()) > 8, "revived codes are used"


def test_ema_codebook_moves_toward_its_inputs():
    vq = VectorQuantizer(4, 2, l2_norm=False, ema=True, decay=0.5)
    vq.codebook.weight.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0], [-10.0, 10.0], [10.0, -10.0]]))
    vq.codebook.ema_sum.copy_(vq.codebook.weight)
    z = torch.full((1, 2, 2, 2), 1.0)  # every input at (1, 1): nearest code 0
    for _ in range(20):
        vq.train()(z)
    torch.testing.assert_close(vq.codebook.weight[0], torch.tensor([1.0, 1.0]), atol=1e-3, rtol=0)


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_quantizers_stay_fp32_under_bf16_autocast(quantizer):
    ae = tiny(quantizer).eval()
    seen = {}
    ae.quantizer.register_forward_hook(lambda m, inp, out: seen.update(inp=inp[0].dtype, out=out))
    x = images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ae(x)
        z = ae.quant_conv(ae.encoder(x))
    out = seen["out"]
    assert seen["inp"] == torch.bfloat16, "the encoder ran in bf16"
    assert out.z_q.dtype == torch.float32 and out.loss.dtype == torch.float32
    ref = ae.quantizer(z.float())  # the same bf16 latent, quantized outside autocast
    if out.indices is not None:
        first = out.indices if torch.is_tensor(out.indices) else torch.cat(out.indices, 1)
        second = ref.indices if torch.is_tensor(ref.indices) else torch.cat(ref.indices, 1)
        assert torch.equal(first, second)
    torch.testing.assert_close(out.z_q, ref.z_q, atol=0, rtol=0)


def test_image_size_must_divide_by_the_downsampling_factor():
    with pytest.raises(ValueError, match=r"image_size=18 is not divisible by the downsampling factor 4"):
        tiny("vq", image_size=18)


def test_presets_match_the_official_layouts():
    with torch.device("meta"):  # shapes only: nothing is allocated
        vq16 = Autoencoder(256, 3, "vq", preset="llamagen_vq16")
        var = Autoencoder(256, 3, "msvq", preset="var_msvq16")
        kl16 = Autoencoder(256, 3, "kl", preset="mar_kl16")
    assert vq16.downsample == 16 and vq16.grid_size == 16 and vq16.vocab_size == 16384 and vq16.latent_channels == 8
    # the parameter counts of LlamaGen's VQ_16, VAR's VQVAE(ch=160, z_channels=32) and MAR's AutoencoderKL(16), counted
    # on their code (their weights load into these presets: tests/test_released_weights.py)
    assert sum(p.numel() for p in vq16.parameters()) == 71_883_403
    assert var.scales == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16) and var.vocab_size == 4096 and var.latent_channels == 32
    assert sum(p.numel() for p in var.parameters()) == 108_948_355
    assert sum(p.numel() for p in kl16.parameters()) == 66_456_019 and kl16.latent_channels == 16


def test_patch_discriminator_output_size():
    for size, layers in [(64, 3), (16, 2), (32, 2)]:
        logits = PatchDiscriminator(3, 8, layers)(torch.zeros(1, 3, size, size))
        assert logits.shape[-1] == PatchDiscriminator.output_size(size, layers) >= 1


def random_lpips_weights(folder) -> None:
    """LPIPS files with the official key names and shapes, random values (real VGG weights are not shipped)."""
    g = torch.Generator().manual_seed(0)
    vgg, lin = {}, {}
    for convs, widths in zip(VGG_CONVS, VGG_WIDTHS):
        for j, idx in enumerate(convs):
            vgg[f"features.{idx}.weight"] = torch.randn(widths[j + 1], widths[j], 3, 3, generator=g) * 0.05
            vgg[f"features.{idx}.bias"] = torch.zeros(widths[j + 1])
    for k, c in enumerate(w[-1] for w in VGG_WIDTHS):
        lin[f"lin{k}.model.1.weight"] = torch.rand(1, c, 1, 1, generator=g)
    torch.save(vgg, folder / VGG_FILE)
    torch.save(lin, folder / LIN_FILE)


def test_lpips_mechanics_with_random_weights(tmp_path):
    random_lpips_weights(tmp_path)
    lpips = LPIPS(str(tmp_path))
    assert lpips.state_dict() == {}, "the weights stay out of checkpoints"
    a, b = images(2, 16), images(2, 16).flip(-1)
    b.requires_grad_(True)
    d = lpips(a, b)
    assert d.shape == (2,) and (d > 0).all() and torch.allclose(lpips(a, a), torch.zeros(2), atol=1e-6)
    torch.testing.assert_close(lpips(b, a), d)
    d.sum().backward()
    assert b.grad.abs().sum() > 0
    assert lpips(a[:, :1], b[:, :1]).shape == (2,)  # grey images are repeated to RGB


def test_lpips_without_its_files_names_the_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"lpips_path=.* lacks \['vgg16-397923af.pth', 'vgg.pth'\]"):
        LPIPS(str(tmp_path))
