"""Causal AR (LlamaGen, RAR): LlamaGen's exact GPT-B layout, KV-cached decoding equals the full forward, RAR at r=0
equals raster, seeded sampling, compiled equals eager, every bad input, and the CLI (train, golden curve, predict,
DDP)."""

import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CONFIGS, assert_golden_curve, checkpoint_for_config, logged_scalars, run_dir_args, run_lit_ar
from torch import nn
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

from lit_ar.cli import cli_main
from lit_ar.models.categorical_head import head_cross_entropy
from lit_ar.models.causal_ar import PRESETS, CausalTransformer
from lit_ar.systems.causal_ar import CausalARSystem

V, G, NC = 32, 4, 3  # tiny vocab, 4x4 grid, 3 classes


def tiny_model(**kw) -> CausalTransformer:
    torch.manual_seed(0)
    model = CausalTransformer(V, G, NC, **{"dim": 32, "depth": 2, "n_heads": 2, **kw}).eval()
    with torch.no_grad():  # random weights everywhere (the output layer starts at zero)
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


class StubTokenizer(nn.Module):
    """The tokenizer interface with a fixed decode: a token's value becomes a flat patch of grey."""

    vocab_size, grid_size, downsample, image_size, channels = V, G, 4, 16, 3
    is_continuous, scales, latent_channels = False, None, 8

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        pooled = nn.functional.avg_pool2d(images.mean(1, keepdim=True), self.downsample)  # (B, 1, G, G)
        return ((pooled.flatten(1) + 1) / 2 * (V - 1)).round().long().clamp(0, V - 1)  # (B, L)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        grey = tokens.view(-1, 1, G, G).float() / (V - 1) * 2 - 1
        return nn.functional.interpolate(grey, scale_factor=self.downsample).expand(-1, self.channels, -1, -1)


def tiny_system(**kw) -> CausalARSystem:
    torch.manual_seed(0)
    system = CausalARSystem(**{"vocab_size": V, "grid_size": G, "num_classes": NC, "image_size": 16, "dim": 32,
                               "depth": 2, "n_heads": 2, **kw})  # fmt: skip
    with torch.no_grad():
        for p in system.model.parameters():
            p.normal_(0.0, 0.3)
    system.tokenizer = StubTokenizer()
    return system.eval()


def token_batch(B: int = 6, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"tokens": torch.randint(0, V, (B, G * G), generator=g), "label": torch.randint(0, NC, (B,), generator=g)}


# -- the model ---------------------------------------------------------------------------------------------------
def test_gpt_b_has_llamagen_layout_and_parameter_count():
    with torch.device("meta"):  # no memory, no init cost
        model = CausalTransformer(vocab_size=16384, grid_size=16, num_classes=1000, **PRESETS["GPT-B"])
    assert sum(p.numel() for p in model.parameters()) == 110_888_448
    assert model.cls_embedding.weight.shape == (1001, 768)  # + the null class
    assert model.layers[0].mlp.w1.weight.shape == (2048, 768)  # SwiGLU 2/3 * 4 * 768, multiple of 256
    assert model.layers[0].attn.wqkv.weight.shape == (3 * 768, 768)
    assert all("bias" not in name for name, _ in model.named_parameters())
    assert model.layers[0].norm1.eps == 1e-5 and model.output.weight.shape == (16384, 768)
    with torch.device("meta"):  # LlamaGen's GPT_3B (its released c2i_3B), counted on its code: 3,096,659,200
        gpt_3b = CausalTransformer(vocab_size=16384, grid_size=16, num_classes=1000, **PRESETS["GPT-3B"])
    assert sum(p.numel() for p in gpt_3b.parameters()) == 3_096_659_200


def test_output_layer_starts_at_zero_so_the_first_prediction_is_uniform():
    model = CausalTransformer(V, G, NC, dim=32, depth=1, n_heads=2)
    assert torch.equal(model.output.weight, torch.zeros_like(model.output.weight))
    logits = model(torch.randint(0, V, (2, 5)), torch.tensor([0, NC]))
    assert torch.equal(logits, torch.zeros(2, 6, V))


