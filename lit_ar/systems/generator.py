"""GeneratorSystem: what every generator family shares — the frozen tokenizer, the checks that it agrees with the
generator, tokens from images or from a token cache, label checks, the optimizer and schedule, `predict`, and
`test`/`validate` = the evaluation protocol of `lit_ar.evaluation.GeneratorEvaluator` (FID, IS, precision/recall,
class accuracy of class-balanced seeded samples against a cached reference).

A family subclasses it and implements `training_step`/`validation_step` (tokens -> loss) and `sample(...)`.
"""

import contextlib
import functools
import warnings
from collections.abc import Iterable, Iterator

import lightning as L
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import nn
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

from lit_ar.checkpoints import load_checkpoint
from lit_ar.evaluation import GeneratorEvaluator
from lit_ar.models.layers import Block
from lit_ar.systems.lr_schedule import warmup_cosine

INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)  # class labels


def enable_activation_checkpointing(root: nn.Module) -> int:
    """Recompute each transformer block's activations in the backward pass instead of storing them (memory for
    compute). Patches the blocks' forward in place, so parameter names and checkpoints are unchanged.
    Returns the number of blocks patched."""
    count = 0
    for module in root.modules():
        if isinstance(module, Block) and not getattr(module, "_activation_checkpointing", False):
            module.forward = functools.partial(_checkpointed_forward, module.forward)
            module._activation_checkpointing = True
            count += 1
    return count


