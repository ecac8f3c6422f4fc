"""Speculative Jacobi decoding (lit_ar/methods/speculative_jacobi.py) on a tiny causal model: a window of 1 is
sequential decoding draw for draw; greedy SJD gives the greedy raster tokens; at temperature 1 its samples follow the
model's exact distribution (enumerated) and a wrong acceptance rule fails the same test; each sequence accepts its
own tokens (not the batch's minimum); bad settings are refused by name; the CLI samples with it. LANTERN's relaxed
acceptance: its pooled neighbours, delta 0 equal to SJD, more tokens per call with delta, the tokenizer's codes."""

import itertools
import math

import numpy as np
import pytest
import torch

import lit_ar.methods.speculative_jacobi as sjd
from lit_ar.cli import cli_main
from lit_ar.methods.raster import RasterAR, RasterSampling
from lit_ar.models.categorical_head import CategoricalHead
from lit_ar.models.causal_ar import CausalTransformer
from tests.conftest import checkpoint_for_config, run_dir_args
from tests.test_causal_ar import DEBUG
from tests.test_methods import randomised


def tiny(vocab: int = 16, grid: int = 4, target_aware: bool = False, std: float | None = None):
    core = randomised(CausalTransformer(vocab, grid, 3, dim=32, depth=2, n_heads=2, target_aware=target_aware))
    if std is not None:  # a less peaked distribution, so that every sequence of the enumeration is seen
        torch.manual_seed(1)
        torch.nn.init.normal_(core.output.weight, std=std)
    return core, CategoricalHead(core), RasterAR()


def sample(method, core, head, labels, seed=0, stats=None, **settings):
    s = RasterSampling(**settings)
    return method.sample(core, head, labels, s.guidance(3), s, torch.Generator().manual_seed(seed), stats=stats)


@pytest.mark.parametrize("cfg", [1.0, 2.5])
@pytest.mark.parametrize("target_aware", [False, True])
def test_a_window_of_one_is_sequential_decoding_draw_for_draw(cfg, target_aware):
    core, head, method = tiny(target_aware=target_aware)
    labels = torch.tensor([0, 1, 2, 1])
    stats = {}
    assert torch.equal(sample(method, core, head, labels, cfg=cfg, top_k=8, stats=stats, decoding="sjd", window=1),
                       sample(method, core, head, labels, cfg=cfg, top_k=8))  # fmt: skip
    assert stats["model_calls"].tolist() == [16] * 4  # one call per token


@pytest.mark.parametrize("window", [2, 3, 8, 16])
@pytest.mark.parametrize("init", ["uniform", "last_token"])
def test_greedy_sjd_gives_the_greedy_raster_tokens(window, init):
    core, head, method = tiny()
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    for cfg in (1.0, 3.0):
        greedy = sample(method, core, head, labels, cfg=cfg, cfg_schedule="linear", top_k=1)
        stats = {}
        out = sample(method, core, head, labels, seed=5, stats=stats, cfg=cfg, cfg_schedule="linear", top_k=1,
                     decoding="sjd", window=window, jacobi_init=init)  # fmt: skip
        assert torch.equal(out, greedy)
        assert bool((stats["model_calls"] <= 16).all()) and bool((stats["model_calls"] >= 16 / window).all())


def test_greedy_sjd_partial_decoding_stops_at_num_tokens():
    core, head, method = tiny()
    labels = torch.tensor([0, 2])
    s = RasterSampling(top_k=1, decoding="sjd", window=4)
    out = method.sample(core, head, labels, s.guidance(3), s, num_tokens=5)
    assert torch.equal(out, sample(method, core, head, labels, top_k=1)[:, :5])


def test_each_sequence_accepts_its_own_tokens_not_the_batch_minimum():
    """Greedy with the deterministic `last_token` initialisation: a sequence's model calls in a batch are the calls it
    takes alone (the official code's batch minimum would give every sequence the slowest one's count)."""
    core, head, method = tiny()
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    settings = dict(top_k=1, decoding="sjd", window=6, jacobi_init="last_token")
    batch = {}
    sample(method, core, head, labels, stats=batch, **settings)
    alone = []
    for i in range(len(labels)):
        stats = {}
        sample(method, core, head, labels[i : i + 1], stats=stats, **settings)
        alone.append(int(stats["model_calls"]))
    assert batch["model_calls"].tolist() == alone
    assert len(set(alone)) > 1  # the sequences do take different numbers of calls
    assert batch["tokens_per_call"].tolist() == pytest.approx([16 / c for c in alone])


# -- the distribution at temperature 1, against exact enumeration ------------------------------------------------
V_ENUM, G_ENUM, N_SAMPLES = 3, 2, 10_000  # 3**4 = 81 sequences