@pytest.mark.parametrize(
    "kw",
    [{}, {"cls_token_num": 3}, {"n_kv_heads": 1, "qk_norm": True}, {"target_aware": True, "cls_token_num": 2},
     {"prefix_rope": "zero"}],
    ids=["llamagen", "3-prefix", "gqa-qknorm", "rar", "zero-prefix-rope"],
)  # fmt: skip
def test_kv_cached_decoding_equals_the_full_forward_at_every_position(kw):
    model = tiny_model(**kw)
    tokens, labels = torch.randint(0, V, (3, G * G)), torch.tensor([0, 2, NC])
    full = model(tokens[:, :-1], labels)  # (B, L, V)
    model.setup_caches(3, torch.float32)
    cached = [model.prefill(labels)]
    for i in range(1, G * G):
        cached.append(model.decode_step(tokens[:, i - 1 : i], torch.tensor([model.cls_token_num + i - 1])))
    model.clear_caches()
    torch.testing.assert_close(torch.stack(cached, 1), full, rtol=1e-5, atol=1e-5)
    assert full.abs().max() > 0.5  # the comparison is between real, non-zero logits


def test_rar_with_the_identity_order_is_exactly_the_raster_forward():
    model = tiny_model(target_aware=True)
    tokens, labels = torch.randint(0, V, (3, G * G - 1)), torch.tensor([0, 1, NC])
    identity = torch.arange(G * G).expand(3, -1)
    assert torch.equal(model(tokens, labels, identity), model(tokens, labels))


def test_rar_without_target_embeddings_is_llamagen():
    rar, llamagen = tiny_model(target_aware=True), tiny_model()
    state = {k: v for k, v in rar.state_dict().items() if k != "target_pos.weight"}
    llamagen.load_state_dict(state)
    tokens, labels = torch.randint(0, V, (2, 9)), torch.tensor([0, 1])
    assert not torch.equal(rar(tokens, labels), llamagen(tokens, labels))  # the target embedding is used
    with torch.no_grad():
        rar.target_pos.weight.zero_()
    assert torch.equal(rar(tokens, labels), llamagen(tokens, labels))


def test_a_random_order_is_causal_in_that_order():
    model = tiny_model(target_aware=True)
    g = torch.Generator().manual_seed(1)
    order = torch.randperm(G * G, generator=g)[None]  # (1, L)
    tokens, labels = torch.randint(0, V, (1, G * G - 1), generator=g), torch.tensor([1])
    k = 6
    changed = tokens.clone()
    changed[0, k] = (tokens[0, k] + 1) % V
    a, b = model(tokens, labels, order), model(changed, labels, order)
    assert torch.equal(a[:, : k + 1], b[:, : k + 1])  # predictions 0..k do not see the k-th token of the order
    assert not torch.allclose(a[:, k + 1 :], b[:, k + 1 :])
    # the order matters: the same tokens placed at other grid positions give other predictions
    assert not torch.allclose(model(tokens, labels, order.flip(1)), a)


# -- the system: training --------------------------------------------------------------------------------------
def test_rar_ratio_anneals_from_one_to_zero():
    system = tiny_system(rar=True, rar_anneal_start=10, rar_anneal_end=30)
    assert [system.rar_ratio(s) for s in (0, 10, 20, 30, 100)] == [1.0, 1.0, 0.5, 0.0, 0.0]
    assert tiny_system().rar_ratio(0) == 0.0  # not RAR: always raster


def test_rar_training_at_r0_is_exactly_raster_training_and_at_r1_permutes():
    system = tiny_system(rar=True, rar_anneal_start=0, rar_anneal_end=1, class_dropout=0.0)
    batch = token_batch()
    raster = system.model(batch["tokens"][:, :-1], batch["label"])
    assert system.rar_ratio(5) == 0.0
    logits, targets = train_logits_at(system, batch, step=5)
    assert torch.equal(targets, batch["tokens"]) and torch.equal(logits, raster)
    logits, targets = train_logits_at(system, batch, step=0)  # r = 1: every sample in a random order
    assert not torch.equal(targets, batch["tokens"])
    assert torch.equal(targets.sort(1).values, batch["tokens"].sort(1).values)  # a permutation of each image