def _checkpointed_forward(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


# Every family's transformer blocks run one code object (layers.Block.forward), and dynamo keeps at most
# `recompile_limit` graphs per code object (8 by default); past that, a call that fits none of them runs eager. One
# run needs more than 8: training and no-grad validation, sampling with weights cast to the autocast dtype, each with
# MAR's query-only last block or a KV cache. A compiled MAR hit the limit at its first validation, so from then on it
# validated and sampled eager.
BLOCK_RECOMPILE_LIMIT = 64


def compile_blocks_in_place(blocks: Iterable[nn.Module], dynamic: bool | None = None) -> None:
    """`torch.compile` each of `blocks` in place (checkpoint keys keep no `_orig_mod.`), with room in dynamo's
    recompile limit for every variant a run calls. `dynamic=True` compiles for shapes that change from call to call
    from the first compile on, instead of after a first recompile."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, BLOCK_RECOMPILE_LIMIT)
    for block in blocks:
        block.compile(dynamic=dynamic)


def head_cross_entropy(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, *head_args: torch.Tensor,
                       reduction: str = "mean", label_smoothing: float = 0.0) -> torch.Tensor:  # fmt: skip
    """A core's head and the cross-entropy of its logits: hidden (..., C) -> `model.logits(hidden, *head_args)`
    (..., V), against targets (...) long, in fp32."""
    logits = model.logits(hidden, *head_args).float()
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction=reduction,
                           label_smoothing=label_smoothing)  # fmt: skip


@functools.cache
def compiled_head_cross_entropy():
    """`head_cross_entropy` compiled: one function for every model, which takes the model as an argument, so no
    compiled graph holds a system (a copy of one, e.g. for EMA, would otherwise train through the original's head)."""
    return torch.compile(head_cross_entropy)


@contextlib.contextmanager
def linears_in_autocast_dtype(modules: Iterable[nn.Module], device_type: str) -> Iterator[int]:
    """While sampling under autocast, the nn.Linear weights and biases inside `modules` hold copies in the autocast
    dtype; they get their fp32 tensors back on exit. Yields how many tensors it cast.

    Why: autocast casts a linear's weight to its dtype anyway, so the arithmetic is the same to the bit. Eager
    autocast caches those casts for the length of its context, but a compiled block casts its weights inside its
    graph at every call (VAR-d16 calls its 16 blocks at 10 scales): on a 2-core CPU in bf16 autocast, this made
    VAR-d16's compiled sampling 12-22% faster, from below eager to above it, with the same samples
    (`python -m benchmarks.autocast_linears`; benchmarks/RESULTS.md).

    The copies are made at each call, not kept: Lightning's EMA swaps weights in through `.data`, which no version
    counter sees, so a kept copy could go stale unnoticed. It does nothing where it would not be exact or safe:
    autocast off, grad on, FSDP, or parameters that are not plain fp32 tensors. `modules` must run their linears
    under autocast only, not inside an fp32 island. The causal family skips it where its compiled decode step is a
    CUDA graph, which holds its weights' addresses."""
    enabled = torch.is_autocast_enabled(device_type) and not torch.is_grad_enabled()
    dtype = torch.get_autocast_dtype(device_type) if enabled else None
    params = []
    if dtype in (torch.bfloat16, torch.float16):
        submodules = [m for module in modules for m in module.modules()]
        params = [p for m in submodules if isinstance(m, nn.Linear) for p in m.parameters(recurse=False)]
        # FSDP (either version) points parameters at shards or gathered copies itself: no second hand on `.data`
        sharded = any(isinstance(m, (FullyShardedDataParallel, FSDPModule)) for m in submodules)
        if sharded or not all(type(p.data) is torch.Tensor and p.dtype == torch.float32 for p in params):
            params = []
    originals = [p.data for p in params]
    try:
        for p in params:
            p.data = p.data.to(dtype)
        yield len(params)
    finally:
        for p, data in zip(params, originals):
            p.data = data


class GeneratorSystem(L.LightningModule):
    # Whether the family models continuous tokens (B, L, D) (the flow family) or discrete ids: a tokenizer of the
    # other kind is refused when it is loaded.
    continuous_tokens: bool = False

    def __init__(
        self,
        tokenizer_ckpt: str | None = None,
        num_classes: int = 10,
        image_size: int = 64,
        channels: int = 3,
        class_dropout: float = 0.1,
        lr: float = 3e-4,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.0,
        compile: bool = False,
        activation_checkpointing: bool = False,
        init_weights: str | None = None,
        predict_seed: int = 0,
        predict_kwargs: dict | None = None,
        evaluator: GeneratorEvaluator | None = None,
    ):
        """
        Args:
            tokenizer_ckpt: Path of the TokenizerSystem checkpoint whose tokens this generator models. It is
                loaded frozen (weights_only) and checked against the generator's vocabulary, grid and image size.
            num_classes: Number of classes (linked from `data.num_classes`); class `num_classes` is the null
                class used for classifier-free guidance.
            image_size: Image side (linked from `data.image_size`); must equal the tokenizer's.
            channels: Image channels (linked from `data.channels`); must equal the tokenizer's.
            class_dropout: Probability of replacing the label by the null class in training (enables CFG).
            lr: Peak AdamW learning rate.
            weight_decay: AdamW weight decay, applied to matrices only (not to norms, biases or embeddings' 1D
                parameters).
            betas: AdamW betas.
            warmup_steps: Linear warm-up steps before cosine decay.
            min_lr_ratio: Final learning rate as a fraction of `lr`.
            compile: Compile each transformer block in place (and the sampling step) with torch.compile.
            activation_checkpointing: Recompute each transformer block's activations in the backward pass
                (less memory, about a third more compute). Under FSDP prefer the strategy's own
                `activation_checkpointing_policy`.
            init_weights: A checkpoint of this family (a lit_ar run, or LlamaGen's or VAR's released weights
                through `python -m lit_ar.released_weights`) whose weights start a new `fit`: fine-tuning, with a
                fresh optimizer, schedule and step count. Every weight but the tokenizer's is loaded, strictly; the
                checkpoint's tokenizer must be the configured one. Not read when `lit_ar fit` resumes from
                `--ckpt_path`.
            predict_seed: Seed of `lit_ar predict` sampling (batch b uses predict_seed + its first index).
            predict_kwargs: Sampling settings used by `predict` (e.g. {cfg: 2.0, temperature: 1.0, top_k: null}).
            evaluator: The evaluation protocol `lit_ar test` runs (a `lit_ar.evaluation.GeneratorEvaluator`:
                extractor, samples per class, sampling settings, reference); see configs/eval/generator_shapes.yaml.
                Not a hyper-parameter of the model: it is not saved in checkpoints.
        """
        super().__init__()
        # collects the init arguments of the family subclass too (Lightning walks the __init__ frames); the
        # evaluator is how this run is measured, not part of the model
        self.save_hyperparameters(ignore=["evaluator"])
        self.resume_from: str | None = None  # the checkpoint `lit_ar fit --ckpt_path` resumes from (set by the CLI)
        self.evaluator = evaluator
        if evaluator is not None and evaluator.sampling is None:  # sample as `lit_ar predict` does
            evaluator.sampling = dict(predict_kwargs or {})
        if not 0.0 <= class_dropout < 1.0:
            raise ValueError(f"model.init_args.class_dropout={class_dropout} must be in [0, 1)")
        self.tokenizer: nn.Module | None = None
        if tokenizer_ckpt is not None:
            from lit_ar.systems.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(tokenizer_ckpt)
            self.check_tokenizer_image(self.tokenizer, image_size, channels)
            self.check_tokenizer_kind(self.tokenizer, self.continuous_tokens, type(self).__name__)

    # -- checks ----------------------------------------------------------------------------------------------
    @staticmethod
    def check_tokenizer_image(tokenizer: nn.Module, image_size: int, channels: int) -> None:
        if tokenizer.image_size != image_size:
            raise ValueError(
                f"data.image_size={image_size} differs from the tokenizer's image size {tokenizer.image_size}; "
                "train on images of the size the tokenizer was trained on"
            )
        if tokenizer.channels != channels:
            raise ValueError(f"data.channels={channels} differs from the tokenizer's channels {tokenizer.channels}")

    @staticmethod
    def check_tokenizer_kind(tokenizer: nn.Module, continuous: bool, system: str = "this generator") -> None:
        if bool(tokenizer.is_continuous) != continuous:
            have = "continuous (a KL tokenizer)" if tokenizer.is_continuous else "discrete (vocab_size="
            have += "" if tokenizer.is_continuous else f"{tokenizer.vocab_size})"
            want = "continuous tokens (a KL tokenizer)" if continuous else "discrete token ids (a VQ/FSQ/LFQ tokenizer)"
            raise ValueError(
                f"model.init_args.tokenizer_ckpt: {system} models {want}, but the tokenizer is {have}; "
                "pick a generator of the tokenizer's kind or a tokenizer of the generator's"
            )

    def check_labels(self, labels: torch.Tensor, allow_null: bool = False) -> None:
        """Labels must lie in [0, num_classes) (or be the null class when allow_null)."""
        top = self.hparams.num_classes + int(allow_null)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= top):
            raise ValueError(
                f"labels must lie in [0, {top}) for num_classes={self.hparams.num_classes}; "
                f"got values from {int(labels.min())} to {int(labels.max())}"
            )

    def check_cfg(self, cfg: float) -> None:
        if cfg != 1.0 and self.hparams.class_dropout == 0.0:
            raise ValueError(
                f"cfg={cfg} asks for classifier-free guidance, but this model was trained with "
                "model.init_args.class_dropout=0 and so never saw the null class; sample with cfg=1.0"
            )

    def linears_cast_for_sampling(self, modules: Iterable[nn.Module]):
        """`linears_in_autocast_dtype` over `modules`, the one way every family's sampler takes it; nothing under a
        Trainer strategy that shards parameters (FSDP, model parallel), whose root unit holds parameters, such as
        the flow head's, that no FSDP module among `modules` would show."""
        trainer = self._trainer
        if trainer is not None and isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
            modules = []
        return linears_in_autocast_dtype(modules, self.device.type)

    def sampling_labels(self, labels: torch.Tensor, cfg: float, allow_null: bool = False):
        """Every family's first check of a sampling call, before any work: labels (B,) of integer class indices in
        range, and a cfg the model was trained for. Returns the labels (B,) long on this device and the rows the
        model is conditioned on: the labels, or under CFG (2B,) [labels; null class], so that one batch computes
        the conditional and the unconditional prediction."""
        self.check_cfg(cfg)
        if not (isinstance(labels, torch.Tensor) and labels.ndim == 1 and labels.dtype in INTEGER_DTYPES):
            got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, torch.Tensor) else repr(labels)
            raise ValueError(f"labels must be a 1D integer tensor of class indices; got {got}")
        self.check_labels(labels, allow_null)
        labels = labels.to(self.device, torch.long)
        if cfg == 1.0:
            return labels, labels
        return labels, torch.cat([labels, torch.full_like(labels, self.hparams.num_classes)])

    # -- data ------------------------------------------------------------------------------------------------
    def drop_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Replace labels by the null class with probability class_dropout (training only)."""
        if not self.training or self.hparams.class_dropout == 0.0:
            return labels
        drop = torch.rand(labels.shape, device=labels.device) < self.hparams.class_dropout
        return torch.where(drop, torch.full_like(labels, self.hparams.num_classes), labels)

    @torch.no_grad()
    def encode(self, images: torch.Tensor):
        if self.tokenizer is None:
            raise ValueError("this generator has no tokenizer: set model.init_args.tokenizer_ckpt")
        self.tokenizer.eval()
        return self.tokenizer.encode(images)

    @torch.no_grad()
    def decode(self, tokens) -> torch.Tensor:
        if self.tokenizer is None:
            raise ValueError("this generator has no tokenizer: set model.init_args.tokenizer_ckpt")
        self.tokenizer.eval()
        return self.tokenizer.decode(tokens).clamp(-1, 1)

    def tokens_from_batch(self, batch: dict):
        """Tokens of a batch: read from a token cache when the datamodule serves one, else encoded now."""
        return batch["tokens"] if "tokens" in batch else self.encode(batch["image"])

    def train(self, mode: bool = True):
        super().train(mode)
        if self.tokenizer is not None:
            self.tokenizer.eval()  # frozen: its norms and quantizer statistics never switch to training
        return self

    def on_fit_start(self) -> None:
        # Lightning warns when any module is in eval mode as training starts; the frozen tokenizer always is, by
        # design. Silence exactly that count, so that any other module left in eval mode still gets the warning.
        if self.tokenizer is not None:
            frozen = sum(1 for _ in self.tokenizer.modules())
            others = sum(1 for m in self.modules() if not m.training) - frozen
            if others == 0:
                warnings.filterwarnings(
                    "ignore", message=rf"Found {frozen} module\(s\) in eval mode at the start of training",
                    category=PossibleUserWarning,
                )  # fmt: skip

    # -- training loss ---------------------------------------------------------------------------------------
    def token_loss(self, hidden: torch.Tensor, targets: torch.Tensor, *head_args: torch.Tensor,
                   reduction: str = "mean", label_smoothing: float = 0.0) -> torch.Tensor:  # fmt: skip
        """Cross-entropy of the core's logits for `hidden` (..., C) against targets (...): `head_cross_entropy`. With
        `compile`, the head and the loss run as one compiled graph. Eager, the logits (..., V) are written out, cast
        to fp32, and read again by the log-softmax and by each of their backward passes; compiled, those passes
        fuse (GPT-B training shapes on a 2-core CPU: 180 against 314 ms for the pair's forward and backward in
        bf16 autocast)."""
        loss_fn = compiled_head_cross_entropy() if self.hparams.compile else head_cross_entropy
        return loss_fn(self.model, hidden, targets, *head_args, reduction=reduction, label_smoothing=label_smoothing)

    # -- optimisation ----------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.hparams.activation_checkpointing:
            enable_activation_checkpointing(self)

    def make_optimizer(self) -> torch.optim.AdamW:
        """The training optimizer: AdamW over the trainable parameters, weight decay on matrices only; the frozen
        tokenizer is left out. Benchmarks time this optimizer too.

        The fused kernel where the parameters' device has one (CPU, CUDA) and no grad scaler is in use: on a 2-core
        CPU it steps GPT-B in 0.068 s against 0.31 s for the for-each and per-tensor forms (about 5% of an fp32
        step, 10% of a bf16 one). Lightning refuses to clip a fused optimizer's gradients under its
        mixed-precision plugin, because such an optimizer may unscale fp16 gradients inside its step
        (`_step_supports_amp_scaling`); without a grad scaler (fp32, bf16-mixed) there is nothing to unscale, so the
        flag is cleared and clipping stays exact. Under fp16-mixed (a grad scaler) the optimizer is not fused."""
        params = [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("tokenizer.")]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        scaler = getattr(getattr(self._trainer, "precision_plugin", None), "scaler", None)
        fused = scaler is None and all(p.device.type in ("cpu", "cuda") for p in params)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr,
            betas=tuple(self.hparams.betas),
            fused=fused,
        )
        if fused:
            opt._step_supports_amp_scaling = False  # no scaler: let Lightning clip (see above)
        return opt

    def configure_optimizers(self):
        opt = self.make_optimizer()
        total = int(self.trainer.estimated_stepping_batches)
        sched = warmup_cosine(opt, self.hparams.warmup_steps, total, self.hparams.min_lr_ratio)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- sampling ----------------------------------------------------------------------------------------------
    def sample(self, labels: torch.Tensor, **kwargs) -> torch.Tensor:
        """labels (B,) -> images (B, C, H, W) in [-1, 1]. Implemented by each family."""
        raise NotImplementedError

    def load_init_weights(self, path: str) -> None:
        """Every weight but the tokenizer's from a checkpoint of this family (see `init_weights`), before any
        training state exists: the optimizer and schedule are then built over them as over fresh ones."""
        setting = "model.init_args.init_weights"
        saved = load_checkpoint(path, expected_system=type(self), module=self, setting=setting)["state_dict"]
        tokenizer = {k[len("tokenizer.") :]: v for k, v in saved.items() if k.startswith("tokenizer.")}
        if self.tokenizer is not None and any(not torch.equal(v, tokenizer[k].to(v.device))
                                              for k, v in self.tokenizer.state_dict().items()):  # fmt: skip
            raise ValueError(
                f"{setting}={path!r} was trained on the tokens of another tokenizer than "
                f"model.init_args.tokenizer_ckpt={self.hparams.tokenizer_ckpt!r}; fine-tune with the tokenizer it "
                "was trained on"
            )
        self.load_state_dict({k: v for k, v in saved.items() if not k.startswith("tokenizer.")}, strict=False)

    # -- evaluation: `lit_ar test` (and `lit_ar validate`) run the evaluator's protocol --------------------------
    def _require_evaluator(self, stage: str) -> GeneratorEvaluator:
        if self.evaluator is None:
            raise ValueError(
                f"`lit_ar {stage}` on a generator evaluates its samples, but model.init_args.evaluator is not set. "
                "Add the evaluation settings, e.g. `--config configs/eval/generator_shapes.yaml`, or in the config:\n"
                "model:\n  init_args:\n    evaluator:\n      class_path: lit_ar.evaluation.GeneratorEvaluator\n"
                "      init_args: {extractor: classifier, extractor_ckpt: runs/classifier/shapes/checkpoints/best.ckpt,"
                " per_class: 50, sampling: {cfg: 2.0}}"
            )
        return self.evaluator

    def setup(self, stage: str) -> None:
        # Lightning restores a resumed run's checkpoint after this hook, so init_weights would only be overwritten:
        # `lit_ar fit --ckpt_path` says it is resuming (resume_from), and the file is then not read at all.
        if stage == "fit" and self.hparams.init_weights and self.resume_from is None:
            self.load_init_weights(self.hparams.init_weights)
        if stage == "test":
            # The test split only drives the loop (test_step does nothing): one batch of it, whatever the config says
            self.trainer.limit_test_batches = 1

    def on_test_start(self) -> None:
        # every check (settings, extractor, sample count, resolution, reference identity) before any sampling; the
        # reference statistics are computed (once, then cached) here
        self._require_evaluator("test").prepare(self.trainer, self)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        """Nothing per batch: the evaluation runs once in `on_test_epoch_end` (one test batch: see `setup`)."""

    def on_test_epoch_end(self) -> None:
        # At `lit_ar test --ckpt_path` the weights are the checkpoint's `state_dict`: with EMAWeightAveraging in
        # training that is the averaged model (the callback saves it there), so FID is of the EMA weights.
        self.evaluator.run(self, stage="test")

    def _validating_alone(self) -> bool:
        # `lit_ar validate`, not the validation inside `fit` (there the FIDCallback measures FID every N steps)
        return self._trainer is not None and self.trainer.state.fn == TrainerFn.VALIDATING

    def on_validation_start(self) -> None:
        if self._validating_alone() and self.evaluator is not None:
            self.evaluator.prepare(self.trainer, self)

    def on_validation_epoch_end(self) -> None:
        """`lit_ar validate` logs the family's `val/loss` and, with an evaluator, its metrics as `val/fid`, ..."""
        if self._validating_alone() and self.evaluator is not None:
            self.evaluator.run(self, stage="val")

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        """Batches of labels (see ImageDataModule.predict_per_class) -> uint8 samples with their indices."""
        labels, index = batch["label"], batch["index"]
        g = torch.Generator(device=self.device).manual_seed(self.hparams.predict_seed + int(index[0]))
        images = self.sample(labels, generator=g, **(self.hparams.predict_kwargs or {}))
        uint8 = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, C, H, W)
        return {"images": uint8.cpu(), "labels": labels.cpu(), "index": index.cpu()}
