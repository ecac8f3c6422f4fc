"""The leaderboard's registry of methods: one `Method` per row, added with `register(...)`.

A new method (a family's variant, one written in a tutorial) owes its row: one call, e.g.

    from benchmarks.leaderboard import Method, register

    register(Method(
        name="LlamaGen (top-k 8)",
        paper="https://arxiv.org/abs/2406.06525",
        config="configs/causal/llamagen_{data}.yaml",  # {data}: the tier's dataset (digits or shapes)
        debug_config="configs/debug/causal.yaml",        # the `debug` tier's config
        tokenizer="vq",
        overrides={"*": ["--model.init_args.predict_kwargs", "{cfg: 2.0, top_k: 8}"]},
    ))

and `python -m benchmarks.leaderboard --tier digits --methods "LlamaGen (top-k 8)"` trains and evaluates it at the
tier's budget, under the tier's protocol, next to the others.
"""

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from benchmarks.leaderboard.tiers import TIERS, Budget

TOKENIZER_KINDS = ("vq", "msvq", "kl")
# What an override list may be: fixed arguments, or arguments made from the tier's budget (e.g. RAR's anneal steps)
Overrides = Sequence[str] | Callable[[Budget], Sequence[str]]


@dataclass(frozen=True)
class Method:
    """One row of the leaderboard: a generator config and what it needs."""

    name: str
    """The method's name as the field writes it: the row's label and its `--methods` name."""
    paper: str
    """Link to the paper (or to the code) the method comes from."""
    config: str | None
    """The generator config of the data tiers, `{data}` standing for the tier's dataset (`digits` or `shapes`):
    `configs/causal/llamagen_{data}.yaml`. None: the method has only a debug config."""
    debug_config: str | None
    """The generator config of the `debug` tier (`configs/debug/...`, trains in seconds). None: no debug row."""
    tokenizer: str
    """The tokenizer kind its tokens come from: `vq`, `msvq` or `kl`. A tier trains one tokenizer of each kind its
    methods need, shared by them."""
    overrides: Mapping[str, Overrides] = field(default_factory=dict)
    """Extra `lit_ar` arguments by tier: key `*` for every tier, a tier's name (both budgets) or `<tier>:gpu` (its GPU
    budget only), applied in that order after the config. A `--config FILE` pair stacks FILE on the config. A
    callable gets the tier's `Budget` and returns the arguments."""
    notes: str = ""
    """One line on what the row runs, where that differs from the paper (shown in the JSON and the docs)."""
    samples: str | None = None
    """A sampling variant: the name of the row whose trained run this row evaluates, with its own `overrides` at
    evaluation only (speculative decoding of LlamaGen's run, say). It trains nothing of its own; its config is the
    other row's."""

    @property
    def slug(self) -> str:
        """The row's folder name: the name in lower case, runs of other characters as `_` ("MAR (DDPM head)" ->
        mar_ddpm_head)."""
        return re.sub(r"[^a-z0-9]+", "_", self.name.lower()).strip("_")

    def config_for(self, tier: str, dataset: str) -> str | None:
        """The generator config of this method in `tier` (whose data is `dataset`), or None where it has none."""
        if tier == "debug":
            return self.debug_config
        return None if self.config is None else self.config.format(data=dataset)

    def overrides_for(self, tier: str, gpu: bool, budget: Budget) -> list[str]:
        keys = ["*", tier] + ([f"{tier}:gpu"] if gpu else [])
        args: list[str] = []
        for key in keys:
            value = self.overrides.get(key, ())
            args += [str(a) for a in (value(budget) if callable(value) else value)]
        return args


METHODS: dict[str, Method] = {}
"""Every registered method by name, in the order of the leaderboard's rows."""