def train_logits(system: CausalARSystem, batch: dict):
    """The training forward: logits (B, L, V) and targets (B, L) of the step's draw (class dropout drawn first, then
    the order, as in the training step)."""
    draws = system.draws("train", 0)
    labels = system.training_labels(batch["label"], draws)
    fed, order, targets = system.method.train_inputs(system.batch_tokens(batch), draws)
    return system.model(fed, labels, order), targets


def train_logits_at(system: CausalARSystem, batch: dict, step: int):
    system._trainer = SimpleNamespace(world_size=1, global_rank=0, global_step=step, current_epoch=0)
    try:
        return train_logits(system, batch)
    finally:
        system._trainer = None


def test_step_randomness_is_the_same_for_one_process_and_for_two():
    """Class dropout and RAR orders come from the step's Draws, drawn for the global batch; rank r takes rows
    r::world, the rows the DistributedSampler gives it, so 2 processes x batch 3 draw what 1 process x batch 6 draws."""
    system = tiny_system()

    def rand(step: int, batch: int, world: int = 1, rank: int = 0) -> torch.Tensor:
        system._trainer = SimpleNamespace(world_size=world, global_rank=rank, global_step=step, current_epoch=0)
        try:
            return system.draws("train", batch_idx=0).rand(batch, 5)
        finally:
            system._trainer = None

    one = rand(4, 6)
    parts = [rand(4, 3, world=2, rank=rank) for rank in range(2)]
    assert torch.equal(torch.stack(parts, 1).reshape(6, 5), one)
    assert not torch.equal(rand(5, 6), one)  # a new draw each step


# -- the system: sampling --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_cached_and_uncached_sampling_give_the_same_tokens(cfg):
    system = tiny_system()
    labels = torch.tensor([0, 1, 2, 1])
    kw = dict(cfg=cfg, temperature=0.9, top_k=20, top_p=0.95, cfg_schedule="linear")
    a = system.generate(labels, generator=torch.Generator().manual_seed(3), **kw)
    b = system.generate(labels, generator=torch.Generator().manual_seed(3), use_cache=False, **kw)
    assert a.shape == (4, G * G) and torch.equal(a, b)


def test_same_seed_same_samples_and_another_seed_others():
    system = tiny_system()
    labels = torch.tensor([0, 1, 2])
    a = system.sample(labels, cfg=2.0, generator=torch.Generator().manual_seed(0))
    b = system.sample(labels, cfg=2.0, generator=torch.Generator().manual_seed(0))
    c = system.sample(labels, cfg=2.0, generator=torch.Generator().manual_seed(1))
    assert a.shape == (3, 3, 16, 16) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert system.model.cache_len == 0  # the caches are freed after sampling


def test_guidance_and_its_schedules_change_the_samples():
    system = tiny_system()
    labels = torch.tensor([0, 1, 2, 0, 1, 2])

    def run(**kw):
        return system.generate(labels, generator=torch.Generator().manual_seed(0), **kw)

    plain, guided = run(), run(cfg=4.0)
    assert not torch.equal(plain, guided)
    # linear starts at scale 1: the first token is the unguided one, later ones are guided
    linear = run(cfg=4.0, cfg_schedule="linear")
    assert torch.equal(linear[:, 0], plain[:, 0]) and not torch.equal(linear, plain)
    # an interval covering only the second half guides only there
    late = run(cfg=4.0, cfg_schedule="interval", cfg_interval=(0.5, 1.0))
    half = G * G // 2
    assert torch.equal(late[:, :half], plain[:, :half]) and not torch.equal(late, plain)
    assert not torch.equal(run(cfg=4.0, cfg_schedule="power_cosine", cfg_power=2.0), plain)


def test_top_k_one_is_greedy_and_temperature_spreads_the_tokens():
    system = tiny_system()
    labels = torch.tensor([0, 0, 0, 0])
    greedy = system.generate(labels, top_k=1, generator=torch.Generator().manual_seed(0))
    assert (greedy == greedy[0]).all()  # no randomness left
    hot = system.generate(labels, temperature=5.0, generator=torch.Generator().manual_seed(0))
    cold = system.generate(labels, temperature=0.05, generator=torch.Generator().manual_seed(0))
    assert hot.unique().numel() > cold.unique().numel()


