"""The leaderboard (`python -m benchmarks.leaderboard`): the `debug` tier end to end for four methods (three shipped,
one of them a sampling variant of another's run, and one registered here), one row each with finite metrics in the
markdown and the JSON, a re-run that trains nothing, an interrupted fit that resumes from its checkpoint, and bad
names refused with the accepted ones. The whole module takes about two minutes on a 2-core CPU."""

import json
import logging
import math
import re
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from benchmarks.leaderboard import METHODS, TIERS, Method, main, register, unregister
from benchmarks.leaderboard.run import FIT_FILE, ROW_FILE, fit, generator_run

# A method as a tutorial would add it: LlamaGen's config with its own sampling
TUTORIAL = Method(
    name="LlamaGen (top-k 8)",
    paper="https://arxiv.org/abs/2406.06525",
    config="configs/causal/llamagen_{data}.yaml",
    debug_config="configs/debug/causal.yaml",
    tokenizer="vq",
    overrides={"*": ["--model.init_args.predict_kwargs", "{cfg: 2.0, temperature: 1.0, top_k: 8}"]},
)
NAMES = ["LlamaGen", "MAR", "LlamaGen + SJD", TUTORIAL.name]


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    """The debug tier for LlamaGen, MAR and the tutorial's method, run once: (output folder, argv, leaderboard,
    seconds)."""
    out = tmp_path_factory.mktemp("leaderboard")
    register(TUTORIAL)
    argv = ["--tier", "debug", "--methods", *NAMES, "--out", str(out)]
    try:
        start = time.perf_counter()
        result = main(argv)
        yield out, argv, result, time.perf_counter() - start
    finally:
        unregister(TUTORIAL.name)


def table_rows(markdown: str) -> list[list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("| [")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_one_row_per_method_with_finite_metrics(board):
    out, _, result, _ = board
    data = json.loads((out / "leaderboard.json").read_text())
    assert [r["method"] for r in data["rows"]] == NAMES
    assert data["tier"] == "debug" and data["budget"]["steps"] == TIERS["debug"].cpu.steps
    assert data["machine"] and data["torch"] == torch.__version__ and data["command"].endswith(str(out))
    for r in data["rows"]:
        assert r["fid"] >= 0 and math.isfinite(r["fid"]), r
        for key in ("precision", "recall", "class_accuracy"):
            assert 0 <= r[key] <= 1, (key, r)
        assert r["images_per_s"] > 0 and r["train_minutes"] > 0 and r["params"] > 0, r
        assert r["num_samples"] == TIERS["debug"].per_class * 10  # class-balanced: 4 of each of 10 classes
        assert r["steps_trained"] == r["steps"] == TIERS["debug"].cpu.steps
        assert Path(r["evaluation_json"]).is_file() and r["date"] and r["machine"] and r["command"]
    rows = {r["method"]: r for r in data["rows"]}
    # 4x4 tokens: one pass per token (the class prefix, then 15 cached steps); no separate head
    assert rows["LlamaGen"]["core_calls_per_image"] == 16 and rows["LlamaGen"]["head_calls_per_image"] is None
    # SJD samples LlamaGen's run (trains nothing of its own) in fewer calls than its 16
    sjd = rows["LlamaGen + SJD"]
    assert sjd["checkpoint"] == rows["LlamaGen"]["checkpoint"] and not (out / "llamagen_sjd" / "checkpoints").exists()
    assert sjd["sampling"]["decoding"] == "sjd" and rows["LlamaGen"]["sampling"]["decoding"] == "sequential"
    assert sjd["core_calls_per_image"] < 16
    # MAR's debug sampling: 4 AR steps, each with 4 flow steps of the head
    assert rows["MAR"]["core_calls_per_image"] == 4 and rows["MAR"]["head_calls_per_image"] == 16
    cells = table_rows((out / "leaderboard.md").read_text())
    assert [re.match(r"\[(.*)\]\(", row[0]).group(1) for row in cells] == NAMES
    for row in cells:
        assert "-" not in row[1:6], row  # FID, precision, recall, class accuracy and images/s are all there
        assert all(math.isfinite(float(v)) for v in row[1:6])
    assert (out / "leaderboard.png").stat().st_size > 1000
    assert result["cached"] == []


def test_register_adds_a_row(board):
    out, _, _, _ = board
    row = json.loads((out / "llamagen_top_k_8" / ROW_FILE).read_text())
    assert row["method"] == TUTORIAL.name and row["sampling"]["top_k"] == 8  # its override reached the run
    assert list(METHODS)[-1] == TUTORIAL.name, "a registered method's row comes after the shipped ones"
    with pytest.raises(ValueError, match="registered already"):
        register(TUTORIAL)
    with pytest.raises(ValueError, match="tokenizer kind; accepted: vq, msvq, kl"):
        register(replace(TUTORIAL, name="another", tokenizer="fsq"))
    with pytest.raises(ValueError, match="accepted: '\\*', a tier"):
        register(replace(TUTORIAL, name="another", overrides={"digit": []}))


def test_a_rerun_trains_nothing(board, capsys):
    out, argv, first, seconds = board
    checkpoints = sorted(out.glob("*/checkpoints/*.ckpt"))
    before = {p: p.stat().st_mtime_ns for p in checkpoints}
    start = time.perf_counter()
    again = main(argv)
    rerun = time.perf_counter() - start
    assert again["cached"] == NAMES
    assert f"rows finished before (not trained again): {NAMES}" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in sorted(out.glob("*/checkpoints/*.ckpt"))} == before
    assert again["rows"] == first["rows"]
    assert rerun < seconds / 3, (rerun, seconds)


