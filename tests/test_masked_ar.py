"""Masked AR (MaskGIT): the bidirectional core, the training masks and loss, the parallel decoder, bad inputs,
compiled vs eager, and the CLI (fit, golden curve, predict, DDP vs one process)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    CONFIGS,
    assert_golden_curve,
    assert_same_training_step,
    checkpoint_for_config,
    logged_scalars,
    run_dir_args,
    run_lit_ar,
)
from torch import nn

from lit_ar.cli import cli_main
from lit_ar.draws import Draws
from lit_ar.models.masked_ar import MaskedTransformer
from lit_ar.sampling import MASK_SCHEDULES, tokens_to_reveal
from lit_ar.systems.masked_ar import MaskedARSystem

# unit tests call training_step without a Trainer: self.log warns and does nothing
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")

V, G, L = 8, 4, 16  # vocabulary, grid side, tokens
TINY = dict(dim=32, depth=2, n_heads=2)


class StubTokenizer(nn.Module):
    """A parameter-free stand-in with the tokenizer interface: 16x16 grey images <-> a 4x4 grid of 8 grey levels."""

    vocab_size, grid_size, downsample, latent_channels = V, G, 4, 1
    scales, is_continuous, image_size, channels = None, False, 16, 1

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(images, 4).flatten(1)  # (B, L) in [-1, 1]
        return ((x + 1) / 2 * (V - 1e-3)).long().clamp(0, V - 1)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        x = (tokens.float() / (V - 1) * 2 - 1).view(-1, 1, G, G)
        return F.interpolate(x, scale_factor=4, mode="nearest")  # (B, 1, 16, 16)


def make_system(tokenizer: bool = False, **kwargs) -> MaskedARSystem:
    torch.manual_seed(0)
    base = dict(num_classes=3, image_size=16, channels=1, dropout=0.0, **TINY)
    if not tokenizer:
        base.update(vocab_size=V, grid_size=G)
    system = MaskedARSystem(**{**base, **kwargs})
    if tokenizer:
        return system
    system.tokenizer = StubTokenizer()
    return system


@pytest.fixture
def stub_tokenizer_ckpt(monkeypatch):
    """`tokenizer_ckpt` loads a StubTokenizer (the checks under test are the generator's, not the loader's)."""
    loaded = {}

    def load_tokenizer(path: str):
        return loaded.get(path, StubTokenizer())

    monkeypatch.setattr("lit_ar.systems.generator.load_tokenizer", load_tokenizer)
    return loaded


class FakeCore(nn.Module):
    """Stands in for MaskedTransformer with logits chosen by the test: `fn(tokens, labels) -> (B, L, V)`."""

    def __init__(self, fn):
        super().__init__()
        self.fn, self.calls = fn, []
        self.vocab_size, self.grid_size, self.num_tokens, self.mask_token = V, G, L, V
        self.blocks = nn.ModuleList()  # no weights to cast for sampling

    def forward(self, tokens, labels):
        return self.logits(self.hidden(tokens, labels))

    def hidden(self, tokens, labels):  # the chosen logits stand for the states, and the head passes them on
        self.calls.append((tokens.clone(), labels.clone()))
        return self.fn(tokens, labels)

    def logits(self, h):
        return h


# ---------------------------------------------------------------------------------------------------------------
# The core


@pytest.mark.parametrize("pos_embed", ["rope2d", "learned"])
def test_core_is_bidirectional_and_class_conditioned(pos_embed):
    torch.manual_seed(0)
    model = MaskedTransformer(V, G, num_classes=3, pos_embed=pos_embed, dropout=0.0, **TINY).eval()
    tokens = torch.randint(0, V + 1, (2, L))  # V is the mask token
    labels = torch.tensor([0, 3])  # 3 = the null class
    logits = model(tokens, labels)
    assert logits.shape == (2, L, V)
    later = tokens.clone()
    later[:, -1] = (later[:, -1] + 1) % (V + 1)
    # the first position sees the last one (no causal mask)
    assert not torch.allclose(model(later, labels)[:, 0], logits[:, 0])
    assert not torch.allclose(model(tokens, torch.tensor([1, 2]))[:, 0], logits[:, 0])
    assert model.tok_emb.num_embeddings == V + 1 and model.mask_token == V and model.cls_emb.num_embeddings == 4


def test_core_positions_matter():
    """Both position schemes break the permutation symmetry of attention: a shifted grid predicts differently."""
    for pos_embed in ("rope2d", "learned"):
        torch.manual_seed(0)
        model = MaskedTransformer(V, G, num_classes=3, pos_embed=pos_embed, dropout=0.0, **TINY).eval()
        tokens = torch.randint(0, V, (1, L))
        rolled = model(tokens.roll(1, dims=1), torch.tensor([0])).roll(-1, dims=1)
        assert not torch.allclose(rolled, model(tokens, torch.tensor([0])), atol=1e-4)


def test_presets_and_core_errors():
    with torch.device("meta"):  # shapes only: no memory, no init time
        base = MaskedTransformer.from_preset("base", 1024, 16, 1000)
    n = sum(p.numel() for p in base.parameters())
    assert len(base.blocks) == 24 and base.head.in_features == 768 and 160e6 < n < 190e6  # MaskGIT ~172M
    assert len(MaskedTransformer.from_preset("tiny", V, G, 3, depth=1).blocks) == 1
    with pytest.raises(ValueError, match=r"preset='huge' is not known; known presets: \('tiny', 'small', 'base'\)"):
        MaskedTransformer.from_preset("huge", V, G, 3)
    with pytest.raises(ValueError, match=r"dim/n_heads must be a multiple of 4; got dim=36, n_heads=6"):
        MaskedTransformer(V, G, 3, dim=36, n_heads=6)
    with pytest.raises(ValueError, match=r"pos_embed='sine' is not supported"):
        MaskedTransformer(V, G, 3, pos_embed="sine")


# ---------------------------------------------------------------------------------------------------------------
# Training: masks, loss, randomness


@pytest.mark.parametrize("schedule", MASK_SCHEDULES)
def test_training_mask_ratio_follows_the_schedule(schedule):
    system = make_system(mask_schedule=schedule)
    mask, global_masked = system.method.draw_mask(4000, L, Draws(1))
    n = mask.sum(1).double()
    assert n.min() >= 1 and n.max() <= L
    # E[ceil(L * ratio(u))] / L with u ~ U(0, 1), from a fine quadrature of the schedule
    u = (torch.arange(100000, dtype=torch.float64) + 0.5) / 100000
    from lit_ar.sampling import mask_ratio

    expected = torch.ceil(mask_ratio(schedule, u) * L).clamp(1, L).mean() / L
    assert float(n.mean() / L) == pytest.approx(float(expected), abs=0.015)
    assert int(global_masked) == int(n.sum())


def test_loss_counts_masked_positions_only():
    """A core that copies visible tokens perfectly and knows nothing under the mask: the loss is exactly log V."""

    def copy_visible(tokens, labels):
        visible = tokens != V
        return torch.where(visible[..., None], 50.0 * F.one_hot(tokens.clamp(max=V - 1), V).float(), 0.0)

    system = make_system(label_smoothing=0.0)
    system.model = FakeCore(copy_visible)
    batch = {"tokens": torch.randint(0, V, (8, L)), "label": torch.zeros(8, dtype=torch.long)}
    loss = system.training_step(batch, 0)
    assert float(loss) == pytest.approx(math.log(V), rel=1e-5)
    masked_input = system.model.calls[0][0] == V
    assert masked_input.any() and (~masked_input).any()


def test_label_smoothing_is_applied_on_masked_tokens():
    z = torch.arange(V, dtype=torch.float32)  # the same logits at every position

    system = make_system(label_smoothing=0.2, class_dropout=0.0)
    system.model = FakeCore(lambda tokens, labels: z.expand(*tokens.shape, V))
    tokens = torch.randint(0, V, (4, L))
    loss = system.training_step({"tokens": tokens, "label": torch.zeros(4, dtype=torch.long)}, 0)
    masked = system.model.calls[0][0] == V
    logp = z.log_softmax(-1)
    expected = (0.8 * -logp[tokens[masked]] + 0.2 * -logp.mean()).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_class_dropout_uses_the_null_class():
    system = make_system(class_dropout=0.5)
    system.model = FakeCore(lambda tokens, labels: torch.zeros(*tokens.shape, V))
    system.training_step({"tokens": torch.randint(0, V, (400, L)), "label": torch.zeros(400, dtype=torch.long)}, 0)
    labels = system.model.calls[0][1]
    assert set(labels.tolist()) == {0, 3} and 0.4 < float((labels == 3).float().mean()) < 0.6


def test_training_randomness_is_per_global_sample():
    """Rank r of 2 at batch B draws exactly the global samples r, r+2, ... of one process at batch 2B, so the
    masks, mask counts and class dropout of a sample do not depend on the number of devices."""
    system, labels = make_system(class_dropout=0.5), torch.zeros(6, dtype=torch.long)

    def draw(world: int, rank: int, batch: int):
        draws = Draws.for_step(7, "train", 0, 0, world=world, rank=rank)
        dropped = system.training_labels(labels[:batch], draws)
        return (dropped, *system.method.draw_mask(batch, L, draws))

    whole = draw(1, 0, 6)
    for rank in (0, 1):
        part = draw(2, rank, 3)
        assert torch.equal(part[0], whole[0][rank::2]) and torch.equal(part[1], whole[1][rank::2])
        assert int(part[2]) == int(whole[2])


def test_training_step_encodes_images_and_validation_logs_token_accuracy():
    system = make_system()
    images = torch.rand(4, 1, 16, 16) * 2 - 1
    loss = system.training_step({"image": images, "label": torch.tensor([0, 1, 2, 0])}, 0)
    assert loss.requires_grad and math.isfinite(float(loss.detach()))
    system.eval()
    with torch.no_grad():  # as Lightning runs it
        terms = system.validation_step({"image": images, "label": torch.tensor([0, 1, 2, 0])}, 0)
    acc = float(terms["token_acc"])
    assert 0.0 <= acc <= 1.0 and math.isfinite(float(terms["loss"]))
    with pytest.raises(ValueError, match=r"expected tokens of shape \(B, 16\) for grid_size=4, got \(4, 9\)"):
        system.training_step({"tokens": torch.zeros(4, 9, dtype=torch.long), "label": torch.zeros(4).long()}, 0)
    fresh = make_system()
    with pytest.raises(ValueError, match=r"token ids from 0 to 8 fall outside the vocabulary \[0, 8\)"):
        fresh.training_step({"tokens": torch.arange(2 * L).view(2, L) % (V + 1), "label": torch.zeros(2).long()}, 0)


# ---------------------------------------------------------------------------------------------------------------
# Sampling


def check_trace(trace: dict, counts: list[int], tokens: torch.Tensor) -> None:
    masked, grids = trace["masked"], trace["tokens"]  # (S+1, B, L)
    assert masked.shape[0] == len(counts) + 1
    assert masked[0].all() and not masked[-1].any(), "all masked at the start, all revealed after the last step"
    assert (masked[1:] <= masked[:-1]).all(), "a revealed token is never masked again"
    revealed_per_step = masked[:-1].sum(-1) - masked[1:].sum(-1)  # (S, B)
    assert (revealed_per_step == torch.tensor(counts)[:, None]).all(), "each step reveals what the schedule says"
    assert ((grids == V) == masked).all(), "masked positions hold the mask token, revealed ones a code"
    for s in range(1, len(grids)):  # once revealed, a token keeps its value
        was = ~masked[s - 1]
        assert torch.equal(grids[s][was], grids[s - 1][was])
    assert torch.equal(grids[-1], tokens) and tokens.max() < V


@pytest.mark.parametrize("order", ["confidence", "random"])
@pytest.mark.parametrize("schedule", MASK_SCHEDULES)
def test_every_schedule_reveals_all_tokens_once(schedule, order):
    system = make_system()
    system.train()
    labels = torch.tensor([0, 1, 2])
    for steps in (1, 5, L):
        g = torch.Generator().manual_seed(steps)
        tokens, trace = system.generate(labels, steps=steps, mask_schedule=schedule, order=order, generator=g,
                                             cfg=2.0, return_trace=True)  # fmt: skip
        counts = tokens_to_reveal(schedule, L, steps)
        check_trace(trace, counts, tokens)
        if steps == L:
            assert counts == [1] * L and (trace["masked"][:-1].sum(-1) - trace["masked"][1:].sum(-1) == 1).all()
    assert system.model.training, "sampling runs in eval mode and restores the training mode"


def test_same_seed_same_samples_and_other_seed_other_samples():
    system = make_system()
    labels = torch.tensor([0, 1, 2, 0])

    def run(seed, **kw):
        return system.sample(labels, generator=torch.Generator().manual_seed(seed), cfg=1.5, top_p=0.9, **kw)

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (4, 1, 16, 16) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(run(3, order="random"), run(3, order="random"))


def test_confidence_order_reveals_the_most_confident_and_noise_anneals():
    """Position j's logits peak with height j: without Gumbel noise the most confident (last) positions come
    first; with strong noise at the first step the choice is no longer the confidence order."""
    height = torch.arange(L, dtype=torch.float32)  # p(code 0) = e^j / (e^j + 7): distinct in fp32 up to j = 15
    system = make_system()
    system.model = FakeCore(lambda tokens, labels: (height[:, None] * F.one_hot(torch.zeros(L).long(), V))
                            .expand(tokens.shape[0], L, V))  # fmt: skip
    _, trace = system.generate(torch.tensor([0]), steps=4, choice_temperature=0.0,
                                    generator=torch.Generator().manual_seed(0), return_trace=True)  # fmt: skip
    first = torch.nonzero(~trace["masked"][1, 0]).flatten().tolist()
    k = tokens_to_reveal("cosine", L, 4)[0]
    assert first == list(range(L - k, L))
    _, noisy = system.generate(torch.tensor([0]), steps=4, choice_temperature=1000.0,
                                    generator=torch.Generator().manual_seed(0), return_trace=True)  # fmt: skip
    assert torch.nonzero(~noisy["masked"][1, 0]).flatten().tolist() != first


def test_random_order_does_not_depend_on_the_model():
    """MAR order: the positions revealed at each step come from the seeded permutation alone."""
    a, b = make_system(), make_system()
    torch.manual_seed(1)
    b.model.apply(b.model._init_weights)  # other weights
    kw = dict(steps=6, order="random", return_trace=True)
    ta, tra = a.generate(torch.tensor([0, 1]), generator=torch.Generator().manual_seed(5), **kw)
    tb, trb = b.generate(torch.tensor([0, 1]), generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(tra["masked"], trb["masked"]) and not torch.equal(ta, tb)


def test_top_k_one_with_no_choice_noise_is_deterministic():
    system = make_system()
    kw = dict(steps=4, choice_temperature=0.0)
    runs = [system.generate(torch.tensor([0, 1]), top_k=1, generator=torch.Generator().manual_seed(s), **kw)
            for s in range(3)]  # fmt: skip
    assert all(torch.equal(r, runs[0]) for r in runs)
    top_p = system.generate(torch.tensor([0, 1]), top_p=1e-6, generator=torch.Generator().manual_seed(9), **kw)
    assert torch.equal(top_p, runs[0])


@pytest.mark.parametrize("schedule", ["constant", "linear", "interval"])
def test_cfg_doubles_the_batch_and_follows_its_schedule_over_the_revealed_fraction(schedule):
    """Conditional logits favour code 1 a little, unconditional ones strongly; guided logit of code 1 at scale w is
    3.5 - 2.5 w. Constant w=3 always picks code 0; linear w = 1 + 2p picks code 1 while p = revealed/L < 0.2;
    interval (0, 0.15) guides (code 0) while p <= 0.15 and then samples the conditional logits (code 1)."""

    def logits(tokens, labels):
        out = torch.zeros(*tokens.shape, V)
        out[..., 1] = torch.where(labels == 3, 3.5, 1.0)[:, None]
        out[..., 2:] = -1e4
        return out

    system = make_system()
    system.model = FakeCore(logits)
    tokens, trace = system.generate(torch.tensor([0, 2]), cfg=3.0, cfg_schedule=schedule, steps=L,
                                    cfg_interval=(0.0, 0.15), temperature=1e-3,
                                    generator=torch.Generator().manual_seed(0), return_trace=True)  # fmt: skip
    toks, labels = system.model.calls[0]
    assert toks.shape == (4, L) and labels.tolist() == [0, 2, 3, 3]
    order = (trace["masked"][:-1] & ~trace["masked"][1:]).float().argmax(0)  # (B, L) step revealing each token
    expected = {  # the step s that revealed a token had p = (s + 1) / 16
        "constant": torch.zeros_like(tokens),
        "linear": (order < 3).long(),
        "interval": (order >= 2).long(),
    }[schedule]
    assert torch.equal(tokens, expected)


def test_sampling_bad_inputs_are_refused_before_any_work():
    system = make_system()
    labels = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"steps=0 must be between 1 and the number of tokens \(16\)"):
        system.sample(labels, steps=0)
    with pytest.raises(ValueError, match=r"steps=17 must be between 1 and the number of tokens \(16\)"):
        system.sample(labels, steps=17)
    with pytest.raises(ValueError, match=r"steps=2.5 must be an integer"):
        system.sample(labels, steps=2.5)
    with pytest.raises(ValueError, match=r"mask_schedule='square' is not known; known schedules: \('cosine', "
                                         r"'arccos', 'linear', 'power', 'sigmoid'\)"):  # fmt: skip
        system.sample(labels, mask_schedule="square")
    with pytest.raises(ValueError, match=r"order='raster' is not known; known orders: \('confidence', 'random'\)"):
        system.sample(labels, order="raster")
    with pytest.raises(ValueError, match=r"choice_temperature=-1 must be >= 0"):
        system.sample(labels, choice_temperature=-1)
    with pytest.raises(ValueError, match=r"cfg_schedule='cubic' is not known"):
        system.sample(labels, cfg=2.0, cfg_schedule="cubic")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\) for num_classes=3; got values from 0 to 7"):
        system.sample(torch.tensor([0, 7]))
    with pytest.raises(ValueError, match=r"top_p=1.5 must be in \(0, 1\]"):
        system.sample(labels, top_p=1.5)
    with pytest.raises(ValueError, match=r"labels must be a 1D integer tensor of class indices; got torch.int64 "
                                         r"\(2, 1\)"):  # fmt: skip
        system.sample(labels[:, None])
    with pytest.raises(ValueError, match=r"labels must be a 1D integer tensor of class indices; got torch.float32"):
        system.sample(labels.float())
    g = torch.Generator
    int32 = system.generate(labels.int(), cfg=2.0, generator=g().manual_seed(0))  # any integer dtype samples alike
    torch.testing.assert_close(int32, system.generate(labels, cfg=2.0, generator=g().manual_seed(0)))
    with pytest.raises(ValueError, match=r"cfg_interval=\(0.8, 0.2\)"):
        system.sample(labels, cfg=2.0, cfg_schedule="interval", cfg_interval=(0.8, 0.2))
    with pytest.raises(ValueError, match=r"cfg=2.0 asks for classifier-free guidance, .*class_dropout=0"):
        make_system(class_dropout=0.0).sample(labels, cfg=2.0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):  # no null class without class dropout
        make_system(class_dropout=0.0).sample(torch.tensor([3]))
    no_tokenizer = make_system()
    no_tokenizer.tokenizer = None
    with pytest.raises(ValueError, match=r"sample\(\) decodes with the tokenizer: set model.init_args.tokenizer_ckpt"):
        no_tokenizer.sample(labels)


def test_system_settings_are_checked(stub_tokenizer_ckpt):
    with pytest.raises(ValueError, match=r"model.init_args.mask_schedule='square' is not known; known schedules"):
        make_system(mask_schedule="square")
    with pytest.raises(ValueError, match=r"model.init_args.preset='huge' is not known"):
        make_system(preset="huge")
    with pytest.raises(ValueError, match=r"model.init_args.label_smoothing=1.0 must be in \[0, 1\)"):
        make_system(label_smoothing=1.0)
    with pytest.raises(ValueError, match=r"tokenizer_ckpt is not set, so model.init_args.vocab_size and .*grid_size"):
        make_system(tokenizer=True)
    # with a tokenizer the vocabulary and grid come from it, and explicit values must agree with it
    system = make_system(tokenizer=True, tokenizer_ckpt="tok.ckpt")
    assert (system.model.vocab_size, system.model.grid_size) == (V, G)
    with pytest.raises(ValueError, match=r"model.init_args.vocab_size=16 differs from the tokenizer's vocab_size=8"):
        make_system(tokenizer=True, tokenizer_ckpt="tok.ckpt", vocab_size=16)
    with pytest.raises(ValueError, match=r"model.init_args.grid_size=8 differs from the tokenizer's grid_size=4"):
        make_system(tokenizer=True, tokenizer_ckpt="tok.ckpt", grid_size=8)
    with pytest.raises(ValueError, match=r"data.image_size=32 differs from the tokenizer's image size 16"):
        make_system(tokenizer=True, tokenizer_ckpt="tok.ckpt", image_size=32)
    with pytest.raises(ValueError, match=r"data.channels=3 differs from the tokenizer's channels 1"):
        make_system(tokenizer=True, tokenizer_ckpt="tok.ckpt", channels=3)
    continuous = StubTokenizer()
    continuous.is_continuous, continuous.vocab_size = True, None
    stub_tokenizer_ckpt["kl.ckpt"] = continuous
    with pytest.raises(ValueError, match=r"tokenizer_ckpt: MaskedARSystem models discrete .* is continuous"):
        make_system(tokenizer=True, tokenizer_ckpt="kl.ckpt")
    multiscale = StubTokenizer()
    multiscale.scales = (1, 2, 4)
    stub_tokenizer_ckpt["msvq.ckpt"] = multiscale
    with pytest.raises(ValueError, match=r"tokenizer_ckpt='msvq.ckpt' is a multi-scale tokenizer"):
        make_system(tokenizer=True, tokenizer_ckpt="msvq.ckpt")


# ---------------------------------------------------------------------------------------------------------------
# Compiled vs eager


@pytest.mark.slow
def test_compiled_blocks_match_eager():
    eager, compiled = make_system(), make_system(compile=True)
    compiled.configure_model()  # where `compile` applies (the Trainer calls it)
    compiled.load_state_dict(eager.state_dict())
    assert set(compiled.state_dict()) == set(eager.state_dict()), "in-place compile keeps checkpoint keys"
    batch = {"tokens": torch.randint(0, V, (4, L)), "label": torch.tensor([0, 1, 2, 3])}
    assert_same_training_step(eager, compiled, batch, batch_idx=3)
    kw = dict(steps=4, cfg=2.0, return_trace=True)
    te, tre = eager.generate(torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0), **kw)
    tc, trc = compiled.generate(torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(tc, te) and torch.equal(trc["masked"], tre["masked"])


# ---------------------------------------------------------------------------------------------------------------
# The CLI, on the debug vq tokenizer

DEBUG = CONFIGS / "debug" / "masked.yaml"
GOLDEN = Path(__file__).parent / "golden" / "masked.json"


@pytest.fixture(scope="session")
def trained_debug(checkpoints_root, debug_tokenizer) -> Path:
    """configs/debug/masked.yaml trained through `lit_ar fit` once per session; its run folder holds the logs."""
    return checkpoint_for_config(DEBUG, checkpoints_root, train=True,
                                 extra=["--model.init_args.tokenizer_ckpt", str(debug_tokenizer)])  # fmt: skip


def test_debug_config_trains_its_loss_falls_and_follows_the_golden_curve(trained_debug):
    """The first 10 logged train/loss values of configs/debug/masked.yaml. After an intended change, regenerate with
    `LIT_AR_UPDATE_GOLDEN=1 pytest tests/test_masked_ar.py -k golden` and say why in the commit."""
    run_dir = trained_debug.parent.parent
    loss = logged_scalars(run_dir, "train/loss")
    assert len(loss) >= 10 and sum(loss[-3:]) < sum(loss[:3]) - 0.3, f"the loss falls: {loss}"
    acc = logged_scalars(run_dir, "val/token_acc")
    assert logged_scalars(run_dir, "val/loss") and acc and 0.0 < acc[-1] <= 1.0
    assert_golden_curve(GOLDEN, loss[:10], config="configs/debug/masked.yaml")


def test_predict_writes_samples_and_a_grid(trained_debug, debug_tokenizer, tmp_path):
    cli_main(["predict", "--config", str(DEBUG), *run_dir_args(tmp_path), "--model.init_args.tokenizer_ckpt",
              str(debug_tokenizer), "--ckpt_path", str(trained_debug)])  # fmt: skip
    samples = np.load(tmp_path / "samples.npz")
    assert samples["images"].shape == (20, 16, 16, 3) and samples["images"].dtype == np.uint8
    assert samples["labels"].tolist() == [c for c in range(10) for _ in range(2)]
    assert (tmp_path / "grid.png").is_file()


def test_a_trained_checkpoint_samples_the_same_images_for_the_same_seed(trained_debug):
    system = MaskedARSystem.load_from_checkpoint(trained_debug, weights_only=True)
    labels = torch.arange(4)
    kw = dict(cfg=2.0, top_k=16, steps=4, cfg_schedule="linear")
    a = system.sample(labels, generator=torch.Generator().manual_seed(7), **kw)
    b = system.sample(labels, generator=torch.Generator().manual_seed(7), **kw)
    c = system.sample(labels, generator=torch.Generator().manual_seed(8), **kw)
    assert a.shape == (4, 3, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)


def test_training_from_a_token_cache_equals_training_from_images(debug_tokenizer, tmp_path):
    """The cache holds what the tokenizer encodes (variant 0 = the unflipped image without hflip): same loss curve."""
    from lit_ar.data.datamodule import ImageDataModule
    from lit_ar.data.token_cache import write_token_cache

    data = ImageDataModule(dataset="shapes", image_size=16, num_train=64, num_val=16, batch_size=16)
    cache = write_token_cache(str(debug_tokenizer), str(tmp_path / "cache"), data, hflip=False, batch_size=32)
    common = ["fit", "--config", str(DEBUG), "--model.init_args.tokenizer_ckpt", str(debug_tokenizer),
              "--data.num_train", "64", "--data.num_val", "16", "--trainer.max_steps", "4",
              "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "0"]  # fmt: skip
    cli_main([*common, *run_dir_args(tmp_path / "images")])
    cli_main([*common, *run_dir_args(tmp_path / "tokens"), "--data.token_cache", str(cache)])
    from_images = logged_scalars(tmp_path / "images", "train/loss")
    from_tokens = logged_scalars(tmp_path / "tokens", "train/loss")
    assert len(from_images) == 4 and from_tokens == from_images


def test_help_lists_the_family_and_the_base_settings(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--model.help", "lit_ar.systems.MaskedARSystem"])
    out = " ".join(capsys.readouterr().out.split())
    assert "MaskGIT: 24 layers" in out and "mask_schedule" in out and "tokenizer_ckpt" in out


@pytest.mark.slow
def test_ddp_two_processes_agree_with_one(tmp_path, debug_tokenizer):
    """Class dropout and the masks are drawn per global sample (the step's Draws), and the loss is normalised by
    the global masked-token count, so 2 gloo processes at batch 8 train exactly like 1 process at batch 16 (the
    debug config turns nn.Dropout off: its masks come from each process's own generator)."""
    common = ["fit", "--config", str(DEBUG), "--model.init_args.tokenizer_ckpt", str(debug_tokenizer),
              "--trainer.max_steps", "8", "--data.shuffle", "false", "--trainer.log_every_n_steps", "1",
              "--trainer.limit_val_batches", "0"]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    run_lit_ar([*common, *run_dir_args(one), "--data.batch_size", "16", "--trainer.devices", "1"])
    run_lit_ar([*common, *run_dir_args(two), "--data.batch_size", "8", "--trainer.devices", "2",
                "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"])  # fmt: skip
    loss1, loss2 = logged_scalars(one, "train/loss"), logged_scalars(two, "train/loss")
    assert len(loss1) == len(loss2) == 8 and sum(loss1[-3:]) < sum(loss1[:3])
    torch.testing.assert_close(torch.tensor(loss2), torch.tensor(loss1), rtol=2e-3, atol=1e-5)
