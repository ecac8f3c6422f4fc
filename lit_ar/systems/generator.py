"""GeneratorSystem: what every generator family shares — the frozen tokenizer, the checks that it agrees with the
generator, tokens from images or from a token cache, label checks, the optimizer and schedule, `predict`, and
`test`/`validate` = the evaluation protocol of `lit_ar.evaluation.GeneratorEvaluator` (FID, IS, precision/recall,
class accuracy of class-balanced seeded samples against a cached reference).

A family is a short declaration on top: its typed settings mapped to a core, a head and a method (lit_ar/methods/),
whose `loss` and `sample` this class calls with the step's `Draws` and the settings' `Guidance`.
"""

import contextlib
import warnings
from collections.abc import Iterable

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import nn

from lit_ar.checkpoints import load_checkpoint
from lit_ar.draws import Draws
from lit_ar.evaluation import GeneratorEvaluator
from lit_ar.guidance import Guidance
from lit_ar.methods.base import SamplingSettings
from lit_ar.models.categorical_head import CategoricalHead
from lit_ar.performance import compile_blocks_in_place, enable_activation_checkpointing, linears_in_autocast_dtype
from lit_ar.systems.lr_schedule import warmup_cosine
from lit_ar.tokenizers import load_tokenizer

INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)  # class labels


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Dropout off while sampling; the previous mode back afterwards, even on error."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def sizes_under_former_names(sizes: dict, former: dict[str, tuple[str, int | None]]) -> dict:
    """The core's sizes in lit_ar's one vocabulary (`dim`, `depth`, `n_heads`, `n_kv_heads`), with the value of each
    former name, {old: (new, value)}, moved to its new name: configs and checkpoints written before the rename still
    load. Both names set to different values is refused."""
    sizes = dict(sizes)
    for old, (new, value) in former.items():
        if value is None:
            continue
        if sizes.get(new) is not None and sizes[new] != value:
            raise ValueError(f"model.init_args.{old}={value} and model.init_args.{new}={sizes[new]} disagree: {old} is "
                             f"the former name of {new}; set {new} only")  # fmt: skip
        sizes[new] = value
    return sizes


