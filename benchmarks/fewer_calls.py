"""Fewer model calls per image: sequential raster decoding against speculative Jacobi decoding (SJD), side by side
in one run, on a trained causal checkpoint (acceptance is only meaningful on a trained model), and the cost of one
model call as the window grows at a given size (what an accepted token must pay for).

    python -m benchmarks.fewer_calls                                   # the digits leaderboard's LlamaGen run
    python -m benchmarks.fewer_calls --ckpt runs/causal/llamagen_shapes/checkpoints/last.ckpt --batches 1 8
    python -m benchmarks.fewer_calls --call-cost-preset GPT-B --grid 16   # + the cost of a call at GPT-B, 256 tokens

Table 1, for each decoding and batch: model calls per image (mean over the images: SJD accepts per sequence),
tokens per call, images/s of token generation (no tokenizer decode) and the process's peak memory. Table 2: seconds
of one KV-cached call reading `window` tokens per sequence, against one token, on random weights of the preset.
"""

import argparse
import time

import torch

from benchmarks.common import machine, peak_memory_mb, print_table, reset_peak_memory, sync, write_json
from lit_ar.checkpoints import load_system
from lit_ar.systems.causal_ar import CausalARSystem

DEFAULT_CKPT = "runs/leaderboard/digits/llamagen/checkpoints/last.ckpt"


def decode_rows(system, batches: list[int], windows: list[int], inits: list[str], images: int) -> list[dict]:
    """Sample `images` images per setting (in batches), with the checkpoint's sampling settings and each decoding."""
    base, L = dict(system.hparams.predict_kwargs), system.core.num_tokens
    settings = [("sequential", {**base, "decoding": "sequential"})]
    settings += [(f"SJD window {w}, {init}", {**base, "decoding": "sjd", "window": w, "jacobi_init": init})
                 for w in windows for init in inits]  # fmt: skip
    rows = []
    for batch in batches:
        for name, kw in settings:
            calls, seconds = [], 0.0
            reset_peak_memory()
            for start in range(0, images, batch):
                labels = torch.arange(start, start + batch) % system.hparams.num_classes
                stats = {}
                generator = torch.Generator(system.device).manual_seed(start)
                sync()
                t = time.perf_counter()
                system.run_sampler(labels, generator, kw, stats=stats)
                sync()
                seconds += time.perf_counter() - t
                calls += stats["model_calls"].tolist() if "model_calls" in stats else [L] * batch
            per_image = sum(calls) / len(calls)
            rows.append({"decoding": name, "batch": batch, "calls_per_image": round(per_image, 2),
                         "tokens_per_call": round(L / per_image, 2),
                         "images_per_s": round(len(calls) / seconds, 2),
                         "peak_mb": round(peak_memory_mb())})  # fmt: skip
    return rows


def call_cost_rows(preset: str, grid: int, vocab: int, batches: list[int], windows: list[int]) -> list[dict]:
    """Seconds of one cached call over `window` tokens per sequence, mid-sequence, on random weights."""
    torch.manual_seed(0)
    system = CausalARSystem(preset=preset, vocab_size=vocab, grid_size=grid, num_classes=10, image_size=64,
                            token_dropout=0.0, resid_dropout=0.0).eval()  # fmt: skip
    core, P, L = system.model, system.model.cls_token_num, system.model.num_tokens
    rows = []
    for batch in batches:
        base = None
        for w in [1, *windows]:
            core.setup_caches(batch, torch.float32, max_seq_len=P + L + w)
            pos = (L // 2 + torch.arange(w))[None].expand(batch, -1)  # (B, w) mid-sequence
            tokens = torch.randint(0, vocab, (batch, w))
            times = []
            with torch.no_grad():
                for _ in range(4):
                    t = time.perf_counter()
                    core.decode_hidden(tokens, P + pos, pos, pos + 1)
                    sync()
                    times.append(time.perf_counter() - t)
            core.clear_caches()
            seconds = sorted(times[1:])[1]
            base = seconds if w == 1 else base
            rows.append({"preset": preset, "tokens": L, "batch": batch, "window": w,
                         "ms_per_call": round(1e3 * seconds, 2), "x_one_token": round(seconds / base, 2)})  # fmt: skip
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=DEFAULT_CKPT, help="a trained CausalARSystem checkpoint")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--windows", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--inits", nargs="+", default=["uniform", "last_token"])
    p.add_argument("--images", type=int, default=40, help="images per setting")
    p.add_argument("--call-cost-preset", default=None, help="also time one call of this preset (e.g. GPT-B)")
    p.add_argument("--grid", type=int, default=16, help="grid side of the call-cost model")
    p.add_argument("--vocab", type=int, default=16384, help="vocabulary of the call-cost model")
    p.add_argument("--json", default=None, help="also write the tables here")
    args = p.parse_args(argv)
    print(machine())
    system = load_system(args.ckpt, CausalARSystem).eval()
    print(f"checkpoint {args.ckpt}: {system.model.num_tokens} tokens, sampling {dict(system.hparams.predict_kwargs)}")
    decode = decode_rows(system, args.batches, args.windows, args.inits, args.images)
    print_table(decode, "decoding a trained checkpoint")
    cost = []
    if args.call_cost_preset:
        cost = call_cost_rows(args.call_cost_preset, args.grid, args.vocab, args.batches, args.windows)
        print_table(cost, "one cached model call, random weights")
    if args.json:
        write_json(decode + cost, args.json, ckpt=args.ckpt)


if __name__ == "__main__":
    main()
