"""The methods in plain torch, without a Trainer or a LightningModule: each `loss` and `sample` over a tiny core and
a head, the degenerate settings that reduce one method to another, and the guidance object every loop calls."""

import pytest
import torch

from lit_ar.draws import Draws
from lit_ar.guidance import Guidance
from lit_ar.methods.base import ContinuousSampling
from lit_ar.methods.groups import FlowGroups
from lit_ar.methods.masked import MAR, MaskedSampling, MaskGIT
from lit_ar.methods.raster import RasterAR, RasterSampling
from lit_ar.models.categorical_head import CategoricalHead
from lit_ar.models.causal_ar import CausalTransformer
from lit_ar.models.flow_head import FlowHead
from lit_ar.models.flowar import FlowARTransformer
from lit_ar.models.mar import MARTransformer
from lit_ar.models.masked_ar import MaskedTransformer

V, G, NC = 16, 4, 3  # vocabulary, grid side, classes


def randomised(core: torch.nn.Module) -> torch.nn.Module:
    """Weights away from their (partly zero) initialisation, so that every output depends on the inputs."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in core.parameters():
            p.normal_(0.0, 0.3)
    return core.eval()


def tokens_labels(B: int = 4):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, V, (B, G * G), generator=g), torch.randint(0, NC, (B,), generator=g)


def test_raster_method_trains_and_samples_without_a_trainer():
    core = randomised(CausalTransformer(V, G, NC, dim=32, depth=2, n_heads=2))
    head, method = CategoricalHead(core), RasterAR()
    tokens, labels = tokens_labels()
    loss = method.loss(core, head, tokens, labels, Draws(0))["loss"]
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss) and core.output.weight.grad is not None
    guidance = Guidance(2.0, null_class=NC)
    out = method.sample(core, head, labels, guidance, RasterSampling(cfg=2.0), torch.Generator().manual_seed(0))
    assert out.shape == (4, G * G) and 0 <= int(out.min()) and int(out.max()) < V
    # KV-cached decoding equals recomputing the prefix at every token
    again = method.sample(core, head, labels, guidance, RasterSampling(cfg=2.0, use_cache=False),
                          torch.Generator().manual_seed(0))  # fmt: skip
    assert torch.equal(out, again)


def test_random_order_at_ratio_zero_is_raster_training():
    """RAR with r = 0 (the identity order for every sample) is LlamaGen's raster loss, draw for draw."""
    core = randomised(CausalTransformer(V, G, NC, dim=32, depth=2, n_heads=2, target_aware=True))
    head, tokens, labels = CategoricalHead(core), *tokens_labels()
    raster = RasterAR().loss(core, head, tokens, labels, Draws(0))["loss"]
    identity = RasterAR(random_order=lambda step: 0.0).loss(core, head, tokens, labels, Draws(0))["loss"]
    shuffled = RasterAR(random_order=lambda step: 1.0).loss(core, head, tokens, labels, Draws(0))["loss"]
    assert torch.equal(identity, raster) and not torch.equal(shuffled, raster)


def test_masked_method_trains_and_samples_without_a_trainer():
    core = randomised(MaskedTransformer(V, G, NC, dim=32, depth=2, n_heads=2, dropout=0.0))
    head, method = CategoricalHead(core), MaskGIT(label_smoothing=0.1)
    tokens, labels = tokens_labels()
    loss = method.loss(core, head, tokens, labels, Draws(0))["loss"]
    assert torch.isfinite(loss)
    settings = MaskedSampling(steps=4, cfg=1.5)
    out, trace = method.sample(core, head, labels, settings.guidance(NC), settings, torch.Generator().manual_seed(0),
                               return_trace=True)  # fmt: skip
    assert out.shape == (4, G * G) and not trace["masked"][-1].any() and trace["masked"][0].all()


def test_masked_loss_of_two_ranks_is_the_one_process_loss():
    """The mean over the global batch's masked tokens: each rank's loss scaled by world / global count."""
    core = randomised(MaskedTransformer(V, G, NC, dim=32, depth=2, n_heads=2, dropout=0.0))
    head, method, (tokens, labels) = CategoricalHead(core), MaskGIT(), tokens_labels(6)
    one = method.loss(core, head, tokens, labels, Draws.for_step(3, "train", 2, 0))["loss"]
    ranks = [method.loss(core, head, tokens[r::2], labels[r::2], Draws.for_step(3, "train", 2, 0, world=2, rank=r))
             ["loss"] for r in range(2)]  # fmt: skip
    torch.testing.assert_close((ranks[0] + ranks[1]) / 2, one)


@pytest.mark.parametrize("order", ["scale", "raster"])
def test_group_method_over_continuous_tokens_trains_and_samples_without_a_trainer(order):
    core = randomised(FlowARTransformer(4, G, NC, order=order, dim=32, depth=2, n_heads=2))
    head, method = FlowHead(4, 32, width=32, depth=2), FlowGroups(head_batch_mul=2)
    tokens = torch.randn(3, G * G, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2])
    assert torch.isfinite(method.loss(core, head, tokens, labels, Draws(0))["loss"])
    settings = ContinuousSampling(cfg=2.0, flow_steps=2)
    out = method.sample(core, head, labels, settings.guidance(NC), settings, torch.Generator().manual_seed(0))
    assert out.shape == (3, G * G, 4) and torch.isfinite(out).all()