class GeneratorSystem(L.LightningModule):
    # Whether the family models continuous tokens (B, L, D) (the flow family) or discrete ids: a tokenizer of the
    # other kind is refused when it is loaded.
    continuous_tokens: bool = False
    # The family's sampling settings (a dataclass of lit_ar.methods): `predict_kwargs`, the sample grid's, the
    # evaluator's and the FID callback's sampling are all parsed into it, so a misspelt key fails by name.
    Sampling: type[SamplingSettings] = SamplingSettings
    # The attribute that holds the family's core (the flow family's is `core`, for its checkpoints' keys)
    core_name: str = "model"
    # Whether sampling takes the null class as a label (unconditional samples; MaskGIT's, when trained with dropout)
    samples_null_class: bool = False

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
        predict_kwargs: SamplingSettings | dict | None = None,
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
            compile: Compile each transformer block in place (and the sampling step) with torch.compile, in
                `configure_model`: the Trainer calls it at fit, validate, test and predict; without a Trainer, call
                `system.configure_model()` after building the system.
            activation_checkpointing: Recompute each transformer block's activations in the backward pass
                (less memory, about a third more compute). Under FSDP prefer the strategy's own
                `activation_checkpointing_policy`.
            init_weights: A checkpoint of this family (a lit_ar run, or LlamaGen's or VAR's released weights
                through `python -m lit_ar.released_weights`) whose weights start a new `fit`: fine-tuning, with a
                fresh optimizer, schedule and step count. Every weight but the tokenizer's is loaded, strictly; the
                checkpoint's tokenizer must be the configured one. Not read when `lit_ar fit` resumes from
                `--ckpt_path`.
            predict_seed: Seed of `lit_ar predict` sampling (batch b uses predict_seed + its first index).
            predict_kwargs: Sampling settings of `predict`, and of the sample grid, the evaluator and the FID callback
                unless they set their own (e.g. {cfg: 2.0, temperature: 1.0, top_k: null}); the family's typed
                settings (`--model.help` lists them), stored complete in the checkpoint.
            evaluator: The evaluation protocol `lit_ar test` runs (a `lit_ar.evaluation.GeneratorEvaluator`:
                extractor, samples per class, sampling settings, reference); see configs/eval/generator_shapes.yaml.
                Not a hyper-parameter of the model: it is not saved in checkpoints.
        """
        super().__init__()
        # refuses a misspelt or out-of-range setting now, before any work
        settings = type(self).Sampling.parse(predict_kwargs, "model.init_args.predict_kwargs").as_dict()
        # collects the init arguments of the family subclass too (Lightning walks the __init__ frames); the
        # evaluator is how this run is measured, not part of the model
        self.save_hyperparameters(ignore=["evaluator"])
        # stored as the complete plain mapping (checkpoints load with weights_only, which takes no dataclass)
        self.hparams["predict_kwargs"], self._hparams_initial["predict_kwargs"] = settings, dict(settings)
        self._run_seed: int | None = None
        self._compiled = False  # `compile` is applied once, in configure_model
        self.resume_from: str | None = None  # the checkpoint `lit_ar fit --ckpt_path` resumes from (set by the CLI)
        self.evaluator = evaluator
        if evaluator is not None and evaluator.sampling is None:  # sample as `lit_ar predict` does
            evaluator.sampling = dict(settings)
        if not 0.0 <= class_dropout < 1.0:
            raise ValueError(f"model.init_args.class_dropout={class_dropout} must be in [0, 1)")
        self.tokenizer: nn.Module | None = None
        if tokenizer_ckpt is not None:
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

    # the configured token settings and the tokenizer attribute each must equal
    TOKEN_SETTINGS = {
        "vocab_size": ("vocab_size", "vocab_size"),
        "grid_size": ("grid_size", "grid_size"),
        "token_dim": ("latent_channels", "latent width latent_channels"),
        "scales": ("scales", "scales"),
    }

    def resolve_tokens(self, multi_scale: bool = False, **configured):
        """The token space, resolved once for every family: the tokenizer's (its kind checked when it was loaded),
        each configured value (vocab_size, grid_size, token_dim, scales) checked against it; without a tokenizer,
        the configured values, all of which must then be set. Returns them in the order given."""
        tok, path = self.tokenizer, self.hparams.tokenizer_ckpt
        if tok is None:
            missing = [name for name, value in configured.items() if value is None]
            if missing:
                raise ValueError(f"model.init_args.tokenizer_ckpt is not set, so "
                                 f"{' and '.join('model.init_args.' + m for m in missing)} must be set")  # fmt: skip
            return tuple(configured.values())
        has_scales = bool(getattr(tok, "scales", None))
        if has_scales and not multi_scale:
            raise ValueError(f"model.init_args.tokenizer_ckpt={path!r} is a multi-scale tokenizer (scales "
                             f"{list(tok.scales)}); {type(self).__name__} models one token grid (use ScaleARSystem, "
                             "or a vq, fsq or lfq tokenizer)")  # fmt: skip
        if multi_scale and not has_scales:
            kind = getattr(tok, "quantizer_type", type(getattr(tok, "quantizer", tok)).__name__)
            raise ValueError(f"model.init_args.tokenizer_ckpt={path} is a {kind!r} tokenizer without scales; "
                             f"{type(self).__name__} needs a multi-scale VQ tokenizer (TokenizerSystem with "
                             "quantizer 'msvq')")  # fmt: skip
        resolved = []
        for name, mine in configured.items():
            attr, what = self.TOKEN_SETTINGS[name]
            theirs = getattr(tok, attr)
            theirs = list(theirs) if name == "scales" else theirs
            if mine is not None and (list(mine) if name == "scales" else mine) != theirs:
                raise ValueError(f"model.init_args.{name}={list(mine) if name == 'scales' else mine} differs from the "
                                 f"tokenizer's {what}={theirs} ({path}); leave it unset (null) to take the "
                                 "tokenizer's")  # fmt: skip
            resolved.append(tuple(theirs) if name == "scales" else theirs)
        return tuple(resolved)

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

    def sampling_labels(self, labels: torch.Tensor, cfg: float, allow_null: bool = False) -> torch.Tensor:
        """Every family's first check of a sampling call, before any work: labels (B,) of integer class indices in
        range, and a cfg the model was trained for. Returns the labels (B,) long on this device (the rows a guided
        batch is conditioned on are `Guidance.rows`')."""
        self.check_cfg(cfg)
        if not (isinstance(labels, torch.Tensor) and labels.ndim == 1 and labels.dtype in INTEGER_DTYPES):
            got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, torch.Tensor) else repr(labels)
            raise ValueError(f"labels must be a 1D integer tensor of class indices; got {got}")
        self.check_labels(labels, allow_null)
        return labels.to(self.device, torch.long)

    def sampling_settings(self, values: SamplingSettings | dict | None = None, setting: str = "sampling"):
        """The family's typed settings from a mapping (None: `predict_kwargs`), refusing unknown keys by name."""
        if values is None:
            values = self.hparams.predict_kwargs
        return type(self).Sampling.parse(values, setting)

    def guidance(self, settings: SamplingSettings) -> Guidance:
        """The settings' guidance, its negative branch this model with the null class."""
        return settings.guidance(null_class=self.hparams.num_classes)

    # -- the generator: a core, a head and a method -----------------------------------------------------------------
    @property
    def core(self) -> nn.Module:
        """The family's core, under its checkpoints' name (`model`; the flow family's `core`)."""
        return self._modules[self.core_name]

    @property
    def head(self):
        """The family's head: its own module (`self.head = FlowHead(...)`: flow, diffusion), or the categorical head
        over the core's own output layer, which holds no weights of its own (checkpoint keys stay the core's)."""
        own = self._modules.get("head")
        return own if own is not None else CategoricalHead(self.core, compile=self.hparams.compile)

    # -- training randomness -------------------------------------------------------------------------------------
    def draws(self, stage: str, batch_idx: int) -> Draws:
        """The step's `Draws`, seeded by (run seed, stage, global step, batch index), drawn for the global batch and
        sliced to this rank: 1 and N processes draw the same for every sample."""
        trainer = self._trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        seed = self._run_seed if self._run_seed is not None else torch.initial_seed()
        return Draws.for_step(seed, stage, self.global_step, batch_idx, self.device, world, rank)

    def training_labels(self, labels: torch.Tensor, draws: Draws) -> torch.Tensor:
        """Labels with class dropout (the null class with probability class_dropout), drawn first in every step."""
        return draws.class_dropout(labels, self.hparams.class_dropout, self.hparams.num_classes)

    def batch_tokens(self, batch: dict):
        """The batch's tokens in the form the family's method takes, checked (families refine it)."""
        return self.tokens_from_batch(batch)

    def grid_tokens(self, batch: dict) -> torch.Tensor:
        """The batch's discrete tokens (B, L), checked against the core's grid (the causal families' batch_tokens)."""
        tokens = self.tokens_from_batch(batch)  # (B, L)
        core = self.core
        if tokens.ndim != 2 or tokens.shape[1] != core.num_tokens:
            raise ValueError(
                f"tokens of shape {tuple(tokens.shape)} do not fit the generator's {core.grid_size}x"
                f"{core.grid_size} grid ({core.num_tokens} tokens per image)"
            )
        return tokens

    def method_kwargs(self) -> dict:
        """What the family's method needs beyond the core and the head (VAR: the tokenizer's quantizer)."""
        return {}

    def loss_terms(self, batch: dict, draws: Draws, class_dropout: bool = True) -> dict[str, torch.Tensor]:
        """The method's loss terms on a batch: class dropout first (drawn first), then the method's own draw."""
        tokens = self.batch_tokens(batch)
        labels = self.training_labels(batch["label"], draws) if class_dropout else batch["label"]
        return self.method.loss(self.core, self.head, tokens, labels, draws, **self.method_kwargs())

    def loss(self, batch: dict, draws: Draws) -> torch.Tensor:
        """The loss on a batch and the given draws, with class dropout in training mode only."""
        return self.loss_terms(batch, draws, class_dropout=self.training)["loss"]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """The method's loss on the step's draws: class dropout first, then the method's own draw."""
        terms = self.loss_terms(batch, self.draws("train", batch_idx))
        # sync_dist: the logged loss is the global-batch loss, the same figure on 1 or N devices
        for name, value in terms.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", sync_dist=True)
        return terms["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        """The method's validation figures (`val/loss`, ...) on the batch: true labels, the stage's own draws."""
        terms = self.method.validation(self.core, self.head, self.batch_tokens(batch), batch["label"],
                                       self.draws("val", batch_idx), **self.method_kwargs())  # fmt: skip
        for name, value in terms.items():
            self.log(f"val/{name}", value, prog_bar=name == "loss", sync_dist=True)
        return terms

    # -- data ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, images: torch.Tensor, **kwargs):
        """Images -> the frozen tokenizer's tokens (`kwargs` go to its `encode`)."""
        if self.tokenizer is None:
            raise ValueError("this generator has no tokenizer: set model.init_args.tokenizer_ckpt")
        self.tokenizer.eval()
        return self.tokenizer.encode(images, **kwargs)

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
        # one run seed for every rank (rank 0's), whatever each process's own seeding was
        self._run_seed = int(self.trainer.strategy.broadcast(torch.initial_seed() & 0x7FFFFFFFFFFFFFFF))
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

    # -- optimisation ----------------------------------------------------------------------------------------
    def compile_in_place(self) -> None:
        """`compile`: each of the core's blocks compiled in place (a family adds what else it compiles)."""
        compile_blocks_in_place(self.core_blocks())

    def core_blocks(self) -> list[nn.Module]:
        """The core's transformer blocks: what is compiled, checkpointed and cast for sampling."""
        return list(self.core.blocks)

    def configure_model(self) -> None:
        # once, though Lightning calls the hook at every fit, validate, test and predict: compile first, then
        # activation checkpointing, whose patched forward the compiled blocks then trace
        if self.hparams.compile and not self._compiled:
            self.compile_in_place()
            self._compiled = True
        if self.hparams.activation_checkpointing:
            enable_activation_checkpointing(self)

    def make_optimizer(self) -> torch.optim.AdamW:
        """The training optimizer: AdamW over the trainable parameters, weight decay on matrices only; the frozen
        tokenizer is left out. Benchmarks time this optimizer too.

        The fused kernel where the parameters' device has one (CPU, CUDA) and no grad scaler is in use: it steps
        faster than the for-each and per-tensor forms (measured in benchmarks/RESULTS.md). Lightning refuses to clip
        a fused optimizer's gradients under its mixed-precision plugin, because such an optimizer may unscale fp16
        gradients inside its step (`_step_supports_amp_scaling`); without a grad scaler (fp32, bf16-mixed) there is
        nothing to unscale, so the flag is cleared and clipping stays exact. Under fp16-mixed (a grad scaler) the
        optimizer is not fused."""
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
    def sampling_call(self, labels: torch.Tensor, settings: dict, allow_null: bool = False):
        """Every family's first step of a sampling call, before any work: the typed settings (a misspelt key is
        refused by name), the labels checked and on this device, and the guidance object."""
        settings = self.sampling_settings(settings)
        labels = self.sampling_labels(labels, settings.cfg, allow_null)
        return labels, settings, self.guidance(settings)

    def cache_dtype(self) -> torch.dtype:
        """The KV cache's dtype: the autocast dtype where sampling runs under autocast, else the core's weights'."""
        if torch.is_autocast_enabled(self.device.type):
            return torch.get_autocast_dtype(self.device.type)
        return next(self.core.parameters()).dtype

    def sampling_modules(self) -> list[nn.Module]:
        """The modules whose linear weights are cast once per sampling call (see linears_in_autocast_dtype)."""
        return self.core_blocks()

    def sampling_kwargs(self) -> dict:
        """What the family's method takes at sampling beyond the core, head, labels, guidance and settings."""
        return self.method_kwargs()

    @torch.no_grad()
    def run_sampler(self, labels: torch.Tensor, generator: torch.Generator | None, settings: dict, **method_args):
        """labels (B,) -> the method's sample: settings typed, labels checked and the head's sampling settings
        checked before any work; the core (and the head) in eval mode, its linears cast once for the call."""
        labels, settings, guidance = self.sampling_call(labels, settings, allow_null=self.samples_null_class
                                                        and self.hparams.class_dropout > 0)  # fmt: skip
        core, head = self.core, self.head  # the categorical head is built once for the call
        head.check_sampling(settings)
        with contextlib.ExitStack() as stack:
            for module in (core, head):
                if isinstance(module, nn.Module):  # the categorical head holds no modules of its own
                    stack.enter_context(eval_mode(module))
            stack.enter_context(self.linears_cast_for_sampling(self.sampling_modules()))
            return self.method.sample(core, head, labels, guidance, settings, generator, **self.sampling_kwargs(),
                                      **method_args)  # fmt: skip

    def sample_tokens(self, labels: torch.Tensor, generator: torch.Generator | None = None, **settings):
        """labels (B,) -> tokens by the family's method, with the settings of the family's `Sampling`."""
        return self.run_sampler(labels, generator, settings)

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, generator: torch.Generator | None = None, **settings) -> torch.Tensor:
        """labels (B,) -> images (B, C, H, W) in [-1, 1]: `sample_tokens` with the family's settings (its
        `Sampling` dataclass: `--model.help` lists them), decoded by the tokenizer."""
        if self.tokenizer is None:
            raise ValueError("sample() decodes with the tokenizer: set model.init_args.tokenizer_ckpt")
        return self.decode(self.sample_tokens(labels, generator=generator, **settings))

    def load_init_weights(self, path: str) -> None:
        """Every weight but the tokenizer's from a checkpoint of this family (see `init_weights`), before any
        training state exists: the optimizer and schedule are then built over them as over fresh ones."""
        setting = "model.init_args.init_weights"
        saved = load_checkpoint(path, expected_system=type(self), module=self, setting=setting,
                                fresh=self.fresh_weights())["state_dict"]  # fmt: skip
        tokenizer = {k[len("tokenizer.") :]: v for k, v in saved.items() if k.startswith("tokenizer.")}
        if self.tokenizer is not None and any(not torch.equal(v, tokenizer[k].to(v.device))
                                              for k, v in self.tokenizer.state_dict().items()):  # fmt: skip
            raise ValueError(
                f"{setting}={path!r} was trained on the tokens of another tokenizer than "
                f"model.init_args.tokenizer_ckpt={self.hparams.tokenizer_ckpt!r}; fine-tune with the tokenizer it "
                "was trained on"
            )
        self.load_state_dict({k: v for k, v in saved.items() if not k.startswith("tokenizer.")}, strict=False)

    def fresh_weights(self) -> tuple[str, ...]:
        """Prefixes of this system's weights that `init_weights` may lack (they start fresh): none by default."""
        return ()

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
        images = self.sample(labels, generator=g, **self.hparams.predict_kwargs)
        uint8 = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, C, H, W)
        return {"images": uint8.cpu(), "labels": labels.cpu(), "index": index.cpu()}
