"""lit_ar against the peers' own samplers, side by side in one process: LlamaGen's `generate()` (GPT-B), VAR's
`autoregressive_infer_cfg` (d16) and MAR's `sample_tokens` (MAR-B), each against lit_ar's model of the same size at
the same settings, precision and batch, alternating so that both see the same machine state.

The peers' code is not part of lit_ar: point `--peer-root` at a folder holding unmodified checkouts named
`LlamaGen`, `VAR` and `mar` (github.com/FoundationVision/LlamaGen, FoundationVision/VAR, LTH14/mar). Their models
are built from their own constructors with random weights (speed does not depend on the weights), so no download.

    python -m benchmarks.peers --peer-root ~/src --families llamagen var mar --precisions fp32 bf16-autocast
    python -m benchmarks.peers --peer-root ~/src --families llamagen --compile   # + both sides compiled
    python -m benchmarks.peers --peer-root ~/src --families llamagen-train       # GPT-B training steps, batch 8
    python -m benchmarks.peers --peer-root ~/src --families mar-train            # MAR-B training steps, batch 8

Training rows (`llamagen-train`, `mar-train`) and VAR rows run each side in processes of its own, in turn
(`--isolate N`, default 2 a side): one process holding both models slows lit_ar's side on a 2-core CPU (see
`train_rows`).
The LlamaGen and MAR sampling rows, and `--isolate 0`, alternate the two sides call by call in one process.

Settings (the issues' anchors): LlamaGen GPT-B, batch 4, CFG 2.0 (forward batch 8), 256 tokens, top-k off;
VAR-d16, batch 2, CFG 1.5 (forward batch 4), top-k 900 / top-p 0.96 as VAR's demo, the tokenizer's decode excluded
on both sides; MAR-B, batch 2 (`--mar-batch`), CFG 2.9 linear, MAR at 64 AR steps and its 100 diffusion steps against
lit_ar at each `--mar-settings` entry (AR steps, head sampler and steps; default 64:euler:25; `ddpm` takes MAR's own
DDPM head, so 64:ddpm:100 is MAR's algorithm at MAR-B's exact size, the same work on both sides). Token
generation only (no decode to pixels) on every row. MAR's sampler calls `.cuda()` on the tensors it makes; on a
CPU-only machine that call is made a no-op while MAR samples (its code stays as it is). MAR imports timm, which needs
torchvision, which does not import beside this project's torch 2.13 CPU build: run MAR's rows from another
environment, e.g. `pip install torch==2.14.1 torchvision==0.29.1 timm && pip install -e .`.

Precisions: `fp32`; `bf16-autocast` (both under torch.autocast); `bf16-weights` (both models cast to bfloat16, as
LlamaGen's sample script does). `--compile`: LlamaGen as its sample script compiles (`torch.compile(model,
mode="reduce-overhead", fullgraph=True)`), lit_ar with `compile: true`; VAR and MAR have no compile option.
"""

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.common import (
    aten_calls,
    machine,
    optimizer_step,
    parameter_count,
    precision_context,
    print_table,
    time_call,
    write_json,
)


def maybe_bf16(module: torch.nn.Module, precision: str) -> torch.nn.Module:
    return module.to(torch.bfloat16) if precision == "bf16-weights" else module.float()


PEER_CHECKOUTS = ("LlamaGen", "VAR", "mar")  # the folders under --peer-root
PEER_PACKAGES = ("models", "utils", "autoregressive", "tokenizer", "dist", "diffusion")  # their top-level packages


def on_path(folder: Path) -> None:
    """Import one peer's packages from its checkout, and no other peer's: their top-level names collide (VAR's and
    MAR's `models`), and a regular package later on the path shadows a namespace package earlier on it (MAR's
    `models` has no __init__.py, VAR's has), so the other checkouts leave the path too."""
    for name in [m for m in sys.modules if m.split(".")[0] in PEER_PACKAGES]:
        del sys.modules[name]
    sys.path[:] = [p for p in sys.path if Path(p).parent != folder.parent or Path(p).name not in PEER_CHECKOUTS]
    sys.path.insert(0, str(folder))


