"""Scale-wise AR (VAR) speed and memory: sampling against the causal family at the same parameter count and final
token grid, VAR-d16 against VAR's own sampler, training throughput, peak memory.

    python -m benchmarks.scale_ar                  # VAR depth 6 vs a causal model of equal size, 16x16 grid, batch 8
    python -m benchmarks.scale_ar --d16            # + VAR-d16, batch 2, CFG 1.5, fp32 and bf16 autocast (minutes)
    python -m benchmarks.scale_ar --d16-causal     # + the causal model of VAR-d16's size at the same settings
    python -m benchmarks.scale_ar --compile        # also with the blocks compiled (minutes on a small CPU)
    python -m benchmarks.scale_ar --precisions fp32 bf16-autocast   # mid-size sampling in both precisions

Sampling numbers are token generation only, the tokenizer's decode excluded, as in the VAR anchors:
`ScaleARSystem.sample_tokens` (K cached scale steps, each followed by the tokenizer's `next_scale_input`) and
`CausalARSystem.generate` (prefill + L cached decode steps). The tokenizers are freshly initialised (speed does not
depend on their training). Peak memory on CPU is the process's peak resident set (a running high-water mark); on
CUDA, torch.cuda.max_memory_allocated per row.
"""

import argparse
import tempfile
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from benchmarks.common import (
    machine,
    parameter_count,
    peak_memory_mb,
    precision_context,
    print_table,
    reset_peak_memory,
    time_call,
    write_json,
)
from lit_ar.systems.scale_ar import ScaleARSystem

# VAR's own autoregressive_infer_cfg on the reference machine (torch 2.13 CPU, 2 threads): d16, batch 2, CFG 1.5
# (forward batch 4), tokenizer decode excluded (issue 6).
VAR_IMAGES_PER_S = {"fp32": 0.25, "bf16-autocast": 0.76}
VAR_SCALES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def tokenizer_ckpt(folder: Path, preset: str, image_size: int, vocab: int, width: int,
                   scales: tuple[int, ...] = VAR_SCALES) -> Path:  # fmt: skip
    """A freshly initialised multi-scale VQ TokenizerSystem checkpoint (what ScaleARSystem loads)."""
    from lit_ar.systems.tokenizer import TokenizerSystem

    torch.manual_seed(0)
    system = TokenizerSystem(quantizer="msvq", preset=preset, image_size=image_size, codebook_size=vocab,
                             latent_dim=width, scales=scales, disc_weight=0.0)  # fmt: skip
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(system)
    path = folder / f"msvq_{preset}_{image_size}_{vocab}x{width}.ckpt"
    trainer.save_checkpoint(path)
    return path


def make_var(ckpt: Path, depth: int, num_classes: int, image_size: int, compile: bool, device: str) -> ScaleARSystem:
    torch.manual_seed(0)
    system = ScaleARSystem(tokenizer_ckpt=str(ckpt), depth=depth, num_classes=num_classes, image_size=image_size,
                           compile=compile)  # fmt: skip
    system.configure_model()  # `compile` applies here, as the Trainer's hook does
    return system.to(device).eval()


def make_causal(vocab: int, grid: int, width: int, heads: int, params: int, num_classes: int, compile: bool,
                device: str):  # fmt: skip
    """The causal family's model at `width`, with the depth that brings it closest to `params` parameters."""
    from lit_ar.systems.causal_ar import CausalARSystem

    best = None
    for n_layer in range(1, 200):
        torch.manual_seed(0)
        system = CausalARSystem(vocab_size=vocab, grid_size=grid, dim=width, depth=n_layer, n_heads=heads,
                                num_classes=num_classes, image_size=64, token_dropout=0.0, resid_dropout=0.0,
                                compile=compile)  # fmt: skip
        gap = abs(parameter_count(system.model) - params)
        if best is not None and gap > best[0]:
            break
        best = (gap, system)
    system = best[1]
    system.configure_model()  # `compile` applies here, as the Trainer's hook does
    with torch.no_grad():  # trained-looking weights: a zero output layer would make every logit equal
        system.model.output.weight.normal_(0.0, 0.02)
    return system.to(device).eval()