def test_mar_method_trains_and_samples_without_a_trainer():
    core = randomised(MARTransformer(4, G * G, NC, dim=32, depth=2, n_heads=2, buffer_size=4))
    head, method = FlowHead(4, 32, width=32, depth=2), MAR(head_batch_mul=2)
    tokens = torch.randn(3, G * G, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2])
    assert torch.isfinite(method.loss(core, head, tokens, labels, Draws(0))["loss"])
    settings = ContinuousSampling(steps=4, flow_steps=2, cfg=1.5)
    out = method.sample(core, head, labels, settings.guidance(NC), settings, torch.Generator().manual_seed(0))
    assert out.shape == (3, G * G, 4) and (out != 0).all()


def test_guidance_at_scale_one_is_no_guidance_and_its_hook_runs_after_combining():
    core = randomised(CausalTransformer(V, G, NC, dim=32, depth=2, n_heads=2))
    head, method, (_, labels) = CategoricalHead(core), RasterAR(), tokens_labels()
    plain = method.sample(core, head, labels, Guidance(), RasterSampling(), torch.Generator().manual_seed(0))
    ramp = Guidance(1.0, "linear", null_class=NC)  # every step's scale is 1: no negative rows at all
    assert not ramp.active and torch.equal(ramp.rows(labels), labels)
    assert torch.equal(method.sample(core, head, labels, ramp, RasterSampling(), torch.Generator().manual_seed(0)),
                       plain)  # fmt: skip

    def only_token_7(logits: torch.Tensor) -> torch.Tensor:
        return torch.full_like(logits, -1e9).index_fill(-1, torch.tensor([7]), 0.0)

    hooked = Guidance(2.0, null_class=NC, post=only_token_7)
    assert (method.sample(core, head, labels, hooked, RasterSampling(cfg=2.0)) == 7).all()
    both = torch.stack([torch.full((2, 5), 3.0), torch.full((2, 5), 1.0)]).flatten(0, 1)  # [cond; uncond] (4, 5)
    torch.testing.assert_close(Guidance(2.0, "linear", null_class=NC).combine(both, progress=0.5),
                               torch.full((2, 5), 1.0 + 1.5 * 2.0))  # fmt: skip


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match=r"predict_kwargs: 'stpes' is not a sampling setting of MaskedSampling; "
                                         r"accepted: cfg, .*steps"):  # fmt: skip
        MaskedSampling.parse({"stpes": 4}, "predict_kwargs")
    with pytest.raises(ValueError, match=r"top_k=5, top_p=None: filters of discrete logits"):
        ContinuousSampling(top_k=5)
    with pytest.raises(ValueError, match=r"cfg_schedule='cosine' is not known"):
        RasterSampling(cfg_schedule="cosine")
    with pytest.raises(ValueError, match=r"guidance with cfg != 1 needs the model's null class"):
        Guidance(2.0).rows(torch.tensor([0]))


def test_raster_method_runs_continuous_tokens_in_the_loop_of_discrete_ones():
    """One raster loop, whichever head: the flow head's tokens drawn by `RasterAR` over a raster-order
    FlowARTransformer equal those of the group method's loop with one token per group (the loop the continuous
    family used before), with CFG and its linear schedule; the full forward without a cache gives the same tokens
    too; and the losses agree (the same fed tokens, the same head draws)."""
    core = randomised(FlowARTransformer(4, G, NC, order="raster", dim=32, depth=2, n_heads=2))
    head = randomised(FlowHead(4, 32, width=32, depth=2))
    raster, groups = RasterAR(head_batch_mul=2, progress_after_token=True), FlowGroups(head_batch_mul=2)
    tokens = torch.randn(3, G * G, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2])
    torch.testing.assert_close(raster.loss(core, head, tokens, labels, Draws(3))["loss"],
                               groups.loss(core, head, tokens, labels, Draws(3))["loss"])  # fmt: skip
    settings = ContinuousSampling(cfg=2.0, cfg_schedule="linear", flow_steps=3)
    guidance = settings.guidance(NC)
    by_groups = groups.sample(core, head, labels, guidance, settings, torch.Generator().manual_seed(1))
    by_raster = raster.sample(core, head, labels, guidance, settings, torch.Generator().manual_seed(1))
    assert by_raster.shape == (3, G * G, 4)
    torch.testing.assert_close(by_raster, by_groups, rtol=1e-5, atol=1e-5)
    no_cache = ContinuousSampling(cfg=2.0, cfg_schedule="linear", flow_steps=3)
    no_cache.use_cache = False  # the continuous settings carry no such field: set it on the instance for this check
    by_full_forward = raster.sample(core, head, labels, guidance, no_cache, torch.Generator().manual_seed(1))
    torch.testing.assert_close(by_full_forward, by_groups, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"steps=5: raster decoding takes one step per token \(16\); leave steps null"):
        raster.sample(core, head, labels, guidance, ContinuousSampling(steps=5), None)
