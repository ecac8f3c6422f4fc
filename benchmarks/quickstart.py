"""The README's quickstart as a new user runs it: its `lit_ar` commands, read from the README's first command and
run verbatim one after the other, each timed, then the class accuracy of the samples they end with (the fraction of
`samples.npz` that lit_ar's digits classifier assigns to the class they were asked for).

    python -m benchmarks.quickstart                         # trains the digits classifier first if there is none
    python -m benchmarks.quickstart --classifier_ckpt runs/leaderboard/digits/classifier/checkpoints/best.ckpt

It deletes the quickstart's run folders first (`--keep` leaves them), so that nothing resumes, and prints one
markdown row (machine, date, seconds of each command and in all, class accuracy) and writes it as JSON beside the
samples (`quickstart.json`).
"""

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
CLASSIFIER_CONFIG = "configs/classifier/digits.yaml"
DEFAULT_CLASSIFIER = "runs/classifier/digits/checkpoints/best.ckpt"


def readme_quickstart(readme: Path = REPO / "README.md") -> list[list[str]]:
    """The `lit_ar` commands of the README's first bash block (the install steps left out), as argument lists."""
    block = re.search(r"```bash\n(.*?)```", readme.read_text(), re.S)
    if block is None:
        raise ValueError(f"{readme} has no ```bash block")
    text = "\n".join(line.split("#", 1)[0] for line in block.group(1).splitlines()).replace("\\\n", " ")
    commands = [shlex.split(part) for part in text.split("&&")]
    return [c for c in commands if c and c[0] == "lit_ar"]


def run_folders(commands: list[list[str]]) -> list[Path]:
    """The run folder of each command: the `save_dir` of the last of its configs that sets one (as the CLI merges)."""
    import yaml

    folders = []
    for command in commands:
        configs = [command[i + 1] for i, arg in enumerate(command[:-1]) if arg == "--config"]
        save_dir = None
        for config in configs:
            logger = ((yaml.safe_load((REPO / config).read_text()).get("trainer") or {}).get("logger")) or {}
            save_dir = (logger.get("init_args") or {}).get("save_dir") or save_dir
        if save_dir:
            folders.append(REPO / save_dir)
    return list(dict.fromkeys(folders))


def class_accuracy(samples_npz: Path, classifier_ckpt: str) -> float:
    """The fraction of the npz's images that the classifier assigns to their label."""
    from lit_ar.metrics import load_classifier

    model, hparams = load_classifier(classifier_ckpt)
    data = np.load(samples_npz)
    images = torch.from_numpy(data["images"]).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, C, H, W) in [-1, 1]
    labels = torch.from_numpy(data["labels"]).long()
    if images.shape[1] != hparams["channels"]:
        images = images.mean(1, keepdim=True) if hparams["channels"] == 1 else images.expand(-1, 3, -1, -1)
    with torch.no_grad():
        predicted = torch.cat([model(chunk).argmax(-1) for chunk in images.split(250)])
    return float((predicted == labels).float().mean())


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classifier_ckpt", default=DEFAULT_CLASSIFIER, help="the digits classifier that judges")
    parser.add_argument("--keep", action="store_true", help="keep the quickstart's run folders (they may resume)")
    args = parser.parse_args(argv)
    commands = readme_quickstart()
    if not args.keep:
        for folder in run_folders(commands):
            shutil.rmtree(folder, ignore_errors=True)
    if not (REPO / args.classifier_ckpt).is_file() and not Path(args.classifier_ckpt).is_file():
        print(f"[quickstart] no classifier at {args.classifier_ckpt}: training {CLASSIFIER_CONFIG} first", flush=True)
        subprocess.run([sys.executable, "-m", "lit_ar", "fit", "--config", CLASSIFIER_CONFIG], cwd=REPO, check=True)
    seconds = []
    for command in commands:
        print(f"[quickstart] {shlex.join(command)}", flush=True)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "lit_ar", *command[1:]], cwd=REPO, check=True)
        seconds.append(time.perf_counter() - start)
    samples = run_folders(commands[-1:])[-1] / "samples.npz"
    accuracy = class_accuracy(samples, str(REPO / args.classifier_ckpt) if not Path(args.classifier_ckpt).is_absolute()
                              else args.classifier_ckpt)  # fmt: skip
    record = {
        "machine": machine(), "date": date.today().isoformat(), "commands": [shlex.join(c) for c in commands],
        "seconds": [round(s, 1) for s in seconds], "total_seconds": round(sum(seconds), 1),
        "class_accuracy": accuracy, "num_samples": int(len(np.load(samples)["labels"])),
        "classifier_ckpt": args.classifier_ckpt, "samples": str(samples.relative_to(REPO)),
    }  # fmt: skip
    (samples.parent / "quickstart.json").write_text(json.dumps(record, indent=1) + "\n")
    print("| machine | date | seconds per command | total | class acc. | samples |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| {record['machine']} | {record['date']} | {' + '.join(f'{s:.0f}' for s in seconds)} | "
          f"{sum(seconds) / 60:.1f} min | {accuracy:.3f} | {record['num_samples']} |")  # fmt: skip
    return record


if __name__ == "__main__":
    main()