def sampling_row(system, batch: int, cfg: float, precision: str, repeat: int) -> dict:
    labels = torch.arange(batch, device=system.device) % system.hparams.num_classes
    scale_wise = isinstance(system, ScaleARSystem)

    def run():
        g = torch.Generator(system.device).manual_seed(0)
        with precision_context(precision, system.device.type):
            if scale_wise:
                system.sample_tokens(labels, cfg=cfg, generator=g)
            else:
                system.generate(labels, cfg=cfg, generator=g)

    reset_peak_memory()
    seconds = time_call(run, warmup=1, repeat=repeat)
    return {"images/s": batch / seconds, "s/batch": seconds, "peak MB": peak_memory_mb()}


def training_row(system, batch: int, precision: str, repeat: int) -> dict:
    """Forward + backward + AdamW step on random tokens."""
    system.train()
    device, num_classes = system.device, system.hparams.num_classes
    labels = torch.arange(batch, device=device) % num_classes
    opt = system.make_optimizer()
    if isinstance(system, ScaleARSystem):
        vocab = system.model.vocab_size
        indices = [torch.randint(0, vocab, (batch, s * s), device=device) for s in system.scales]
        x_BLCv = system.tokenizer.quantizer.teacher_forcing_inputs(indices)
        target = torch.cat(indices, dim=1)

        def loss_fn():
            return F.cross_entropy(system.model(labels, x_BLCv).flatten(0, 1).float(), target.flatten())
    else:
        L_ = system.model.num_tokens
        data = {"tokens": torch.randint(0, system.model.vocab_size, (batch, L_), device=device), "label": labels}

        def loss_fn():  # the training step's loss: its draws, the method's loss through the head
            return system.loss_terms(data, system.draws("train", 0))["loss"]

    def step():
        with precision_context(precision, device.type):
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    reset_peak_memory()
    seconds = time_call(step, warmup=1, repeat=repeat)
    system.eval()
    return {"images/s": batch / seconds, "s/step": seconds, "peak MB": peak_memory_mb()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=6, help="VAR depth of the mid-size comparison (width 64 * depth)")
    p.add_argument("--vocab", type=int, default=1024, help="vocabulary of the mid-size runs")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cfg", type=float, default=1.5, help="guidance of the mid-size runs (both models double)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also with compiled blocks")
    p.add_argument(
        "--precisions",
        nargs="+",
        default=["fp32"],
        choices=["fp32", "bf16-autocast"],
        help="sampling precisions of the mid-size comparison (training rows are fp32)",
    )
    p.add_argument("--no-causal", action="store_true", help="skip the causal family")
    p.add_argument("--d16", action="store_true", help="VAR-d16 against VAR's own sampler (minutes)")
    p.add_argument("--d16-causal", action="store_true", help="also the causal model of VAR-d16's size (minutes)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    modes = [False, True] if args.compile else [False]
    causal_available = not args.no_causal
    if causal_available:
        try:
            import lit_ar.systems.causal_ar  # noqa: F401
        except ImportError:
            causal_available = False
            print("note: the causal family (lit_ar.systems.causal_ar) is not in this checkout; VAR rows only")
    print(f"machine: {machine()}")
    rows: list[dict] = []
    workspace = tempfile.TemporaryDirectory(prefix="lit_ar_bench_scale_")  # the tokenizer checkpoints; removed below
    folder = Path(workspace.name)

    mid_ckpt = tokenizer_ckpt(folder, "shapes", 64, args.vocab, 8)
    for compile in modes:
        tag = "compiled" if compile else "eager"
        var = make_var(mid_ckpt, args.depth, 10, 64, compile, device)
        n = parameter_count(var.model)
        name = f"VAR depth {args.depth} ({n / 1e6:.1f}M) {tag}"
        samples = {}  # precision -> VAR's sampling row
        for precision in args.precisions:
            s = samples[precision] = sampling_row(var, args.batch, args.cfg, precision, args.repeat)
            rows.append({"run": name, "what": f"sample b{args.batch} CFG {args.cfg} {precision} (images/s)",
                         "value": s["images/s"], "peak MB": s["peak MB"]})  # fmt: skip
        t = training_row(var, args.batch, "fp32", args.repeat)
        rows.append({"run": name, "what": f"train b{args.batch} fp32 (images/s)", "value": t["images/s"],
                     "peak MB": t["peak MB"]})  # fmt: skip
        print_table(rows[-len(args.precisions) - 1 :])
        if causal_available:
            causal = make_causal(args.vocab, 16, var.model.dim, var.model.blocks[0].attn.n_heads, n, 10, compile,
                                 device)  # fmt: skip
            cname = f"causal {len(causal.model.layers)} layers ({parameter_count(causal.model) / 1e6:.1f}M) {tag}"
            for precision in args.precisions:
                c = sampling_row(causal, args.batch, args.cfg, precision, 1)
                rows.append({"run": cname, "what": f"sample b{args.batch} CFG {args.cfg} {precision} (images/s)",
                             "value": c["images/s"], "peak MB": c["peak MB"],
                             "VAR speed-up": samples[precision]["images/s"] / c["images/s"]})  # fmt: skip
            ct = training_row(causal, args.batch, "fp32", args.repeat)
            rows.append({"run": cname, "what": f"train b{args.batch} fp32 (images/s)", "value": ct["images/s"],
                         "peak MB": ct["peak MB"]})  # fmt: skip
            print_table(rows[-len(args.precisions) - 1 :])
            del causal
        del var

    if args.d16 or args.d16_causal:
        d16_ckpt = tokenizer_ckpt(folder, "var_msvq16", 256, 4096, 32)
        for compile in modes:
            tag = "compiled" if compile else "eager"
            var = make_var(d16_ckpt, 16, 1000, 256, compile, device)
            n = parameter_count(var.model)
            name = f"VAR-d16 ({n:,}) {tag}"
            for precision in ("fp32", "bf16-autocast"):
                r = sampling_row(var, 2, 1.5, precision, 1)
                anchor = VAR_IMAGES_PER_S[precision]
                rows.append({"run": name, "what": f"sample b2 CFG 1.5 {precision} (images/s)", "value": r["images/s"],
                             "VAR": anchor, "ratio": r["images/s"] / anchor, "peak MB": r["peak MB"]})  # fmt: skip
                print_table(rows[-1:])
            t = training_row(var, 2, "bf16-autocast", 1)
            rows.append({"run": name, "what": "train b2 bf16-autocast (images/s)", "value": t["images/s"],
                         "peak MB": t["peak MB"]})  # fmt: skip
            print_table(rows[-1:])
            if args.d16_causal and causal_available:
                causal = make_causal(4096, 16, 1024, 16, n, 1000, compile, device)
                cname = f"causal ({parameter_count(causal.model):,}) {tag}"
                for precision in ("fp32", "bf16-autocast"):
                    c = sampling_row(causal, 2, 1.5, precision, 1)
                    var_row = next(r for r in rows if r["run"] == name and precision in r["what"])
                    rows.append({"run": cname, "what": f"sample b2 CFG 1.5 {precision} (images/s)",
                                 "value": c["images/s"], "peak MB": c["peak MB"],
                                 "VAR speed-up": var_row["value"] / c["images/s"]})  # fmt: skip
                    print_table(rows[-1:])
                del causal
            del var

    workspace.cleanup()
    print_table(rows, "scale-wise AR (VAR) vs causal AR; ratio = lit_ar / VAR's own sampler")
    if args.json:
        write_json(rows, args.json, args=vars(args))


if __name__ == "__main__":
    main()
