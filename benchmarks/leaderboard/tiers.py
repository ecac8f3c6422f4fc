"""The leaderboard's tiers: a tier is the data, the training budget, the evaluation protocol and the shared
classifier (the feature extractor of FID and class accuracy) and tokenizers (one per kind its methods need).

Every method of a tier trains for the same optimizer steps at the same batch size (so every row saw the same number
of training images) and is evaluated with the same class-balanced, seeded protocol (`lit_ar test` with the tier's
evaluation config), each with its own config's `predict_kwargs`.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    """What every generator of a tier trains for."""

    steps: int
    """Optimizer steps (`--trainer.max_steps`)."""
    batch: int
    """Batch size (`--data.batch_size`)."""
    args: tuple[str, ...] = ()
    """More `lit_ar` arguments of every generator run at this budget (a wall-time cap, the number of images, ...)."""
    token_cache: bool = False
    """Encode the training data once per tokenizer (`python -m lit_ar.data.token_cache`) and train on the codes."""
    cache_args: tuple[str, ...] = ()
    """The token cache's data and device arguments (with `token_cache`)."""
    generator_overlays: bool = False
    """Stack the tier's overlay of each generator config (`<overlay_dir>/<group>/<name>.yaml`) where one exists."""


@dataclass(frozen=True)
class Tier:
    name: str
    description: str
    dataset: str
    """The data in the configs' file names (`digits`, `shapes`): `Method.config` gets it as `{data}`."""
    classifier_config: str
    """The classifier config (the tier's overlay of it, if any, is stacked on it)."""
    classifier_ckpt: str
    """Which of the classifier's checkpoints the evaluation reads: best.ckpt (best validation accuracy) or last.ckpt."""
    tokenizer_config: str
    """The tokenizer configs, `{kind}` standing for vq, msvq or kl (the tier's overlay of each is stacked on it)."""
    eval_configs: tuple[str, ...]
    """The evaluation configs stacked on every generator's config for `lit_ar test`."""
    per_class: int
    """Evaluation samples of every class."""
    speed_batch: int
    """The batch whose sampling is timed for images/s."""
    cpu: Budget
    gpu: Budget
    """The budget `--gpu` selects."""
    overlay_dir: str | None = None
    """A folder of overlays mirroring `configs/` paths (configs/shapes32): stacked on the classifier and tokenizer
    configs, and on the generators' at a budget with `generator_overlays`."""
    classifier_args: tuple[str, ...] = ()
    tokenizer_args: tuple[str, ...] = ()
    generator_args: tuple[str, ...] = ()
    """Arguments of every generator run of the tier, at either budget (image size, no validation, ...)."""
    eval_args: tuple[str, ...] = ()
    """More arguments of every `lit_ar test` (e.g. the evaluation batch)."""
    gpu_tier: bool = False
    """Sized for a GPU: on a CPU the leaderboard warns that it takes days."""


DIGITS_SHAPES32_BUDGET = Budget(steps=1000, batch=32)  # notebooks/01_family_comparison.py's CPU tiers
# benchmarks/shapes32_gpu.sh: 40,000 distinct images encoded once, batch 256, 6000 steps or 4.5 minutes per run
SHAPES32_GPU_BUDGET = Budget(
    steps=6000,
    batch=256,
    args=tuple(
        "--data.num_train 40000 --data.num_val 500 --trainer.max_time 00:00:04:30 --model.init_args.compile false "
        "--data.num_workers 2".split()
    ),
    token_cache=True,
    cache_args=tuple(
        "--data.dataset shapes --data.image_size 32 --data.num_train 40000 --data.num_val 500 --data.num_workers 4 "
        "--batch_size 500 --device cuda".split()
    ),
    generator_overlays=True,
)
DEBUG_BUDGET = Budget(steps=16, batch=16)

TIERS: dict[str, Tier] = {
    "debug": Tier(
        name="debug",
        description="the debug configs (16x16 shapes, 4x4 tokens, tiny models): seconds per method; checks the "
        "pipeline, the figures mean nothing",
        dataset="shapes",
        classifier_config="configs/debug/classifier.yaml",
        classifier_ckpt="last.ckpt",
        tokenizer_config="configs/debug/tokenizer_{kind}.yaml",
        eval_configs=("configs/eval/generator_shapes.yaml",),
        per_class=4,
        speed_batch=20,
        cpu=DEBUG_BUDGET,
        gpu=DEBUG_BUDGET,
        classifier_args=("--trainer.max_steps", "100"),  # a weak classifier, but not a chance-level one
        tokenizer_args=("--trainer.max_steps", "8"),
        generator_args=("--trainer.limit_val_batches", "0"),
        eval_args=("--model.init_args.evaluator.init_args.batch_size", "40"),
    ),
    "digits": Tier(
        name="digits",
        description="scikit-learn's 1797 real handwritten digits at 32x32 grey (8x8 tokens), every method's "
        "shipped *_digits config; 1000 steps of batch 32",
        dataset="digits",
        classifier_config="configs/classifier/digits.yaml",
        classifier_ckpt="best.ckpt",
        tokenizer_config="configs/tokenizer/{kind}_digits.yaml",
        eval_configs=("configs/eval/generator_digits.yaml",),
        per_class=50,
        speed_batch=100,
        cpu=DIGITS_SHAPES32_BUDGET,
        gpu=DIGITS_SHAPES32_BUDGET,  # 1617 training images: a bigger batch would see each many more times
    ),
    "shapes32": Tier(
        name="shapes32",
        description="the procedural shapes at 32x32 (8x8 tokens): every method's shipped *_shapes config at 32x32, "
        "the classifier and tokenizers with their configs/shapes32 overlays; 1000 steps of batch 32 (CPU), or "
        "benchmarks/shapes32_gpu.sh's budget with --gpu",
        dataset="shapes",
        classifier_config="configs/classifier/shapes.yaml",
        classifier_ckpt="best.ckpt",
        tokenizer_config="configs/tokenizer/{kind}_shapes.yaml",
        eval_configs=("configs/eval/generator_shapes.yaml", "configs/shapes32/eval/generator_shapes.yaml"),
        per_class=50,
        speed_batch=100,
        cpu=DIGITS_SHAPES32_BUDGET,
        gpu=SHAPES32_GPU_BUDGET,
        overlay_dir="configs/shapes32",
        generator_args=("--data.image_size", "32"),
    ),
    "shapes64": Tier(
        name="shapes64",
        description="the procedural shapes at 64x64 (16x16 tokens, ImageNet-256's layout): every method's shipped "
        "*_shapes config as it is; 3000 steps of batch 32. A GPU tier",
        dataset="shapes",
        classifier_config="configs/classifier/shapes.yaml",
        classifier_ckpt="best.ckpt",
        tokenizer_config="configs/tokenizer/{kind}_shapes.yaml",
        eval_configs=("configs/eval/generator_shapes.yaml",),
        per_class=50,
        speed_batch=100,
        cpu=Budget(steps=3000, batch=32),
        gpu=Budget(steps=3000, batch=32),
        gpu_tier=True,
    ),
}