class Messages(logging.Handler):
    """Lightning's log messages (it logs the checkpoint a fit resumes from)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_an_interrupted_fit_resumes_from_its_checkpoint(board):
    """A fit stopped half-way (as a pre-empted call leaves it: a checkpoint, its record not done) continues from
    that checkpoint to the budget."""
    out, argv, _, _ = board
    method = register(replace(TUTORIAL, name="LlamaGen (resumed)"))
    try:
        tier = TIERS["debug"]
        prepared = {"tokenizers": {"vq": out / "tokenizer_vq" / "checkpoints" / "last.ckpt"}}
        configs, args = generator_run(tier, tier.cpu, False, method, prepared)
        half = tier.cpu.steps // 2
        fit(configs, [*args, "--trainer.max_steps", str(half)], out / method.slug)  # the first half
        ckpt = out / method.slug / "checkpoints" / "last.ckpt"
        assert torch.load(ckpt, weights_only=True)["global_step"] == half
        record = json.loads((out / method.slug / FIT_FILE).read_text())
        (out / method.slug / FIT_FILE).write_text(json.dumps({**record, "done": False}))  # as if interrupted
        messages = Messages()
        logging.getLogger("lightning.pytorch").addHandler(messages)
        try:
            result = main([*argv[:3], method.name, *argv[-2:]])
        finally:
            logging.getLogger("lightning.pytorch").removeHandler(messages)
        assert f"Restored all states from the checkpoint at {ckpt}" in messages.lines
        assert torch.load(ckpt, weights_only=True)["global_step"] == tier.cpu.steps
        rows = {r["method"]: r for r in result["rows"]}
        assert rows[method.name]["steps_trained"] == tier.cpu.steps and result["cached"] == []
        assert list(rows) == [*NAMES, method.name], "the folder's other finished rows stay on the board"
    finally:
        unregister(method.name)


def test_unknown_names_are_refused_with_the_accepted_ones(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["--tier", "debug", "--methods", "LlamaGen", "NoSuchMethod", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--methods 'NoSuchMethod': not a registered method; accepted: " in err
    assert all(repr(name) in err for name in METHODS)
    with pytest.raises(SystemExit):
        main(["--tier", "cifar", "--out", str(tmp_path)])
    assert "--tier 'cifar' is not a tier; accepted: debug, digits, shapes32, shapes64" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [], "nothing is trained or written before the names are checked"
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            main(["--tier", "debug", "--gpu", "--out", str(tmp_path)])
        assert "sees no CUDA device" in capsys.readouterr().err