def exact_distribution(core) -> torch.Tensor:
    """p(sequence) of all V**L sequences of class 0, in base-V order, from teacher-forced logits."""
    seqs = torch.tensor(list(itertools.product(range(V_ENUM), repeat=G_ENUM**2)))  # (V**L, L)
    with torch.no_grad():
        logp = core(seqs[:, :-1], torch.zeros(len(seqs), dtype=torch.long)).log_softmax(-1)  # (V**L, L, V)
    return logp.gather(-1, seqs[..., None])[..., 0].sum(1).exp()


def chi_square(samples: torch.Tensor, p: torch.Tensor) -> float:
    place = V_ENUM ** torch.arange(G_ENUM**2 - 1, -1, -1)
    counts = torch.bincount((samples * place).sum(1), minlength=len(p)).double()
    expected = len(samples) * p.double()
    return float(((counts - expected) ** 2 / expected).sum())


def chi_square_critical(df: int, z: float = 3.72) -> float:
    """Wilson-Hilferty: the chi-square quantile of df degrees of freedom at a standard-normal z (3.72: p = 1e-4)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_sjd_keeps_the_models_distribution_and_a_wrong_acceptance_rule_fails_the_test(monkeypatch):
    """10,000 samples of SJD at temperature 1 against the exact distribution of a 2x2 grid over 3 tokens (81
    sequences): the chi-square statistic is below its 1e-4 quantile, as sequential sampling's is, while SJD that
    ignores the drafts' distribution q (accepting with probability min(1, p)) lands far above it."""
    core, head, method = tiny(V_ENUM, G_ENUM, std=0.3)
    p = exact_distribution(core)
    labels = torch.zeros(N_SAMPLES, dtype=torch.long)
    critical = chi_square_critical(len(p) - 1)
    assert chi_square(sample(method, core, head, labels), p) < critical
    for window, init in ((4, "uniform"), (3, "last_token")):
        stats = {}
        out = sample(method, core, head, labels, stats=stats, decoding="sjd", window=window, jacobi_init=init)
        assert chi_square(out, p) < critical, (window, init)
        assert float(stats["model_calls"].float().mean()) < G_ENUM**2  # fewer calls than sequential's 4
    accept = sjd.accept_drafts
    monkeypatch.setattr(sjd, "accept_drafts", lambda p_, q, d, u, mass: accept(p_, torch.ones_like(q), d, u, mass))
    wrong = sample(method, core, head, labels, decoding="sjd", window=4)
    assert chi_square(wrong, p) > 10 * critical