# -- bad input -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
        (dict(top_k=0), r"top_k=0 must be >= 1"),
        (dict(temperature=0.0), r"temperature=0.0 must be > 0"),
        (dict(cfg_schedule="cosine"), r"cfg_schedule='cosine' is not known"),
        (dict(num_tokens=G * G + 1), r"num_tokens=17: a 4x4 grid holds between 1 and 16 tokens"),
    ],
)
def test_bad_sampling_settings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny_system().generate(torch.tensor([0, 1]), **kw)


def test_labels_outside_the_classes_are_refused():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\) for num_classes=3; got values from 0 to 3"):
        tiny_system().sample(torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\).*from -1 to 1"):
        tiny_system().sample(torch.tensor([-1, 1]))


def test_labels_of_any_integer_dtype_sample_alike_and_other_labels_are_refused():
    system, g = tiny_system(), torch.Generator
    int32 = system.generate(torch.tensor([0, 2], dtype=torch.int32), cfg=2.0, generator=g().manual_seed(0))
    torch.testing.assert_close(int32, system.generate(torch.tensor([0, 2]), cfg=2.0, generator=g().manual_seed(0)))
    refused = [(torch.tensor([0.0, 1.0]), r"torch.float32 \(2,\)"), (torch.tensor([True]), r"torch.bool \(1,\)"),
               (torch.tensor([[0], [1]]), r"torch.int64 \(2, 1\)"), ([0, 1], r"\[0, 1\]")]  # fmt: skip
    for labels, got in refused:
        with pytest.raises(ValueError, match=r"labels must be a 1D integer tensor of class indices; got " + got):
            system.sample(labels)


def test_cfg_without_class_dropout_is_refused():
    with pytest.raises(ValueError, match=r"cfg=2.0 asks for classifier-free guidance.*class_dropout=0"):
        tiny_system(class_dropout=0.0).sample(torch.tensor([0]), cfg=2.0)


def test_more_tokens_than_the_cache_holds_are_refused():
    model = tiny_model(cls_token_num=2)
    model.setup_caches(1, torch.float32, max_seq_len=8)
    model.check_decode_length(7)  # 2 prefix + 6 fed tokens fit
    with pytest.raises(ValueError, match=r"num_tokens=8 needs 9 KV-cache positions .* the cache holds 8"):
        model.check_decode_length(8)
    with pytest.raises(RuntimeError, match="call clear_caches"):
        model(torch.randint(0, V, (1, 3)), torch.tensor([0]))


def test_tokens_that_do_not_fit_the_grid_are_refused():
    batch = {"tokens": torch.randint(0, V, (2, 25)), "label": torch.tensor([0, 1])}
    with pytest.raises(ValueError, match=r"tokens of shape \(2, 25\) do not fit the generator's 4x4 grid"):
        tiny_system().training_step(batch, 0)


def test_bad_model_settings_are_refused():
    with pytest.raises(ValueError, match=r"rar_anneal_start=5 and rar_anneal_end=2 must satisfy"):
        tiny_system(rar=True, rar_anneal_start=5, rar_anneal_end=2)
    with pytest.raises(
        ValueError,
        match=r"tokenizer_ckpt is not set, so model.init_args.vocab_size and "
        r"model.init_args.grid_size must be set",
    ):
        CausalARSystem(num_classes=3, image_size=16)
    with pytest.raises(ValueError, match=r"2D RoPE needs a head width dim/n_heads divisible by 4"):
        tiny_system(dim=24, n_heads=4)


@pytest.fixture
def fake_tokenizer_checkpoint(monkeypatch):
    """Stands in for the generator's load_tokenizer: returns the stub with the attributes it is given."""
    made = {}

    def load_tokenizer(path: str):
        tok = StubTokenizer()
        for name, value in made.items():
            setattr(tok, name, value)
        return tok

    monkeypatch.setattr("lit_ar.systems.generator.load_tokenizer", load_tokenizer)
    return made


