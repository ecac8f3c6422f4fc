"""ARPG (lit_ar/models/arpg.py, lit_ar/methods/arpg.py): the shared keys and values, causal queries that see only the
tokens before them, cached parallel decoding equal to recomputing every key at every step, one token per step equal to
random-order sequential decoding (the full forward's greedy tokens), the step schedule, seeded sampling, bad settings
refused by name, and the CLI (fit, predict) and a compiled step equal to eager."""

import numpy as np
import pytest
import torch

from lit_ar.cli import cli_main
from lit_ar.draws import Draws
from lit_ar.methods.arpg import ARPG, ARPGSampling
from lit_ar.models.arpg import ARPGTransformer
from lit_ar.models.categorical_head import CategoricalHead
from lit_ar.systems.arpg import ARPGSystem
from tests.conftest import CONFIGS, run_dir_args
from tests.test_methods import randomised

V, G, NC = 16, 4, 3
DEBUG = CONFIGS / "debug" / "arpg.yaml"


def tiny():
    core = randomised(ARPGTransformer(V, G, NC, dim=32, depth=4, n_heads=2))
    return core, CategoricalHead(core), ARPG()


def sample(core, head, method, labels, seed=0, order=None, **settings):
    s = ARPGSampling(**settings)
    return method.sample(core, head, labels, s.guidance(NC), s, torch.Generator().manual_seed(seed), order=order)


def test_one_set_of_keys_and_values_serves_every_cross_block():
    core, _, _ = tiny()
    names = [n for n, _ in core.named_parameters()]
    assert sum(n.endswith("to_k.weight") for n in names) == 1 and sum(n.endswith("to_v.weight") for n in names) == 1
    assert len(core.self_layers) == len(core.cross_layers) == 2
    assert not any("cross_layers" in n and ("wqkv" in n or "to_k" in n) for n in names)  # queries only there


def test_a_query_sees_only_the_tokens_before_it_and_its_target():
    core, head, _ = tiny()
    g = torch.Generator().manual_seed(0)
    tokens, labels = torch.randint(0, V, (2, G * G - 1), generator=g), torch.tensor([0, 1])
    order = torch.rand(2, G * G, generator=g).argsort(-1)
    with torch.no_grad():
        a = core.hidden(tokens, labels, order)
        changed = tokens.clone()
        changed[:, 5] = (changed[:, 5] + 1) % V
        b = core.hidden(changed, labels, order)
    assert torch.equal(a[:, :6], b[:, :6]) and not torch.equal(a[:, 6:], b[:, 6:])  # token 5 is seen by query 6 on
    moved = order.clone()
    moved[:, [8, 9]] = moved[:, [9, 8]]  # query 8's target moves; queries before it see the same
    with torch.no_grad():
        c = core.hidden(tokens, labels, moved)
    assert torch.equal(a[:, :8], c[:, :8]) and not torch.equal(a[:, 8], c[:, 8])


@pytest.mark.parametrize("steps", [16, 7, 4, 1])
@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_cached_parallel_decoding_equals_recomputing_every_key(steps, cfg):
    core, head, method = tiny()
    labels = torch.tensor([0, 1, 2, 1])
    cached = sample(core, head, method, labels, cfg=cfg, steps=steps, top_k=8)
    assert torch.equal(cached, sample(core, head, method, labels, cfg=cfg, steps=steps, top_k=8, use_cache=False))
    assert cached.shape == (4, G * G)


def test_one_token_per_step_is_random_order_sequential_decoding():
    """Greedy, 16 steps on 16 tokens: every token is the argmax of the teacher-forced forward in the same order."""
    core, head, method = tiny()
    labels = torch.tensor([0, 1, 2, 1])
    order = torch.rand(4, G * G, generator=torch.Generator().manual_seed(5)).argsort(-1)
    out = sample(core, head, method, labels, order=order, steps=G * G, top_k=1)
    in_order = out.gather(1, order)
    with torch.no_grad():
        full = head.logits(core.hidden(in_order[:, :-1], labels, order))
    assert torch.equal(full.argmax(-1), in_order)