def test_the_acceptance_rule_on_known_distributions():
    p = torch.tensor([[[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]])  # (1, 2, 3)
    q = torch.tensor([[[0.25, 0.25, 0.5], [0.5, 0.25, 0.25]]])
    # draft 0 at p/q = 2 (always), then draft 0 at p/q = 0.4: accepted when u < 0.4
    assert sjd.accept_drafts(p, q, torch.tensor([[0, 0]]), torch.tensor([[0.99, 0.39]])).tolist() == [2]
    assert sjd.accept_drafts(p, q, torch.tensor([[0, 0]]), torch.tensor([[0.99, 0.41]])).tolist() == [1]
    # a draft p gives 0 is never accepted, and nothing after a rejection is
    assert sjd.accept_drafts(p, q, torch.tensor([[2, 2]]), torch.tensor([[0.0, 0.0]])).tolist() == [0]


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(decoding="jacobi"), "decoding='jacobi' is not known; known: ('sequential', 'sjd', 'speculative')"),
        (dict(decoding="sjd", window=0), "window=0 must be >= 1"),
        (dict(decoding="sjd", jacobi_init="zeros"), "jacobi_init='zeros' is not known"),
        (dict(decoding="sjd", use_cache=False), "decoding='sjd' verifies its drafts on the KV cache"),
    ],
)
def test_bad_sjd_settings_are_refused_by_name(settings, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RasterSampling(**settings)


@pytest.fixture(scope="session")
def trained_causal(checkpoints_root, debug_tokenizer):
    """configs/debug/causal.yaml trained once per session (the run tests/test_causal_ar.py trains)."""
    return checkpoint_for_config(DEBUG, checkpoints_root, train=True,
                                 extra=["--model.init_args.tokenizer_ckpt", str(debug_tokenizer)])  # fmt: skip


def test_lit_ar_predict_samples_with_sjd(trained_causal, debug_tokenizer, tmp_path):
    """`lit_ar predict` with `decoding: sjd` in predict_kwargs: the greedy images equal sequential decoding's."""
    out = {}
    for decoding in ("sequential", "sjd"):
        run = tmp_path / decoding
        cli_main(["predict", "--config", str(DEBUG), *run_dir_args(run), "--model.init_args.tokenizer_ckpt",
                  str(debug_tokenizer), "--ckpt_path", str(trained_causal), "--model.init_args.predict_kwargs",
                  f"{{top_k: 1, decoding: {decoding}, window: 4}}"])  # fmt: skip
        out[decoding] = np.load(run / "samples.npz")["images"]
    assert out["sjd"].shape == (20, 16, 16, 3) and np.array_equal(out["sjd"], out["sequential"])


# -- LANTERN's relaxed acceptance ------------------------------------------------------------------------------------
def test_pooled_neighbours_take_the_nearest_run_within_delta():
    p = torch.tensor([[[0.5, 0.2, 0.2, 0.1]]])  # (1, 1, 4)
    neighbours = torch.tensor([[1, 2, 3], [0, 2, 3], [1, 3, 0], [2, 1, 0]])  # (V, k) nearest first
    near, pooled, mass = sjd.pooled_neighbours(p, torch.tensor([[0]]), neighbours, delta=0.3)
    assert near.tolist() == [[[1, 2, 3]]] and pooled.tolist() == [[[True, False, False]]]
    assert mass.flatten().tolist() == pytest.approx([0.2])
    mass_of_3 = sjd.pooled_neighbours(p, torch.tensor([[3]]), neighbours, delta=0.45)[2]  # 0.2 + 0.2 of codes 2, 1
    assert mass_of_3.flatten().tolist() == pytest.approx([0.4])
    # the relaxed test accepts a draft the strict one rejects: p(0) / q(0) = 0.5 / 0.9, plus 0.2 pooled
    q = torch.tensor([[[0.9, 0.05, 0.05, 0.0]]])
    u = torch.tensor([[0.7]])
    assert sjd.accept_drafts(p, q, torch.tensor([[0]]), u).tolist() == [0]
    assert sjd.accept_drafts(p, q, torch.tensor([[0]]), u, mass).tolist() == [1]


def test_latent_neighbours_are_the_nearest_codes_nearest_first():
    codes = torch.tensor([[0.0], [1.0], [3.0], [10.0]])
    assert sjd.LatentNeighbours(codes)(2).tolist() == [[1, 2], [0, 2], [1, 0], [2, 1]]
    assert sjd.LatentNeighbours(codes)(99).shape == (4, 3)  # capped at V - 1


def neighbours_of(core) -> sjd.LatentNeighbours:
    torch.manual_seed(3)
    return sjd.LatentNeighbours(torch.randn(core.vocab_size, 4))


@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_lantern_with_delta_zero_is_sjd_and_with_delta_accepts_more(cfg):
    core, head, method = tiny()
    labels = torch.arange(3).repeat(20)  # (60,)
    neighbours = neighbours_of(core)

    def run(**kw):
        s, stats = RasterSampling(cfg=cfg, decoding="sjd", window=6, **kw), {}
        out = method.sample(core, head, labels, s.guidance(3), s, torch.Generator().manual_seed(0), stats=stats,
                            neighbours=neighbours)  # fmt: skip
        return out, stats

    strict, strict_stats = run()
    relaxed0, _ = run(acceptance="lantern", lantern_delta=0.0, lantern_k=8)
    assert torch.equal(relaxed0, strict)
    relaxed, stats = run(acceptance="lantern", lantern_delta=0.3, lantern_k=8)
    assert stats["tvd_bound"] == 0.3
    assert float(stats["tokens_per_call"].mean()) > float(strict_stats["tokens_per_call"].mean())


def test_lantern_is_refused_where_it_has_no_codebook_or_no_sjd():
    with pytest.raises(ValueError, match="acceptance='lantern' relaxes speculative decoding's acceptance: set "
                                         "decoding='sjd'"):  # fmt: skip
        RasterSampling(acceptance="lantern")
    with pytest.raises(ValueError, match="lantern_delta=1.5 must be in"):
        RasterSampling(decoding="sjd", acceptance="lantern", lantern_delta=1.5)
    with pytest.raises(ValueError, match="lantern_k=0 must be >= 1"):
        RasterSampling(decoding="sjd", acceptance="lantern", lantern_k=0)
    core, head, method = tiny()
    with pytest.raises(ValueError, match="this generator has none: set model.init_args.tokenizer_ckpt"):
        sample(method, core, head, torch.tensor([0]), decoding="sjd", acceptance="lantern")


def test_lantern_samples_with_the_tokenizers_codebook(trained_causal):
    from lit_ar.systems.causal_ar import CausalARSystem
    from lit_ar.tokenizers import code_vectors

    system = CausalARSystem.load_from_checkpoint(trained_causal, weights_only=True)
    codes = code_vectors(system.tokenizer)
    assert codes.shape == (system.model.vocab_size, system.tokenizer.latent_channels)
    labels = torch.arange(10)
    stats = {}
    settings = dict(decoding="sjd", window=4, acceptance="lantern", lantern_k=16, lantern_delta=0.0)
    out = system.run_sampler(labels, torch.Generator().manual_seed(0), settings, stats=stats)
    strict = system.run_sampler(labels, torch.Generator().manual_seed(0), dict(decoding="sjd", window=4))
    assert torch.equal(out, strict) and stats["tvd_bound"] == 0.0
    assert system.latent_neighbours()(16).shape == (system.model.vocab_size, 16)
