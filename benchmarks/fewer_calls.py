"""Fewer model calls per image, side by side in one run: sequential raster decoding, speculative Jacobi decoding
(SJD), LANTERN's relaxed acceptance and, where the checkpoint has one, LANTERN's trained drafter on a trained causal
checkpoint (acceptance is only meaningful on a trained model); the cost of one model call as the window grows; and,
at a given size, raster decoding against ARPG's and LPD's parallel decoding at several step counts.

    python -m benchmarks.fewer_calls                                   # the digits leaderboard's LlamaGen run
    python -m benchmarks.fewer_calls --ckpt runs/leaderboard/digits/llamagen_drafter/checkpoints/last.ckpt
    python -m benchmarks.fewer_calls --ckpt runs/causal/llamagen_shapes/checkpoints/last.ckpt --batches 1 8
    python -m benchmarks.fewer_calls --size GPT-B --grid 16            # + GPT-B size, 256 tokens: calls and speed

Table 1, for each decoding and batch: model calls per image (mean over the images: SJD accepts per sequence),
tokens per call, images/s of token generation (no tokenizer decode) and the process's peak memory. Table 2: seconds
of one KV-cached call reading `window` tokens per sequence, against one token, on random weights of the size.
Table 3: raster (LlamaGen's GPT at the size) against PAR's groups over 2x2 regions, ARPG (the same width, depth and
heads) and LPD (the same GPT with position queries) at 64, 32 and 16 steps, random weights, CFG 2: images/s, model
calls per image and peak memory.
"""

import argparse
import time

import torch

from benchmarks.common import machine, peak_memory_mb, print_table, reset_peak_memory, sync, write_json
from lit_ar.checkpoints import load_system
from lit_ar.systems.causal_ar import CausalARSystem

DEFAULT_CKPT = "runs/leaderboard/digits/llamagen/checkpoints/last.ckpt"


def decode_rows(system, batches: list[int], windows: list[int], inits: list[str], deltas: list[float],
                images: int, lantern_k: int = 1000) -> list[dict]:  # fmt: skip
    """Sample `images` images per setting (in batches), with the checkpoint's sampling settings and each decoding:
    sequential, SJD per window and initialisation, LANTERN per delta (k `lantern_k`, capped at the vocabulary) and,
    where the checkpoint has a trained drafter, its speculative decoding per window, strict and with LANTERN."""
    base, L = {**system.hparams.predict_kwargs, "lantern_k": lantern_k}, system.core.num_tokens
    settings = [("sequential", {**base, "decoding": "sequential"})]
    lantern = [("delta", {"acceptance": "lantern", "lantern_delta": d}) for d in deltas]
    for w in windows:
        for init in inits:
            sjd = {**base, "decoding": "sjd", "window": w, "jacobi_init": init}
            settings.append((f"SJD window {w}, {init}", sjd))
            settings += [(f"LANTERN window {w}, {init}, delta {kw['lantern_delta']}", {**sjd, **kw})
                         for _, kw in lantern]  # fmt: skip
        if getattr(system, "drafter", None) is not None:
            drafted = {**base, "decoding": "speculative", "window": w}
            settings.append((f"drafter window {w}", drafted))
            settings += [(f"drafter + LANTERN window {w}, delta {kw['lantern_delta']}", {**drafted, **kw})
                         for _, kw in lantern]  # fmt: skip
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


def parallel_rows(size: str, grid: int, vocab: int, batch: int, steps: list[int], repeat: int) -> list[dict]:
    """Raster decoding of LlamaGen's GPT at `size` against ARPG's and LPD's parallel decoding at each step count, on
    random weights of the same width, depth and heads (ARPG's half self-, half cross-attention blocks; LPD's GPT with
    position queries), CFG 2."""
    from benchmarks.common import time_call
    from lit_ar.models.causal_ar import PRESETS as GPT_SIZES
    from lit_ar.systems.arpg import ARPGSystem
    from lit_ar.systems.lpd import LPDSystem

    torch.manual_seed(0)
    common = dict(vocab_size=vocab, grid_size=grid, num_classes=10, image_size=64, token_dropout=0.0,
                  resid_dropout=0.0)  # fmt: skip
    gpt = CausalARSystem(preset=size, **common).eval()
    arpg = ARPGSystem(**GPT_SIZES[size], **common).eval()
    lpd = LPDSystem(preset=size, **common).eval()
    par = CausalARSystem(preset=size, order="par", parallel=True, **common).eval()  # 2 x 2 regions
    labels = torch.arange(batch) % 10
    L = grid * grid
    runs = [("raster (LlamaGen's loop)", gpt, {}, L), ("PAR, 2x2 regions", par, {}, 4 + L // 4 - 1)]
    runs += [(f"{name} {n} steps", system, {"steps": n}, n) for name, system in (("ARPG", arpg), ("LPD", lpd))
             for n in steps]  # fmt: skip
    rows = []
    for name, system, kw, calls in runs:
        reset_peak_memory()
        seconds = time_call(lambda: system.sample_tokens(labels, torch.Generator().manual_seed(0), cfg=2.0, **kw),
                            warmup=1, repeat=repeat)  # fmt: skip
        rows.append({"decoding": name, "size": size, "tokens": L, "batch": batch, "calls_per_image": calls,
                     "images_per_s": round(batch / seconds, 3), "peak_mb": round(peak_memory_mb())})  # fmt: skip
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=DEFAULT_CKPT, help="a trained CausalARSystem checkpoint")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--windows", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--inits", nargs="+", default=["uniform", "last_token"])
    p.add_argument("--deltas", type=float, nargs="+", default=[0.1, 0.3], help="LANTERN's deltas")
    p.add_argument("--lantern-k", type=int, default=1000, help="LANTERN's k (capped at the vocabulary)")
    p.add_argument("--images", type=int, default=40, help="images per setting")
    p.add_argument("--size", default=None, help="also tables 2 and 3 at this GPT size (e.g. GPT-B)")
    p.add_argument("--grid", type=int, default=16, help="grid side at --size")
    p.add_argument("--vocab", type=int, default=16384, help="vocabulary at --size")
    p.add_argument("--speed-batch", type=int, default=8, help="batch of table 3")
    p.add_argument("--steps", type=int, nargs="+", default=[64, 32, 16], help="ARPG's and LPD's step counts in table 3")
    p.add_argument("--repeat", type=int, default=1, help="timed repeats in table 3 (the median)")
    p.add_argument("--json", default=None, help="also write the tables here")
    args = p.parse_args(argv)
    print(machine())
    system = load_system(args.ckpt, CausalARSystem).eval()
    print(f"checkpoint {args.ckpt}: {system.model.num_tokens} tokens, sampling {dict(system.hparams.predict_kwargs)}")
    decode = decode_rows(system, args.batches, args.windows, args.inits, args.deltas, args.images, args.lantern_k)
    print_table(decode, "decoding a trained checkpoint")
    cost, parallel = [], []
    if args.size:
        cost = call_cost_rows(args.size, args.grid, args.vocab, args.batches, args.windows)
        print_table(cost, "one cached model call, random weights")
        parallel = parallel_rows(args.size, args.grid, args.vocab, args.speed_batch, args.steps, args.repeat)
        print_table(parallel, "raster against ARPG's and LPD's parallel decoding, random weights, CFG 2")
    if args.json:
        write_json(decode + cost + parallel, args.json, ckpt=args.ckpt)


if __name__ == "__main__":
    main()