def register(method: Method, replace: bool = False) -> Method:
    """Add `method`'s row to the leaderboard (after the rows registered before it) and return it. A name (or a
    folder name, `Method.slug`) already taken is refused unless `replace`, which puts the new entry in its place."""
    if not method.name.strip() or not method.slug:
        raise ValueError(f"Method.name={method.name!r}: a method needs a name with letters or digits")
    if method.tokenizer not in TOKENIZER_KINDS:
        raise ValueError(f"Method.tokenizer={method.tokenizer!r} (method {method.name!r}) is not a tokenizer kind; "
                         f"accepted: {', '.join(TOKENIZER_KINDS)}")  # fmt: skip
    if method.config is None and method.debug_config is None:
        raise ValueError(f"method {method.name!r} has neither a config nor a debug_config: it has no tier to run in")
    if method.samples is not None and method.samples not in METHODS:
        raise ValueError(f"Method.samples={method.samples!r} (method {method.name!r}) names no registered row; "
                         f"registered: {', '.join(METHODS)}")  # fmt: skip
    valid = {"*", *TIERS, *(f"{t}:gpu" for t in TIERS)}
    if unknown := sorted(set(method.overrides) - valid):
        raise ValueError(f"Method.overrides of {method.name!r} has keys {unknown}; accepted: '*', a tier "
                         f"({', '.join(TIERS)}) or '<tier>:gpu'")  # fmt: skip
    taken = {m.slug: name for name, m in METHODS.items() if name != method.name}
    if not replace and method.name in METHODS:
        raise ValueError(f"a method named {method.name!r} is registered already; pass replace=True to replace it")
    if method.slug in taken:
        other = taken[method.slug]
        raise ValueError(f"method {method.name!r} would share the run folder {method.slug!r} with {other!r}; give "
                         "it another name")  # fmt: skip
    METHODS[method.name] = method
    return method


def unregister(name: str) -> Method:
    """Remove a method's row (e.g. one a test or a tutorial registered); returns it."""
    if name not in METHODS:
        raise KeyError(f"no method named {name!r} is registered; registered: {', '.join(METHODS)}")
    return METHODS.pop(name)


