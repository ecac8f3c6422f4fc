"""The flow head: samplers against an exact Gaussian velocity field, CFG in flow time, learning a 2D mixture of
Gaussians, fp32 numerics under bf16 autocast, MAR-B head size, and its bad inputs."""

import pytest
import torch

from lit_ar.models.flow_head import FlowHead, TimeEmbedding, flow_loss, head_velocity_fn, sample_flow


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops gain nothing from threads, and on a shared 2-core machine two OpenMP threads can wait on each
    other for most of every op: run these tests single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gaussian_velocity(mu: torch.Tensor, sigma: float):
    """The exact velocity E[x1 - x0 | x_t = x] of the linear path from N(0, I) to N(mu, sigma^2 I):
    x_t = m_t + s_t z with m_t = t mu, s_t^2 = t^2 sigma^2 + (1 - t)^2, so v = m_t' + (s_t' / s_t) (x - m_t)."""

    def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t[:, None].double()
        s2 = t**2 * sigma**2 + (1 - t) ** 2
        return (mu + (t * sigma**2 - (1 - t)) / s2 * (x.double() - t * mu)).float()

    return v


def unguided(v):
    return lambda x, t, guided: v(x, t)


MU, SIGMA = torch.tensor([1.5, -0.5, 3.0]), 0.4


def test_ode_with_the_exact_gaussian_velocity_lands_on_the_target():
    noise = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    exact = MU + SIGMA * noise  # the flow map of the Gaussian path sends z to mu + sigma z
    v = unguided(gaussian_velocity(MU, SIGMA))
    errors = {}
    for sampler in ("euler", "heun"):
        for steps in (8, 16, 64):
            x = sample_flow(v, noise, steps, sampler)
            assert x.dtype == torch.float32
            errors[sampler, steps] = (x - exact).abs().max().item()
    # Heun's last step is Euler (no velocity read at t = 1): a first-order step of size dt, so 8e-4 at 64 steps
    assert errors["heun", 64] < 1e-3 and errors["euler", 64] < 5e-2
    assert errors["euler", 16] / errors["euler", 64] > 3.0, f"Euler converges at first order: {errors}"
    assert errors["heun", 16] / errors["heun", 64] > 10.0, f"Heun converges at second order: {errors}"
    assert errors["heun", 16] < errors["euler", 64]


def test_heun_never_reads_the_velocity_at_the_data_end():
    # the true field (E[x1 | x] - x) / (1 - t) is singular at t = 1; N Heun steps read it 2N - 1 times, all at t < 1
    times = []

    def velocity(x, t, guided):
        times.append(t[0].item())
        return torch.zeros_like(x)

    sample_flow(velocity, torch.zeros(2, 3), 4, "heun")
    assert len(times) == 7 and max(times) == 0.75 and times == sorted(times)


def test_sde_with_the_exact_velocity_has_the_target_law():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(5000, 3, generator=g)
    x = sample_flow(unguided(gaussian_velocity(MU, SIGMA)), noise, 100, "euler_maruyama", generator=g)
    torch.testing.assert_close(x.mean(0), MU, atol=0.02, rtol=0)
    torch.testing.assert_close(x.std(0), torch.full((3,), SIGMA), atol=0.02, rtol=0)
    # the SDE's own noise is drawn from the generator: the same seed gives the same samples
    g2 = torch.Generator().manual_seed(0)
    y = sample_flow(unguided(gaussian_velocity(MU, SIGMA)), torch.randn(5000, 3, generator=g2), 100,
                    "euler_maruyama", generator=g2)  # fmt: skip
    assert torch.equal(x, y)