@pytest.mark.parametrize(
    "tokenizer, setting, match",
    [
        ({}, {"vocab_size": 64}, r"vocab_size=64 differs from the tokenizer's vocab_size=32 \(tok.ckpt\)"),
        ({}, {"grid_size": 8}, r"grid_size=8 differs from the tokenizer's grid_size=4"),
        ({"is_continuous": True, "vocab_size": None}, {}, r"CausalARSystem models discrete token ids .* is continuous"),
        ({"scales": (1, 2, 4)}, {}, r"is a multi-scale tokenizer \(scales \[1, 2, 4\]\)"),
    ],
)
def test_a_tokenizer_that_disagrees_with_the_generator_is_refused(fake_tokenizer_checkpoint, tokenizer, setting,
                                                                  match):  # fmt: skip
    fake_tokenizer_checkpoint.update(tokenizer)
    with pytest.raises(ValueError, match=match):
        CausalARSystem(tokenizer_ckpt="tok.ckpt", num_classes=NC, image_size=16, **setting)


def test_the_tokenizer_sets_vocab_and_grid(fake_tokenizer_checkpoint):
    system = CausalARSystem(tokenizer_ckpt="tok.ckpt", num_classes=NC, image_size=16, grid_size=G)
    assert (system.model.vocab_size, system.model.grid_size) == (V, G)


# -- compile ---------------------------------------------------------------------------------------------------
def test_compile_applies_in_configure_model_and_once():
    """`compile` compiles nothing at construction: `configure_model` (the hook the Trainer calls at fit, validate,
    test and predict) compiles each block in place, and a second call leaves them as they are."""
    system = tiny_system(depth=2, compile=True)
    assert all(block._compiled_call_impl is None for block in system.model.layers)
    system.configure_model()
    compiled = [block._compiled_call_impl for block in system.model.layers]
    assert all(c is not None for c in compiled)
    system.configure_model()
    assert [block._compiled_call_impl for block in system.model.layers] == compiled
    assert all(block._compiled_call_impl is None for block in tiny_system(depth=2).model.layers)  # without compile


