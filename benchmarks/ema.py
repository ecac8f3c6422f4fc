"""The cost of one EMA update of a causal transformer's weights (`AveragedModel.update_parameters`, what the EMA
callbacks call after every optimizer step), for three update rules:

- `fixed, per tensor`: Lightning's `EMAWeightAveraging` (torch's `get_ema_avg_fn`, fixed decay, small ops per tensor);
- `warm-up, per tensor`: the same warm-up rule as `WarmupEMA` written per tensor, the way lit_ar first shipped it;
- `warm-up, multi-tensor`: `lit_ar.ema.WarmupEMA` (one multi-tensor lerp per device and dtype).

Milliseconds per update, the median of `--repeat`; prints a table, --json also writes it.

    python -m benchmarks.ema                       # GPT-micro and GPT-B, fp32 weights, on this machine
    python -m benchmarks.ema --presets GPT-B GPT-L --json runs/bench/ema_gpu.json   # on a GPU
"""

import argparse

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn

from benchmarks.common import machine, parameter_count, print_table, time_call, write_json
from lit_ar.ema import warmup_ema_update
from lit_ar.models.causal_ar import PRESETS, CausalTransformer


def warmup_per_tensor(decay: float):
    """The warm-up rule as a per-tensor `avg_fn`: about seven small ops for every parameter and buffer."""

    def update(average: torch.Tensor, current: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        if not average.is_floating_point():
            return current
        d = ((1 + n) / (10 + n)).clamp(max=decay)
        return average + (current - average) * (1.0 - d)

    return update


RULES = {
    "fixed, per tensor (Lightning)": lambda decay: dict(avg_fn=get_ema_avg_fn(decay)),
    "warm-up, per tensor (before)": lambda decay: dict(avg_fn=warmup_per_tensor(decay)),
    "warm-up, multi-tensor (WarmupEMA)": lambda decay: dict(multi_avg_fn=warmup_ema_update(decay)),
}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["GPT-micro", "GPT-B"], choices=sorted(PRESETS))
    parser.add_argument("--decay", type=float, default=0.999)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    rows = []
    for preset in args.presets:
        model = CausalTransformer(vocab_size=4096, grid_size=16, num_classes=1000, **PRESETS[preset]).to(device)
        tensors = len(list(model.parameters())) + len(list(model.buffers()))
        for rule, average_fn in RULES.items():
            average = AveragedModel(model, use_buffers=True, **average_fn(args.decay))
            average.update_parameters(model)  # the first update only copies
            seconds = time_call(lambda average=average: average.update_parameters(model), warmup=2, repeat=args.repeat)
            rows.append({"preset": preset, "parameters": parameter_count(model), "tensors": tensors, "rule": rule,
                         "ms/update": 1000 * seconds})  # fmt: skip
            del average
    print_table(rows, f"EMA update of the weights, {machine()}")
    if args.json:
        write_json(rows, args.json, args=vars(args))
    return rows


if __name__ == "__main__":
    main()