def rar_anneal(budget: Budget) -> list[str]:
    """RAR's random-order anneal at the shipped fractions of training (from 1/4 to 3/4 of the steps), not at the
    shipped step numbers."""
    return ["--model.init_args.rar_anneal_start", str(budget.steps // 4),
            "--model.init_args.rar_anneal_end", str(3 * budget.steps // 4)]  # fmt: skip


# -- the rows --------------------------------------------------------------------------------------------------------
# Each family's shipped config as it is; the tier changes the budget, the image size and the tokenizer path.
register(
    Method(
        name="LlamaGen",
        paper="https://arxiv.org/abs/2406.06525",
        config="configs/causal/llamagen_{data}.yaml",
        debug_config="configs/debug/causal.yaml",
        tokenizer="vq",
    )
)
register(
    Method(
        name="RAR",
        paper="https://arxiv.org/abs/2411.00776",
        config="configs/causal/rar_{data}.yaml",
        debug_config="configs/debug/rar.yaml",
        tokenizer="vq",
        overrides={
            "*": rar_anneal,
            # the GPU budget trains RAR at LlamaGen's shapes32 size, as benchmarks/shapes32_gpu.sh does
            "shapes32:gpu": ["--config", "configs/shapes32/causal/llamagen_shapes.yaml"],
        },
        notes="the random-order anneal from 1/4 to 3/4 of the tier's steps",
    )
)
register(
    Method(
        name="MaskGIT",
        paper="https://arxiv.org/abs/2202.04200",
        config="configs/masked/maskgit_{data}.yaml",
        debug_config="configs/debug/masked.yaml",
        tokenizer="vq",
    )
)
register(
    Method(
        name="VAR",
        paper="https://arxiv.org/abs/2404.02905",
        config="configs/scale/var_{data}.yaml",
        debug_config="configs/debug/scale.yaml",
        tokenizer="msvq",
        overrides={"shapes32": ["--model.init_args.scales", "null"]},
        notes="shapes32: the multi-scale tokenizer's scales (VAR's, rescaled to the 8x8 grid)",
    )
)
register(
    Method(
        name="MAR",
        paper="https://arxiv.org/abs/2406.11838",
        config="configs/flow/mar_{data}.yaml",
        debug_config="configs/debug/flow_mar.yaml",
        tokenizer="kl",
        notes="MAR's bidirectional random-order backbone with the config's head: lit_ar's flow-matching head",
    )
)
register(
    Method(
        name="MAR (DDPM head)",
        paper="https://arxiv.org/abs/2406.11838",
        config="configs/flow/mar_{data}.yaml",
        debug_config="configs/debug/flow_mar.yaml",
        tokenizer="kl",
        overrides={"*": ["--model.init_args.head", "diffusion"]},
        notes="MAR's own diffusion head (cosine DDPM, learned variance); the config's flow_steps are its DDPM steps",
    )
)
register(
    Method(
        name="FlowAR",
        paper="https://arxiv.org/abs/2412.15205",
        config="configs/flow/flowar_{data}.yaml",
        debug_config="configs/debug/flow_flowar.yaml",
        tokenizer="kl",
    )
)
register(
    Method(
        name="xAR",
        paper="https://arxiv.org/abs/2502.20388",
        config="configs/flow/xar_{data}.yaml",
        debug_config="configs/debug/xar.yaml",
        tokenizer="kl",
        notes="next-cell prediction (2x2 cells of 4x4 tokens on digits, 4x4 cells on shapes), noisy context "
        "learning, the backbone denoising with flow matching (no head); sized to FlowAR's parameters",
    )
)
register(
    Method(
        name="xAR (clean context)",
        paper="https://arxiv.org/abs/2502.20388",
        config="configs/flow/xar_{data}.yaml",
        debug_config="configs/debug/xar.yaml",
        tokenizer="kl",
        overrides={"*": ["--model.init_args.context", "clean"]},
        notes="lit_ar's ablation of noisy context learning: clean teacher forcing (the earlier cells clean in "
        "training, as at sampling)",
    )
)
register(
    Method(
        name="xAR (class token)",
        paper="https://arxiv.org/abs/2502.20388",
        config="configs/flow/xar_{data}.yaml",
        debug_config="configs/debug/xar.yaml",
        tokenizer="kl",
        overrides={"*": ["--model.init_args.class_token", "true"]},
        notes="not xAR's: a class token every entity attends to, besides the class in the AdaLN condition",
    )
)
register(
    Method(
        name="causal+flow",
        paper="https://arxiv.org/abs/2406.11838",
        config="configs/flow/flowar_{data}.yaml",
        debug_config="configs/debug/flow_flowar.yaml",
        tokenizer="kl",
        overrides={"*": ["--model.init_args.backbone", "causal"]},
        notes="continuous tokens in raster order, causal attention, the flow head: MAR's causal baseline, run as "
        "FlowAR's config with backbone: causal",
    )
)
register(
    Method(
        name="RandAR",
        paper="https://arxiv.org/abs/2412.01827",
        config="configs/causal/randar_{data}.yaml",
        debug_config="configs/debug/any_order.yaml",
        tokenizer="vq",
        notes="a random order per sample, target-position queries through the target-aware embedding (RandAR "
        "interleaves position-instruction tokens); sequential sampling in a random order",
    )
)
register(
    Method(
        name="DAR (diagonal order)",
        paper="https://arxiv.org/abs/2503.11129",
        config="configs/causal/dar_{data}.yaml",
        debug_config="configs/debug/any_order.yaml",
        tokenizer="vq",
        overrides={"*": ["--model.init_args.order", "diagonal"]},
        notes="DAR's diagonal order with target-position queries, direction embeddings and a RoPE over the current and "
        "next position (DAR's 4D RoPE as lit_ar reads the paper)",
    )
)
register(
    Method(
        name="PAR (order)",
        paper="https://arxiv.org/abs/2412.15119",
        config="configs/causal/par_{data}.yaml",
        debug_config="configs/debug/any_order.yaml",
        tokenizer="vq",
        overrides={"*": ["--model.init_args.order", "par"]},
        notes="PAR's region-interleaved order over 2x2 regions, decoded one token per step (not its parallel steps)",
    )
)
register(
    Method(
        name="PAR",
        paper="https://arxiv.org/abs/2412.15119",
        config="configs/causal/par_{data}.yaml",
        debug_config="configs/debug/any_order.yaml",
        tokenizer="vq",
        overrides={"*": ["--model.init_args.order", "par", "--model.init_args.parallel", "true"]},
        notes="PAR's parallel groups over 2x2 regions: the four regions' first tokens in turn, then one token per "
        "region per call (k + L / k - 1 calls), transition tokens and group-wise full attention",
    )
)
register(
    Method(
        name="ARPG",
        paper="https://arxiv.org/abs/2503.10568",
        config="configs/causal/arpg_{data}.yaml",
        debug_config="configs/debug/arpg.yaml",
        tokenizer="vq",
        notes="randomized parallel decoding in a quarter of the tokens' steps (ARPG's 64 for 256 tokens), arccos "
        "schedule, CFG ramped linearly",
    )
)
register(
    Method(
        name="ARPG (query position embedding)",
        paper="https://arxiv.org/abs/2503.10568",
        config="configs/causal/arpg_{data}.yaml",
        debug_config="configs/debug/arpg.yaml",
        tokenizer="vq",
        overrides={"*": ["--model.init_args.query_position_embedding", "true"]},
        notes="not ARPG's: a learned target-position embedding added to each query (ARPG's queries know their "
        "target through RoPE only)",
    )
)


def sjd_settings(**settings: str) -> list[str]:
    """The arguments of a row that decodes by SJD (window 16) with `settings` (decoding, window, acceptance,
    lantern_k, ...)."""
    out = []
    for key, value in {"decoding": "sjd", "window": "16", **settings}.items():
        out += [f"--model.init_args.predict_kwargs.{key}", value]
    return out


register(
    Method(
        name="LPD",
        paper="https://arxiv.org/abs/2507.01957",
        config="configs/causal/lpd_{data}.yaml",
        debug_config="configs/debug/lpd.yaml",
        tokenizer="vq",
        notes="locality-aware parallel decoding in a quarter of the tokens' steps on digits (LPD's 20 for 256 on "
        "shapes), cosine group sizes; trained on 64 ... 4-step schedules drawn per step",
    )
)
register(
    Method(
        name="LlamaGen + SJD",
        paper="https://arxiv.org/abs/2410.01699",
        config="configs/causal/llamagen_{data}.yaml",
        debug_config="configs/debug/causal.yaml",
        tokenizer="vq",
        samples="LlamaGen",
        overrides={"*": sjd_settings()},
        notes="LlamaGen's run decoded by speculative Jacobi decoding (window 16, uniform initialisation, "
        "per-sequence acceptance): no training of its own",
    )
)
register(
    Method(
        name="LlamaGen + LANTERN",
        paper="https://arxiv.org/abs/2410.03355",
        config="configs/causal/llamagen_{data}.yaml",
        debug_config="configs/debug/causal.yaml",
        tokenizer="vq",
        samples="LlamaGen",
        overrides={"*": sjd_settings(acceptance="lantern")},
        notes="LlamaGen's run decoded by SJD with LANTERN's relaxed acceptance (k 1000 capped at the vocabulary, "
        "delta 0.1) on SJD's own drafts, no trained drafter",
    )
)
register(
    Method(
        name="LlamaGen + LANTERN (k 16)",
        paper="https://arxiv.org/abs/2410.03355",
        config="configs/causal/llamagen_{data}.yaml",
        debug_config="configs/debug/causal.yaml",
        tokenizer="vq",
        samples="LlamaGen",
        overrides={"*": sjd_settings(acceptance="lantern", lantern_k="16")},
        notes="LANTERN's k scaled to the vocabulary: 16 of 256 codes, the share LANTERN's 1000 are of LlamaGen's "
        "16384; delta 0.1",
    )
)
register(
    Method(
        name="LlamaGen + drafter",
        paper="https://arxiv.org/abs/2410.03355",
        config="configs/causal/llamagen_{data}.yaml",
        debug_config="configs/debug/causal.yaml",
        tokenizer="vq",
        overrides={"*": ["--model.init_args.drafter", "true", *sjd_settings(decoding="speculative", window="6")]},
        notes="LlamaGen trained with LANTERN's drafter beside it (EAGLE's one-block feature drafter, on the frozen "
        "states); speculative decoding with 5 chained drafts per call (no draft tree), strict acceptance",
    )
)
register(
    Method(
        name="LlamaGen + drafter + LANTERN",
        paper="https://arxiv.org/abs/2410.03355",
        config="configs/causal/llamagen_{data}.yaml",
        debug_config="configs/debug/causal.yaml",
        tokenizer="vq",
        samples="LlamaGen + drafter",
        overrides={"*": sjd_settings(decoding="speculative", window="6", acceptance="lantern", lantern_k="16")},
        notes="the drafter's drafts under LANTERN's relaxed acceptance (k 16 of 256 codes, delta 0.1)",
    )
)
register(
    Method(
        name="LlamaGen + drafter (sequential)",
        paper="https://arxiv.org/abs/2406.06525",
        config="configs/causal/llamagen_{data}.yaml",
        debug_config="configs/debug/causal.yaml",
        tokenizer="vq",
        samples="LlamaGen + drafter",
        overrides={"*": ["--model.init_args.predict_kwargs.decoding", "sequential"]},
        notes="the drafter run's model decoded one token per call: the distribution its strict row keeps",
    )
)