# ---------------------------------------------------------------------------------------------------- LlamaGen GPT-B
def llamagen_rows(root: Path, device: str, precisions: list[str], compile: bool, repeat: int) -> list[dict]:
    from benchmarks.causal_ar import make_system

    on_path(root / "LlamaGen")
    from autoregressive.models.generate import generate
    from autoregressive.models.gpt import GPT_B

    batch, cfg = 4, 2.0
    labels = torch.arange(batch, device=device)
    torch.manual_seed(0)
    peer = GPT_B(vocab_size=16384, block_size=256, num_classes=1000, cls_token_num=1, model_type="c2i")
    peer = peer.to(device).eval()
    ours = make_system("GPT-B", 16384, 16, 1000, compile, device)
    n_peer, n_ours = (parameter_count(m) for m in (peer, ours.model))
    rows = []
    for precision in precisions:
        peer, ours = maybe_bf16(peer, precision), maybe_bf16(ours, precision)
        peer_fn = torch.compile(peer, mode="reduce-overhead", fullgraph=True) if compile else peer

        def run_peer():
            with torch.no_grad(), precision_context(precision, device):
                generate(peer_fn, labels, 256, cfg_scale=cfg, cfg_interval=-1, temperature=1.0, top_k=0, top_p=1.0,
                         sample_logits=True)  # fmt: skip

        def run_ours():
            g = torch.Generator(device).manual_seed(0)
            with precision_context(precision, device):
                ours.generate(labels, cfg=cfg, generator=g)

        rows.append(pair("LlamaGen GPT-B", n_peer, n_ours, precision, compile, batch, run_peer, run_ours, repeat))
        print_table(rows[-1:])
    return rows