def test_cfg_in_flow_time_and_the_guidance_interval():
    """Guiding N(mu_c, s^2) against N(mu_u, s^2) with scale w is the exact flow to N(mu_u + w (mu_c - mu_u), s^2)
    (the velocity is affine in mu); outside the guidance interval the conditional velocity is used alone."""
    mu_c, mu_u, w = torch.tensor([1.0, 2.0]), torch.tensor([0.0, -1.0]), 3.0
    vc, vu = gaussian_velocity(mu_c, SIGMA), gaussian_velocity(mu_u, SIGMA)

    def velocity(x, t, guided):
        return torch.cat([vc(x, t), vu(x, t)]) if guided else vc(x, t)

    noise = torch.randn(32, 2, generator=torch.Generator().manual_seed(1))
    guided = sample_flow(velocity, noise, 128, "heun", cfg=w)
    torch.testing.assert_close(guided, mu_u + w * (mu_c - mu_u) + SIGMA * noise, atol=2e-4, rtol=0)
    # an interval holding none of the 4 Euler step times (0, .25, .5, .75) is no guidance at all
    assert torch.equal(sample_flow(velocity, noise, 4, cfg=w, guidance_interval=(0.8, 1.0)),
                       sample_flow(velocity, noise, 4, cfg=1.0))  # fmt: skip
    partly = sample_flow(velocity, noise, 4, cfg=w, guidance_interval=(0.4, 1.0))
    assert not torch.equal(partly, sample_flow(velocity, noise, 4, cfg=1.0))
    assert not torch.equal(partly, sample_flow(velocity, noise, 4, cfg=w))


MEANS = torch.tensor([[-2.0, 0.0], [2.0, 1.0]])
STDS = torch.tensor([[0.3, 0.6], [0.5, 0.25]])