@pytest.mark.slow
def test_compiled_blocks_and_decode_step_equal_eager():
    eager, compiled = tiny_system(depth=1), tiny_system(depth=1, compile=True)
    compiled.configure_model()  # where `compile` applies (the Trainer calls it)
    compiled.load_state_dict(eager.state_dict())
    batch = token_batch(4)
    torch.testing.assert_close(train_logits(compiled, batch)[0], train_logits(eager, batch)[0],
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    labels = torch.tensor([0, 1, 2])
    a = eager.generate(labels, cfg=2.0, generator=torch.Generator().manual_seed(0))
    b = compiled.generate(labels, cfg=2.0, generator=torch.Generator().manual_seed(0))
    assert compiled._compiled_decode is not None and torch.equal(a, b)


@pytest.mark.slow
def test_compiled_head_and_loss_equal_eager_with_their_gradients():
    """With `compile`, the categorical head and its cross-entropy run as one compiled graph: the same loss, and the
    same gradients for the hidden states and for the head's weights, as the eager pair."""
    torch._dynamo.reset()  # so the cache entry counted below is this test's
    eager, compiled = tiny_system(depth=1), tiny_system(depth=1, compile=True)
    compiled.configure_model()  # where `compile` applies (the Trainer calls it)
    compiled.load_state_dict(eager.state_dict())
    hidden = torch.randn(4, eager.model.num_tokens, eager.model.dim)
    targets = torch.randint(0, V, (4, eager.model.num_tokens))
    grads = []
    for system in (eager, compiled):
        h = hidden.clone().requires_grad_()
        loss = system.head.loss(h, targets)
        loss.backward()
        grads.append((loss.detach(), h.grad, system.model.output.weight.grad, system.model.norm.weight.grad))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
    assert _debug_get_cache_entry_list(head_cross_entropy.__code__), "the compiled path ran through dynamo"
    batch = token_batch(4)  # and training_step is the cross-entropy of the logits, compiled or not
    expected = F.cross_entropy(train_logits(eager, batch)[0].flatten(0, 1), batch["tokens"].flatten())
    torch.testing.assert_close(compiled.training_step(batch, 0), expected, rtol=1e-5, atol=1e-6)


# -- the CLI ---------------------------------------------------------------------------------------------------
DEBUG = CONFIGS / "debug" / "causal.yaml"
DEBUG_RAR = CONFIGS / "debug" / "rar.yaml"
GOLDEN = Path(__file__).parent / "golden" / "causal.json"


@pytest.fixture(scope="session")
def trained_debug(checkpoints_root, debug_tokenizer) -> Path:
    """configs/debug/causal.yaml trained through `lit_ar fit` once per session; its run folder holds the logs."""
    return checkpoint_for_config(DEBUG, checkpoints_root, train=True,
                                 extra=["--model.init_args.tokenizer_ckpt", str(debug_tokenizer)])  # fmt: skip


def test_debug_config_trains_its_loss_falls_and_follows_the_golden_curve(trained_debug):
    """The first 10 logged train/loss values of configs/debug/causal.yaml. After an intended change, regenerate with
    `LIT_AR_UPDATE_GOLDEN=1 pytest tests/test_causal_ar.py -k golden` and say why in the commit."""
    run_dir = trained_debug.parent.parent
    loss = logged_scalars(run_dir, "train/loss")
    assert len(loss) >= 10 and sum(loss[-3:]) < sum(loss[:3]) - 0.3, f"the loss falls: {loss}"
    assert "val/token_acc" in {k for k in ("val/loss", "val/token_acc") if logged_scalars(run_dir, k)}
    assert_golden_curve(GOLDEN, loss[:10], config="configs/debug/causal.yaml")


def test_predict_writes_samples_and_a_grid(trained_debug, debug_tokenizer, tmp_path):
    cli_main(["predict", "--config", str(DEBUG), *run_dir_args(tmp_path), "--model.init_args.tokenizer_ckpt",
              str(debug_tokenizer), "--ckpt_path", str(trained_debug)])  # fmt: skip
    samples = np.load(tmp_path / "samples.npz")
    assert samples["images"].shape == (20, 16, 16, 3) and samples["images"].dtype == np.uint8
    assert samples["labels"].tolist() == [c for c in range(10) for _ in range(2)]
    assert (tmp_path / "grid.png").is_file()


def test_a_trained_checkpoint_samples_the_same_images_for_the_same_seed(trained_debug):
    system = CausalARSystem.load_from_checkpoint(trained_debug, weights_only=True)
    labels = torch.arange(4)
    a = system.sample(labels, cfg=2.0, top_k=16, generator=torch.Generator().manual_seed(7))
    b = system.sample(labels, cfg=2.0, top_k=16, generator=torch.Generator().manual_seed(7))
    assert a.shape == (4, 3, 16, 16) and torch.equal(a, b)


@pytest.mark.parametrize("other_in_eval", [False, True])
def test_only_the_frozen_tokenizer_is_exempt_from_the_eval_mode_warning(other_in_eval, debug_tokenizer, tmp_path):
    cli = cli_main(["--config", str(DEBUG), *run_dir_args(tmp_path), "--model.init_args.tokenizer_ckpt",
                    str(debug_tokenizer), "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"],
                   run=False)  # fmt: skip
    left = cli.model.model.layers[0].attn  # a module the user left in eval mode by mistake
    if other_in_eval:
        left.eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    eval_warnings = [str(w.message) for w in caught if "in eval mode at the start of training" in str(w.message)]
    frozen = sum(1 for _ in cli.model.tokenizer.modules())
    assert cli.model.tokenizer is not None and frozen > 1
    if other_in_eval:  # the user's module still gets Lightning's warning, and its count includes the tokenizer
        count = frozen + len(list(left.modules()))
        assert eval_warnings == [f"Found {count} module(s) in eval mode at the start of training. This may lead to "
                                 "unexpected behavior during training. If this is intentional, you can ignore this "
                                 "warning."]  # fmt: skip
    else:
        assert eval_warnings == []


def test_init_weights_start_a_fine_tuning_run_from_a_checkpoint(trained_debug, debug_tokenizer, checkpoints_root,
                                                                 tmp_path):  # fmt: skip
    """`model.init_args.init_weights`: a new run starts from a checkpoint's weights (with a fresh optimizer and step
    count); a resumed run reads its own checkpoint instead; another family's checkpoint, or one trained on another
    tokenizer's tokens, is refused by name."""
    saved = torch.load(trained_debug, weights_only=True)["state_dict"]
    base = ["fit", "--config", str(DEBUG), "--model.init_args.tokenizer_ckpt", str(debug_tokenizer),
            "--trainer.limit_val_batches", "0", "--model.init_args.lr", "0"]  # fmt: skip
    # lr 0: one step leaves the weights where they started, so they are the checkpoint's
    init = ["--model.init_args.init_weights", str(trained_debug)]
    cli = cli_main([*base, *run_dir_args(tmp_path / "ft"), *init, "--trainer.max_steps", "1"])
    state = cli.model.state_dict()
    assert cli.trainer.global_step == 1 and all(torch.equal(state[k], v) for k, v in saved.items())
    fresh = cli_main([*base, *run_dir_args(tmp_path / "fresh"), "--trainer.max_steps", "1"]).model.state_dict()
    assert not torch.equal(fresh["model.tok_embeddings.weight"], saved["model.tok_embeddings.weight"])
    # resuming: the run's own last checkpoint; init_weights is not read (here it no longer exists)
    resumed = cli_main([*base, *run_dir_args(tmp_path / "ft"), "--model.init_args.init_weights", "/gone.ckpt",
                        "--trainer.max_steps", "2", "--ckpt_path", "last"])  # fmt: skip
    assert resumed.trainer.global_step == 2
    with pytest.raises(FileNotFoundError, match=r"model.init_args.init_weights='/gone.ckpt': no checkpoint file"):
        cli_main([*base, *run_dir_args(tmp_path / "new"), "--model.init_args.init_weights", "/gone.ckpt"])
    masked = checkpoint_for_config(CONFIGS / "debug" / "masked.yaml", checkpoints_root,
                                   extra=["--model.init_args.tokenizer_ckpt", str(debug_tokenizer)])  # fmt: skip
    with pytest.raises(ValueError, match=r"model.init_args.init_weights=.* is a checkpoint of .*MaskedARSystem"):
        cli_main([*base, *run_dir_args(tmp_path / "masked"), "--model.init_args.init_weights", str(masked)])
    other = torch.load(debug_tokenizer, weights_only=True)
    other["state_dict"]["autoencoder.quantizer.codebook.weight"] += 1.0
    torch.save(other, tmp_path / "other_tokenizer.ckpt")
    with pytest.raises(ValueError, match=r"init_weights=.* was trained on the tokens of another tokenizer than "
                                         r"model.init_args.tokenizer_ckpt=.*other_tokenizer.ckpt"):  # fmt: skip
        cli_main([*base, *run_dir_args(tmp_path / "other"), *init, "--model.init_args.tokenizer_ckpt",
                  str(tmp_path / "other_tokenizer.ckpt")])  # fmt: skip


def test_help_lists_the_family_and_the_base_settings(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--model.help", "lit_ar.systems.CausalARSystem"])
    out = " ".join(capsys.readouterr().out.split())
    assert "LlamaGen's GPT-B" in out and "rar_anneal_end" in out and "tokenizer_ckpt" in out


@pytest.mark.slow
@pytest.mark.parametrize("config", [DEBUG_RAR, CONFIGS / "debug" / "arpg.yaml", CONFIGS / "debug" / "lpd.yaml"],
                         ids=["rar", "arpg", "lpd"])  # fmt: skip
def test_ddp_two_processes_agree_with_one(config, tmp_path, debug_tokenizer):
    """RAR's debug config (class dropout 0.1, random orders annealed to raster), ARPG's (a random order per sample
    and step) and LPD's (a random order per sample, a group schedule per step): 2 gloo processes at batch 8 draw the
    same dropped labels, orders and schedules as 1 process at batch 16 (the step's Draws, drawn for the global
    batch): same loss curve."""
    common = ["fit", "--config", str(config), "--model.init_args.tokenizer_ckpt", str(debug_tokenizer),
              "--trainer.max_steps", "8", "--data.shuffle", "false", "--trainer.log_every_n_steps", "1",
              "--trainer.limit_val_batches", "0"]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    run_lit_ar([*common, *run_dir_args(one), "--data.batch_size", "16", "--trainer.devices", "1"])
    run_lit_ar([*common, *run_dir_args(two), "--data.batch_size", "8", "--trainer.devices", "2",
                "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"])  # fmt: skip
    loss1, loss2 = logged_scalars(one, "train/loss"), logged_scalars(two, "train/loss")
    assert len(loss1) == len(loss2) == 8 and sum(loss1[-3:]) < sum(loss1[:3])
    torch.testing.assert_close(torch.tensor(loss2), torch.tensor(loss1), rtol=2e-3, atol=1e-5)