def test_sampling_is_seeded_and_the_training_order_is_the_steps_draw():
    core, head, method = tiny()
    labels = torch.zeros(4, dtype=torch.long)
    first, again, other = (sample(core, head, method, labels, seed, steps=4) for seed in (3, 3, 4))
    assert torch.equal(first, again) and not torch.equal(first, other)
    tokens = torch.randint(0, V, (4, G * G), generator=torch.Generator().manual_seed(0))
    loss = method.loss(core, head, tokens, labels, Draws(0))["loss"]
    assert torch.equal(loss, method.loss(core, head, tokens, labels, Draws(0))["loss"])
    assert not torch.equal(loss, method.loss(core, head, tokens, labels, Draws(1))["loss"])


def test_model_calls_are_the_steps():
    core, head, method = tiny()
    calls = []
    handle = core.self_layers[0].register_forward_hook(lambda *_: calls.append(1))
    sample(core, head, method, torch.tensor([0, 1]), steps=5, cfg=2.0)
    handle.remove()
    assert len(calls) == 5


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="schedule='zigzag' is not known; known schedules"):
        ARPGSampling(schedule="zigzag")
    with pytest.raises(ValueError, match="steps=0 must be >= 1"):
        ARPGSampling(steps=0)
    with pytest.raises(ValueError, match=r"model.init_args.predict_kwargs.steps=17: ARPG decodes the 16 tokens of a "
                                         r"4x4 grid in 1 to 16 steps"):  # fmt: skip
        ARPGSystem(vocab_size=V, grid_size=G, num_classes=NC, predict_kwargs={"steps": 17})
    system = ARPGSystem(vocab_size=V, grid_size=G, num_classes=NC)
    with pytest.raises(ValueError, match=r"sampling.steps=20: ARPG decodes the 16 tokens"):
        system.sample_tokens(torch.tensor([0]), steps=20)
    with pytest.raises(ValueError, match="depth=3: ARPG splits its blocks into two equal halves"):
        ARPGTransformer(V, G, NC, dim=32, depth=3, n_heads=2)


def test_lit_ar_fits_and_predicts_arpg(debug_tokenizer, tmp_path):
    common = ["--config", str(DEBUG), *run_dir_args(tmp_path), "--model.init_args.tokenizer_ckpt", str(debug_tokenizer)]
    cli = cli_main(["fit", *common, "--trainer.max_steps", "12", "--trainer.limit_val_batches", "1"])
    assert isinstance(cli.model, ARPGSystem)
    cli_main(["predict", *common, "--ckpt_path", str(tmp_path / "checkpoints" / "last.ckpt")])
    samples = np.load(tmp_path / "samples.npz")
    assert samples["images"].shape == (20, 16, 16, 3)


def test_compiled_blocks_train_and_sample_as_eager():
    torch.manual_seed(0)
    eager = ARPGSystem(vocab_size=V, grid_size=G, num_classes=NC, token_dropout=0.0, resid_dropout=0.0)
    compiled = ARPGSystem(vocab_size=V, grid_size=G, num_classes=NC, token_dropout=0.0, resid_dropout=0.0,
                          compile=True)  # fmt: skip
    compiled.load_state_dict(eager.state_dict())
    compiled.configure_model()
    randomised(eager.model)
    compiled.model.load_state_dict(eager.model.state_dict())
    batch = {"tokens": torch.randint(0, V, (4, G * G)), "label": torch.tensor([0, 1, 2, 0])}
    torch.testing.assert_close(compiled.loss(batch, Draws(0)), eager.loss(batch, Draws(0)), rtol=1e-5, atol=1e-5)
    labels = torch.tensor([0, 1])
    a = eager.sample_tokens(labels, torch.Generator().manual_seed(0), steps=4, top_k=1)
    b = compiled.sample_tokens(labels, torch.Generator().manual_seed(0), steps=4, top_k=1)
    assert torch.equal(a, b)


def test_rope_alone_cannot_tell_the_first_query_its_target_and_the_position_embedding_can():
    """ARPG's first query faces one key (the class), so its output is the same for every target position; lit_ar's
    query_position_embedding option tells it."""
    tokens, labels = torch.zeros(2, 0, dtype=torch.long), torch.tensor([0, 1])
    orders = [torch.arange(G * G).roll(-s).expand(2, -1) for s in (0, 5)]  # first targets 0 and 5
    for with_embedding in (False, True):
        core = randomised(ARPGTransformer(V, G, NC, dim=32, depth=4, n_heads=2,
                                          query_position_embedding=with_embedding))  # fmt: skip
        with torch.no_grad():
            a, b = (core.hidden(tokens, labels, order) for order in orders)  # (2, 1, C): query 0 only
        assert torch.equal(a, b) != with_embedding