def llamagen_train_step(root: Path, device: str, side: str, compile: bool, batch: int, preset: str = "GPT-B"):
    """One side's training step of GPT-B on random tokens, as LlamaGen's train_c2i.py makes it: forward with targets
    (LlamaGen's own loss), backward, AdamW step; both sides with LlamaGen's training dropout (0.1 on tokens and on
    each residual branch) and class dropout 0.1. `compile`: LlamaGen as train_c2i.py does by default
    (`torch.compile(model)`), lit_ar with `compile: true` (each block in place). Returns (step(precision), params).
    `preset` sizes lit_ar's side (tests use a tiny one; the peer's side is always its GPT_B)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 16384, (batch, 256), generator=g).to(device)  # (B, L)
    labels = (torch.arange(batch) % 1000).to(device)
    if side == "peer":
        on_path(root / "LlamaGen")
        from autoregressive.models.gpt import GPT_B

        model = GPT_B(vocab_size=16384, block_size=256, num_classes=1000, cls_token_num=1, model_type="c2i").to(device)
        model.train()
        fn = torch.compile(model) if compile else model
        # LlamaGen's train_c2i.py decays matrices only (weight decay 0.05, betas 0.9/0.95) and uses the fused AdamW
        # wherever torch has one
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=True)

        def loss_of():
            return fn(cond_idx=labels, idx=tokens[:, :-1], targets=tokens)[1]
    else:
        from lit_ar.systems.causal_ar import CausalARSystem

        model = CausalARSystem(preset=preset, vocab_size=16384, grid_size=16, num_classes=1000, image_size=256,
                               token_dropout=0.1, resid_dropout=0.1, compile=compile).to(device)  # fmt: skip
        model.configure_model()  # `compile` applies here, as the Trainer's hook does
        model.train()
        opt = model.make_optimizer()  # what its configure_optimizers returns

        def loss_of():
            return model.training_step({"tokens": tokens, "label": labels}, 0)

    return optimizer_step(loss_of, opt, device), parameter_count(model if side == "peer" else model.model)


def train_side_times(root: Path, device: str, family: str, side: str, precision: str, compile: bool, repeat: int,
                     batch: int, preset: str | None) -> dict:  # fmt: skip
    """Seconds of each of `repeat` training steps of one side, after two warm-up steps (compilation, allocator,
    the optimizer's state)."""
    step, params = TRAIN[family][1](root, device, side, compile, batch, preset or TRAIN[family][2])
    return side_times(lambda: step(precision), params, warmup=2, repeat=repeat)


def side_times(run, params: int, warmup: int, repeat: int) -> dict:
    """A worker process's result: the seconds of each of `repeat` calls of `run` after `warmup` untimed ones."""
    for _ in range(warmup):
        run()
    return {"times": [time_call(run, warmup=0, repeat=1) for _ in range(repeat)], "params": params}


def train_rows(family: str, root: Path, device: str, precisions: list[str], compile: bool, repeat: int,
               isolate: int, batch: int = 8, preset: str | None = None) -> list[dict]:  # fmt: skip
    """Training steps of `family` (`llamagen-train`: GPT-B, `llamagen_train_step`; `mar-train`: MAR-B,
    `mar_train_step`), the peer's against lit_ar's.

    isolate = N > 0 (the default): each side trains in a process of its own, N processes a side, started in turn
    (peer, lit_ar, peer, ...), each timing `repeat` steps; the row gives the median over all of a side's steps. A
    training run holds one model, and sharing one process changes a side's speed: on a 2-core CPU, lit_ar's
    compiled GPT-B beside LlamaGen's compiled one took 2-4x the page faults per step it takes alone, and ran 10-20%
    slower. isolate = 0: both in this process, interleaved step by step (as the sampling rows are)."""
    name, make_step, default_preset = TRAIN[family]
    preset = preset or default_preset
    rows = []
    if not isolate:
        sides = {s: make_step(root, device, s, compile, batch, preset) for s in ("peer", "ours")}
    for precision in precisions:
        if isolate:
            row = isolated_row(name, root, family, precision, compile, repeat, batch, isolate,
                               ["--train-batch", str(batch), "--train-preset", preset])  # fmt: skip
        else:
            (run_peer, n_peer), (run_ours, n_ours) = sides["peer"], sides["ours"]
            row = pair(name, n_peer, n_ours, precision, compile, batch, lambda: run_peer(precision),
                       lambda: run_ours(precision), repeat)  # fmt: skip
            row["processes"] = "one, shared"
        for side in ("peer", "lit_ar"):  # a training step's images are 256 tokens each (GPT-B's and MAR-B's grids)
            row[f"{side} tokens/s"] = row[f"{side} images/s"] * 256
        rows.append(row)
        print_table(rows[-1:])
    return rows


def isolated_row(name: str, root: Path, family: str, precision: str, compile: bool, repeat: int, batch: int,
                 isolate: int, extra: list[str]) -> dict:  # fmt: skip
    """A row from `isolate` worker processes a side (`run_side_process`), started in turn (peer, lit_ar, peer,
    ...): each side's images/s is `batch` over the median of all its timed calls."""
    times, params = {"peer": [], "ours": []}, {}
    for _ in range(isolate):
        for side in ("peer", "ours"):
            out = run_side_process(root, family, side, precision, compile, repeat, extra)
            times[side] += out["times"]
            params[side] = out["params"]
    ips = {s: batch / sorted(t)[len(t) // 2] for s, t in times.items()}
    row = ratio_row(name, params["peer"], params["ours"], precision, compile, batch, ips)
    row["processes"] = f"{isolate} a side"
    return row


def run_side_process(root: Path, family: str, side: str, precision: str, compile: bool, repeat: int,
                     extra: list[str]) -> dict:  # fmt: skip
    """One side of a `family` row timed in a fresh Python process; its last line of output is the JSON result."""
    cmd = [sys.executable, "-m", "benchmarks.peers", "--peer-root", str(root), "--families", family, "--precisions",
           precision, "--repeat", str(repeat), "--side", side, *extra] + (["--compile"] if compile else [])  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if done.returncode != 0:
        raise RuntimeError(f"the {side} {family} process failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------- VAR-d16
VAR_BATCH, VAR_CFG = 2, 1.5


def build_var_peer(root: Path, device: str):
    """VAR's own d16 (random weights) and a sampler for it; returns (peer, run(precision))."""
    on_path(root / "VAR")
    import torch.nn as nn

    # build_vae_var disables these layers' default initialisation for speed, for the whole process: keep ours
    saved = {c: c.reset_parameters for c in (nn.Linear, nn.LayerNorm, nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d,
                                             nn.ConvTranspose2d, nn.BatchNorm2d, nn.SyncBatchNorm)}  # fmt: skip
    from models import build_vae_var

    torch.manual_seed(0)
    vae, peer = build_vae_var(device=device, V=4096, Cvae=32, ch=160, share_quant_resi=4, num_classes=1000, depth=16,
                              shared_aln=False)  # fmt: skip
    for c, fn in saved.items():
        c.reset_parameters = fn
    # VAR's tokenizer is meant to be loaded from its checkpoint right after: its layers were left uninitialised
    # (torch.empty: NaN on a GPU, whose sampler then asserts; on a CPU whatever the reused memory held). Subclasses
    # count too: VAR's Phi refinement convs are nn.Conv2d subclasses, left empty otherwise.
    for m in vae.modules():
        base = next((c for c in type(m).__mro__ if c in saved), None)
        if base is not None:
            saved[base](m)
    vae.fhat_to_img = lambda f_hat: f_hat  # the anchors exclude the tokenizer's decode: ours stops at tokens too
    peer.eval()
    labels = torch.arange(VAR_BATCH, device=device)
    state = {"model": peer}

    def run(precision: str):
        if state.get("precision") != precision:  # cast once, outside the timed calls that follow
            state["model"], state["precision"] = maybe_bf16(state["model"], precision), precision
            vae.to(torch.float32)  # VAR keeps its quantizer in fp32 under bf16 weights, as ours does
        with torch.inference_mode(), precision_context(precision, device):
            state["model"].autoregressive_infer_cfg(B=VAR_BATCH, label_B=labels, g_seed=0, cfg=VAR_CFG, top_k=900,
                                                    top_p=0.96)  # fmt: skip

    return peer, run


def build_var_ours(device: str, compile: bool, depth: int = 16):
    """lit_ar's VAR at `depth` (d16: VAR-d16's size) and a sampler with VAR's demo settings; (system, run)."""
    from benchmarks.scale_ar import make_var, tokenizer_ckpt

    with tempfile.TemporaryDirectory(prefix="lit_ar_peers_") as folder:  # the system reads its tokenizer once, here
        ckpt = tokenizer_ckpt(Path(folder), "var_msvq16", 256, 4096, 32)
        state = {"system": make_var(ckpt, depth, 1000, 256, compile, device)}
    labels = torch.arange(VAR_BATCH, device=device)

    def run(precision: str):
        if state.get("precision") != precision:  # cast once, outside the timed calls that follow
            state["system"], state["precision"] = maybe_bf16(state["system"], precision), precision
        g = torch.Generator(device).manual_seed(0)
        with precision_context(precision, device):
            state["system"].sample_tokens(labels, cfg=VAR_CFG, top_k=900, top_p=0.96, generator=g)

    return state["system"], run


def var_side_times(root: Path, device: str, side: str, precision: str, compile: bool, repeat: int,
                   depth: int = 16) -> dict:  # fmt: skip
    """Seconds of each of `repeat` sampling calls of one side, after a warm-up call (and compilation)."""
    model, run = build_var_peer(root, device) if side == "peer" else build_var_ours(device, compile, depth)
    params = parameter_count(model if side == "peer" else model.model)
    return side_times(lambda: run(precision), params, warmup=1, repeat=repeat)


def var_rows(root: Path, device: str, precisions: list[str], compile: bool, repeat: int, isolate: int = 0,
             count_calls: bool = False, depth: int = 16) -> list[dict]:  # fmt: skip
    """VAR-d16 sampling, VAR's `autoregressive_infer_cfg` against lit_ar's, batch 2, CFG 1.5, top-k 900, top-p 0.96.

    isolate = N > 0: each side samples in processes of its own, N a side, started in turn, each timing `repeat`
    calls; the row gives the median over a side's calls (see `train_rows` for why). isolate = 0: both in
    this process, interleaved call by call."""
    rows = []
    if not isolate:
        (peer, run_peer), (ours, run_ours) = build_var_peer(root, device), build_var_ours(device, compile, depth)
        n_peer, n_ours = parameter_count(peer), parameter_count(ours.model)
    for precision in precisions:
        if isolate:
            row = isolated_row("VAR-d16", root, "var", precision, compile, repeat, VAR_BATCH, isolate,
                               ["--var-depth", str(depth)])  # fmt: skip
        else:
            row = pair("VAR-d16", n_peer, n_ours, precision, compile, VAR_BATCH, lambda: run_peer(precision),
                       lambda: run_ours(precision), repeat, count_calls)  # fmt: skip
            row["processes"] = "one, shared"
        rows.append(row)
        print_table(rows[-1:])
    return rows


# ---------------------------------------------------------------------------------------------------- MAR-B
@contextlib.contextmanager
def cuda_calls_stay_on(device: str):
    """MAR hard-codes `.cuda()` on the tensors its sampler creates: off a GPU, keep them where they are."""
    if device == "cuda":
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def mar_head(sampler: str) -> str:
    """The head a `--mar-settings` sampler runs on: `ddpm` is MAR's diffusion head, the others the flow head's."""
    return "diffusion" if sampler == "ddpm" else "flow"


def mar_setting(text: str) -> tuple[int, str, int]:
    """'AR_STEPS:SAMPLER:FLOW_STEPS' (e.g. 64:euler:25) -> (64, 'euler', 25); the sampler `ddpm` means lit_ar's
    diffusion head (MAR's), any other the flow head's."""
    try:
        ar, sampler, flow = text.split(":")
        return int(ar), sampler, int(flow)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--mar-settings {text!r}: expected AR_STEPS:SAMPLER:FLOW_STEPS, "
                                         "e.g. 64:euler:25 or 32:heun:4") from None  # fmt: skip


def mar_train_step(root: Path, device: str, side: str, compile: bool, batch: int, preset: str = "mar_b"):
    """One side's training step of MAR-B on random 16-channel latents (a 16x16 grid, as MAR's KL-16 makes of a 256px
    image), as MAR's main_mar.py trains it: forward with its own loss (mask ratio from its truncated normal, 4 noise
    draws a token, class dropout 0.1, attention and projection dropout 0.1), backward, AdamW step (betas 0.9/0.95,
    weight decay 0.02 off biases and norms). Neither side clips gradients or updates an EMA here. lit_ar's side is
    its MAR-B-size preset with the flow head (`mar_b`), or with MAR's DDPM head (`mar_b_ddpm`: MAR-B exactly); MAR's
    is its own DDPM head (it predicts a variance too). `compile`:
    lit_ar's `compile: true`; MAR has no compile option. Returns (step(precision), params)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 16, 16, 16, generator=g).to(device)  # (B, C, h, w)
    labels = (torch.arange(batch) % 1000).to(device)
    if side == "peer":
        on_path(root / "mar")
        from models import mar

        model = mar.mar_base(img_size=256, vae_stride=16, patch_size=1, vae_embed_dim=16, mask_ratio_min=0.7,
                             label_drop_prob=0.1, class_num=1000, attn_dropout=0.1, proj_dropout=0.1, buffer_size=64,
                             diffloss_d=6, diffloss_w=1024, num_sampling_steps="100",
                             diffusion_batch_mul=4).to(device)  # fmt: skip
        model.train()
        # timm's add_weight_decay, as main_mar.py: no decay on 1-D parameters (biases, norms) and biases
        no_decay = [p for n, p in model.named_parameters() if p.ndim == 1 or n.endswith(".bias")]
        decay = [p for n, p in model.named_parameters() if not (p.ndim == 1 or n.endswith(".bias"))]
        groups = [{"params": decay, "weight_decay": 0.02}, {"params": no_decay, "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95))

        def loss_of():
            with cuda_calls_stay_on(device):  # MAR's sample_orders calls .cuda()
                return model(latents, labels)
    else:
        from benchmarks.flow_ar import PRESETS
        from lit_ar.systems.flow_ar import FlowARSystem

        model = FlowARSystem(backbone="mar", token_dim=16, grid_size=16, image_size=256, class_dropout=0.1,
                             attn_dropout=0.1, proj_dropout=0.1, compile=compile, **PRESETS[preset])  # fmt: skip
        model.configure_model()  # `compile` applies here, as the Trainer's hook does
        model = model.to(device)
        model.train()
        opt = model.make_optimizer()  # what its configure_optimizers returns
        tokens = latents.flatten(2).transpose(1, 2).contiguous()  # (B, 256, 16)

        def loss_of():
            return model.training_step({"tokens": tokens, "label": labels}, 0)

    return optimizer_step(loss_of, opt, device), parameter_count(model)


def mar_rows(root: Path, device: str, precisions: list[str], batch: int, settings: list[tuple[int, str, int]],
             repeat: int, preset: str = "mar_b") -> list[dict]:  # fmt: skip
    """MAR-B's own `sample_tokens` at the flow issue's anchor setting (64 AR steps, its 100 diffusion steps, CFG 2.9
    linear) against lit_ar's MAR-B-size preset at each of `settings` (AR steps, head sampler, head steps), all timed
    in turn in each repeat. One MAR-B call takes minutes on a CPU, so each side's warm-up is a 2-step call. `preset`:
    lit_ar's size (benchmarks.flow_ar.PRESETS; the tests use a tiny one)."""
    from benchmarks.flow_ar import build

    heads = sorted({mar_head(sampler) for _, sampler, _ in settings})  # one system per head the settings need
    systems = {head: build("mar", preset, device, head=head) for head in heads}
    on_path(root / "mar")
    from models import mar

    torch.manual_seed(0)
    peer = mar.mar_base(img_size=256, vae_stride=16, patch_size=1, vae_embed_dim=16, mask_ratio_min=0.7,
                        label_drop_prob=0.1, class_num=1000, attn_dropout=0.1, proj_dropout=0.1, buffer_size=64,
                        diffloss_d=6, diffloss_w=1024, num_sampling_steps="100", diffusion_batch_mul=4)  # fmt: skip
    peer = peer.to(device).eval()
    n_peer = parameter_count(peer)
    labels = torch.arange(batch, device=device)
    rows = []
    for precision in precisions:
        peer = maybe_bf16(peer, precision)
        systems = {head: maybe_bf16(system, precision) for head, system in systems.items()}

        def run_peer(num_iter=64):
            with torch.no_grad(), precision_context(precision, device), cuda_calls_stay_on(device):
                peer.sample_tokens(bsz=batch, num_iter=num_iter, cfg=2.9, cfg_schedule="linear", labels=labels,
                                   temperature=1.0)  # fmt: skip

        def run_ours(ar_steps, sampler, flow_steps):
            g = torch.Generator(device).manual_seed(0)
            with precision_context(precision, device):
                systems[mar_head(sampler)].sample_tokens(
                    labels, steps=ar_steps, cfg=2.9, cfg_schedule="linear", flow_steps=flow_steps, sampler=sampler,
                    generator=g,
                )  # fmt: skip

        run_peer(num_iter=2)
        for _, sampler, _ in settings:
            run_ours(2, sampler, 2)
        times = {key: [] for key in ["peer", *settings]}
        for _ in range(repeat):
            times["peer"].append(time_call(run_peer, warmup=0, repeat=1))
            for setting in settings:
                times[setting].append(time_call(lambda: run_ours(*setting), warmup=0, repeat=1))
        peer_ips = batch / sorted(times["peer"])[repeat // 2]
        for setting in settings:
            ours_ips = batch / sorted(times[setting])[repeat // 2]
            ar_steps, sampler, flow_steps = setting
            n_ours = parameter_count(systems[mar_head(sampler)])
            rows.append({"model": "MAR-B", "params peer / lit_ar": f"{n_peer:,} / {n_ours:,}", "precision": precision,
                         "compiled": False, "batch": batch,
                         "setting": f"MAR 64 AR, 100 diffusion steps; lit_ar {ar_steps} AR, {sampler} {flow_steps}",
                         "peer images/s": peer_ips, "lit_ar images/s": ours_ips,
                         "lit_ar / peer": ours_ips / peer_ips})  # fmt: skip
        print_table(rows[-len(settings) :])
    return rows


def ratio_row(name, n_peer, n_ours, precision, compile, batch, ips: dict) -> dict:
    """A table row from each side's images/s (`ips`: {"peer": ..., "ours": ...})."""
    return {"model": name, "params peer / lit_ar": f"{n_peer:,} / {n_ours:,}", "precision": precision,
            "compiled": compile, "batch": batch, "peer images/s": ips["peer"], "lit_ar images/s": ips["ours"],
            "lit_ar / peer": ips["ours"] / ips["peer"]}  # fmt: skip


def pair(name, n_peer, n_ours, precision, compile, batch, run_peer, run_ours, repeat, count_calls=False) -> dict:
    """Time both samplers, interleaved (peer, ours, peer, ours, ...) after a warm-up (and compile) of each. A side
    that fails (e.g. LlamaGen's fp32 KV cache under bf16 autocast) is reported with its error, not timed. With
    `count_calls`, one more call of each side counts its aten calls (the eager cost on a launch-bound GPU)."""
    times, errors = {"peer": [], "ours": []}, {}
    runs = {"peer": run_peer, "ours": run_ours}
    for side, fn in runs.items():
        try:
            fn()  # warm-up: compilation, CUDA graphs, allocator
        except Exception as e:  # noqa: BLE001 - a peer's failure is a result to report
            errors[side] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    for _ in range(repeat):
        for side, fn in runs.items():
            if side not in errors:
                times[side].append(time_call(fn, warmup=0, repeat=1))
    ips = {s: batch / sorted(t)[repeat // 2] if t else float("nan") for s, t in times.items()}
    row = ratio_row(name, n_peer, n_ours, precision, compile, batch, ips)
    if count_calls:
        for side, label in (("peer", "peer aten calls"), ("ours", "lit_ar aten calls")):
            row[label] = aten_calls(runs[side]) if side not in errors else float("nan")
    if errors:
        row["failed"] = "; ".join(f"{'peer' if s == 'peer' else 'lit_ar'}: {e}" for s, e in errors.items())
    return row


# training rows: family -> (row name, the step builder, lit_ar's default preset)
TRAIN = {"llamagen-train": ("LlamaGen GPT-B train", llamagen_train_step, "GPT-B"),
         "mar-train": ("MAR-B train", mar_train_step, "mar_b")}  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer-root", required=True, help="folder with the peers' checkouts: LlamaGen/, VAR/, mar/")
    p.add_argument("--families", nargs="+", default=["llamagen", "var", "mar"],
                   choices=["llamagen", "llamagen-train", "var", "mar", "mar-train"])  # fmt: skip
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16-autocast"],
                   choices=["fp32", "bf16-autocast", "bf16-weights"])  # fmt: skip
    p.add_argument("--compile", action="store_true", help="compile both sides (LlamaGen and lit_ar rows only)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--count-calls", action="store_true", help="VAR rows: also count each side's aten calls")
    p.add_argument("--mar-batch", type=int, default=2)
    p.add_argument("--mar-preset", default="mar_b", help=argparse.SUPPRESS)  # lit_ar's size; tests use "tiny"
    p.add_argument("--mar-settings", nargs="+", type=mar_setting, default=[(64, "euler", 25)],
                   help="lit_ar's MAR-B sampling: AR_STEPS:SAMPLER:FLOW_STEPS ... (MAR: 64 AR, 100 steps)")  # fmt: skip
    p.add_argument("--isolate", type=int, default=2, metavar="N",
                   help="training rows and var: N processes a side, each alone (0: both in one process)")  # fmt: skip
    p.add_argument("--train-batch", type=int, default=8, help=argparse.SUPPRESS)  # the training rows' batch
    p.add_argument("--train-preset", default=None, help=argparse.SUPPRESS)  # lit_ar's size; tests use tiny ones
    p.add_argument("--var-depth", type=int, default=16, help=argparse.SUPPRESS)  # lit_ar's VAR depth; tests use 2
    p.add_argument("--side", choices=["peer", "ours"], default=None, help=argparse.SUPPRESS)  # a worker process
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    root = Path(args.peer_root).expanduser()
    if args.side:  # one side of an isolated row, in a process of its own (see train_rows, var_rows)
        if len(args.families) == 1 and args.families[0] in TRAIN:
            out = train_side_times(root, device, args.families[0], args.side, args.precisions[0], args.compile,
                                   args.repeat, args.train_batch, args.train_preset)  # fmt: skip
        elif args.families == ["var"]:
            out = var_side_times(root, device, args.side, args.precisions[0], args.compile, args.repeat,
                                 args.var_depth)  # fmt: skip
        else:
            p.error(f"--side times one side of a training row or of var, not {args.families}")
        print(json.dumps(out))
        return []
    print(f"machine: {machine()}")
    rows = []
    if "llamagen" in args.families:
        rows += llamagen_rows(root, device, args.precisions, args.compile, args.repeat)
    for family in [f for f in TRAIN if f in args.families]:
        rows += train_rows(family, root, device, args.precisions, args.compile, args.repeat, args.isolate,
                           args.train_batch, args.train_preset)  # fmt: skip
    if "var" in args.families:
        isolate = 0 if args.count_calls else args.isolate  # aten calls are counted in this process
        rows += var_rows(root, device, args.precisions, args.compile, args.repeat, isolate, args.count_calls,
                         args.var_depth)  # fmt: skip
    if "mar" in args.families:
        rows += mar_rows(root, device, args.precisions, args.mar_batch, args.mar_settings, args.repeat, args.mar_preset)
    print_table(rows, "lit_ar vs the peers' own samplers (token generation; ratio > 1: lit_ar faster)")
    if args.json:
        write_json(rows, args.json, args=vars(args))
    return rows


if __name__ == "__main__":
    main()