@pytest.mark.parametrize("train_precision", ["fp32", "bf16"])
def test_flow_head_trained_on_a_2d_mixture_of_gaussians_samples_it_back(train_precision):
    """Trained in fp32, or under bf16 autocast as bf16-mixed trains it (its MLP in bf16), it samples the mixture
    back in either precision."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    head = FlowHead(token_dim=2, cond_dim=1, width=64, depth=2)
    opt = torch.optim.Adam(head.parameters(), lr=5e-3)
    steps, batch = 500, 512
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        comp = torch.randint(0, 2, (batch,), generator=g)
        x1 = MEANS[comp] + STDS[comp] * torch.randn(batch, 2, generator=g)  # (batch, 2)
        noise, t = torch.randn(batch, 2, generator=g), torch.rand(batch, generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=train_precision == "bf16"):
            loss = flow_loss(head, x1, torch.zeros(batch, 1), noise, t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    head.eval()
    n = 4000
    noise, sde_seed = torch.randn(n, 2, generator=g), 1
    for sampler in ("euler", "heun", "euler_maruyama"):
        samples = {}
        # under bf16 autocast the head's MLP runs in bf16 (as in bf16-mixed training), the updates in fp32
        for precision in ("fp32", "bf16"):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                x = sample_flow(head_velocity_fn(head, torch.zeros(n, 1)), noise, 32, sampler,
                                generator=torch.Generator().manual_seed(sde_seed))  # fmt: skip
            assert x.dtype == torch.float32
            samples[precision] = x
            comp = (x[:, 0] > 0).long()  # the two modes are split by x = 0
            for c in range(2):
                xs, what = x[comp == c], f"{sampler} ({precision}) mode {c}"
                assert abs(len(xs) / n - 0.5) < 0.05, f"{what} has weight {len(xs) / n}"
                torch.testing.assert_close(xs.mean(0), MEANS[c], atol=0.15, rtol=0, msg=f"{what} mean")
                ratio = xs.std(0) / STDS[c]
                assert ((ratio > 0.8) & (ratio < 1.2)).all(), f"{what}: std / true std = {ratio.tolist()}"
        assert not torch.equal(samples["fp32"], samples["bf16"]), "under bf16 autocast the head runs in bf16"


def test_time_embedding_and_loss_stay_fp32_under_bf16_autocast():
    """... while the MLP between them runs in bf16, in the loss as in sampling."""
    head = FlowHead(token_dim=4, cond_dim=8, width=16, depth=2)
    t = torch.tensor([0.0, 0.5001, 0.5002, 1.0])
    mlp_dtypes = []
    head.blocks[0].mlp.register_forward_hook(lambda m, i, out: mlp_dtypes.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = head.time_embed(t)
        loss = flow_loss(head, torch.randn(4, 4), torch.randn(4, 8), torch.randn(4, 4), t)
        x = sample_flow(head_velocity_fn(head, torch.randn(4, 8)), torch.randn(4, 4), 3)
    assert emb.dtype == loss.dtype == x.dtype == torch.float32
    assert mlp_dtypes == [torch.bfloat16] * 4  # the loss's call, then the sampler's 3
    assert not torch.equal(emb[1], emb[2]), "times 1e-4 apart stay distinct (bf16 would merge 500.1 and 500.2)"
    assert torch.isfinite(loss) and torch.isfinite(x).all()
    assert isinstance(head.time_embed, TimeEmbedding)


def test_the_condition_is_embedded_once_a_sampling_call_and_the_velocity_is_unchanged():
    """head_velocity_fn embeds the conditions once, not at every flow step, and the velocities equal the head's own
    with the raw conditions: guided and unguided steps (a guidance interval mixes both)."""
    torch.manual_seed(0)
    head = FlowHead(token_dim=4, cond_dim=8, width=16, depth=2)
    for p in head.parameters():  # off MAR's zero init, so the condition moves every output
        torch.nn.init.normal_(p, std=0.3)
    cond, uncond = torch.randn(5, 8), torch.randn(5, 8)
    calls = []
    head.cond_embed.register_forward_hook(lambda m, i, out: calls.append(out.shape[0]))
    velocity = head_velocity_fn(head, cond, uncond)
    assert calls == [10]  # conditional and null-class rows, together, once
    x, t = torch.randn(5, 4), torch.full((1,), 0.3)
    torch.testing.assert_close(velocity(x, t, False), head(x, t, cond), rtol=0, atol=1e-6)
    both = velocity(x, t, True)
    torch.testing.assert_close(both, head(torch.cat([x, x]), t, torch.cat([cond, uncond])), rtol=0, atol=1e-6)
    calls.clear()
    sample_flow(velocity, torch.randn(5, 4), 6, "heun", cfg=2.0, guidance_interval=(0.2, 0.8))
    assert calls == []  # 11 head evaluations, no more embeddings
    with pytest.raises(ValueError, match="cond or cond_embedding, exactly one"):
        head(x, t, cond, cond_embedding=head.cond_embed(cond))
    with pytest.raises(ValueError, match="cond or cond_embedding, exactly one"):
        head(x, t)


def test_head_has_mar_b_size():
    """MAR-B's SimpleMLPAdaLN (token 16, condition 768, width 1024, depth 6) has 35,749,920 parameters, of which
    16,400 predict the learned variance of its diffusion; the flow head predicts a velocity only."""
    with torch.device("meta"):
        head = FlowHead(token_dim=16, cond_dim=768, width=1024, depth=6)
    assert sum(p.numel() for p in head.parameters()) == 35_749_920 - (1024 * 16 + 16)


def test_bad_flow_sampling_inputs_are_refused():
    v = unguided(gaussian_velocity(MU, SIGMA))
    noise = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"flow_steps=0 must be an integer >= 1"):
        sample_flow(v, noise, 0)
    for interval in [(-0.1, 0.5), (0.6, 0.4), (0.0, 1.5)]:
        with pytest.raises(ValueError, match=r"guidance_interval=.* must satisfy 0 <= low <= high <= 1"):
            sample_flow(v, noise, 4, cfg=2.0, guidance_interval=interval)
    with pytest.raises(ValueError, match=r"sampler='rk4' is not known"):
        sample_flow(v, noise, 4, "rk4")
    head = FlowHead(token_dim=4, cond_dim=8, width=16, depth=1)
    with pytest.raises(ValueError, match=r"have width 3 but the flow head was built for token_dim=4"):
        flow_loss(head, torch.randn(2, 3), torch.randn(2, 8), torch.randn(2, 3), torch.rand(2))
