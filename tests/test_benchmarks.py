"""The benchmark harness (`python -m benchmarks`) runs every family tiny and writes well-formed rows. Not timed:
the numbers are only checked to be positive and consistent with each other."""

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from benchmarks.__main__ import FAMILIES, main


def test_harness_writes_one_row_per_family_and_mode(tmp_path, monkeypatch):
    path = tmp_path / "bench.json"
    argv = ["--size", "tiny", "--grids", "8", "--batches", "1", "2", "--steps", "1", "--repeat", "1",
            "--precision", "32", "bf16", "--masked-steps", "2", "--mar-steps", "4", "--flow-steps", "2",
            "--json", str(path)]  # fmt: skip
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    main(argv)
    assert list(scratch.iterdir()) == [], "the harness removes its temporary tokenizer checkpoints"
    data = json.loads(path.read_text())
    assert set(data["matmul_peak_flops"]) == {"32", "bf16"} and min(data["matmul_peak_flops"].values()) > 0
    assert "6 * params" in data["formulas"]["train_flops"]
    keys = [(r["family"], r["precision"], r["kind"], r["batch"]) for r in data["rows"]]
    expected = [(f, p, k, b) for f in FAMILIES for p in ("32", "bf16") for k, b in (("train", 8), ("sample", 1),
                ("sample", 2))]  # fmt: skip
    assert sorted(keys) == sorted(expected)  # one row each, nothing missing or repeated
    for r in data["rows"]:
        assert r["mode"] == "eager" and r["grid"] == 8 and r["size"] == "tiny"
        for col in ("seconds", "images/s", "tokens/s", "peak_MB", "TFLOP/s", "MFU", "params_M"):
            assert r[col] > 0, (r, col)
        assert r["images/s"] == pytest.approx(r["batch"] / r["seconds"])
        assert r["tokens/s"] == pytest.approx(r["images/s"] * r["tokens_per_image"])
        factor = 6 if r["kind"] == "train" else 2
        flops = factor * r["params_M"] * 1e6 * r["tokens/s"]
        assert r["MFU"] == pytest.approx(flops / data["matmul_peak_flops"][r["precision"]])
    # VAR's pyramid holds more tokens than its final 8x8 grid; the others hold exactly the grid
    tokens = {r["family"]: r["tokens_per_image"] for r in data["rows"]}
    assert tokens.pop("scale") > 64 and set(tokens.values()) == {64}


def test_harness_scaling_study_rows_per_grid(tmp_path):
    path = tmp_path / "scaling.json"
    main(["--families", "causal", "scale", "--what", "sample", "--grids", "4", "8", "--batches", "1", "--repeat",
          "1", "--json", str(path)])  # fmt: skip
    rows = json.loads(path.read_text())["rows"]
    assert sorted((r["family"], r["grid"]) for r in rows) == [("causal", 4), ("causal", 8), ("scale", 4), ("scale", 8)]
    assert all(r["kind"] == "sample" for r in rows)


def test_harness_alternates_eager_and_compiled_calls(tmp_path):
    """--alternate holds both models and times their calls in turn: one row per mode, no peak memory (both
    resident), and every timed call of one mode followed by one of the other."""
    from benchmarks.common import time_in_turn

    path = tmp_path / "alt.json"
    main(["--families", "causal", "--compile", "both", "--alternate", "--what", "sample", "--grids", "4",
          "--batches", "1", "--repeat", "3", "--json", str(path)])  # fmt: skip
    rows = json.loads(path.read_text())["rows"]
    assert sorted(r["mode"] for r in rows) == ["compiled", "eager"]
    assert all(r["peak_MB"] is None and r["seconds"] > 0 for r in rows)
    calls = []
    time_in_turn({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, {"a": 1, "b": 2}, 3)
    assert calls == ["a", "b", "b", "a", "b", "a", "b", "a", "b"]  # warm-ups, then one call each in turn


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--families", "flowar", "--grids", "12"], r"--grids \[12\]: FlowAR.*powers of two"),
        (["--batches", "0"], r"--batches \[0\]: every value must be >= 1"),
        (["--size", "huge"], r"--size: invalid choice: 'huge'"),
        (["--alternate"], r"--alternate alternates eager and compiled calls: it needs --compile both, not eager"),
    ],
)
def test_harness_refuses_bad_arguments(argv, match, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert re.search(match, capsys.readouterr().err)


def test_scale_benchmark_compares_var_with_causal_in_each_precision(tmp_path, monkeypatch):
    from benchmarks import scale_ar

    out = tmp_path / "scale.json"
    argv = ["scale_ar", "--depth", "1", "--vocab", "64", "--batch", "1", "--repeat", "1",
            "--precisions", "fp32", "bf16-autocast", "--json", str(out)]  # fmt: skip
    monkeypatch.setattr("sys.argv", argv)
    scale_ar.main()
    rows = json.loads(out.read_text())["rows"]
    for precision in ("fp32", "bf16-autocast"):
        var = [r for r in rows if r["run"].startswith("VAR") and f"CFG 1.5 {precision}" in r["what"]]
        causal = [r for r in rows if r["run"].startswith("causal") and f"CFG 1.5 {precision}" in r["what"]]
        assert len(var) == 1 and len(causal) == 1, precision
        assert var[0]["value"] > 0 and causal[0]["value"] > 0
        assert causal[0]["VAR speed-up"] == pytest.approx(var[0]["value"] / causal[0]["value"])
    assert sum("train" in r["what"] for r in rows) == 2  # one fp32 training row per family


def test_ema_benchmark_times_each_update_rule_per_preset(tmp_path):
    from benchmarks import ema

    out = tmp_path / "ema.json"
    ema.main(["--presets", "GPT-nano", "--repeat", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["rule"] for r in rows] == list(ema.RULES)
    assert all(r["preset"] == "GPT-nano" and r["ms/update"] > 0 and r["tensors"] > 0 for r in rows)


def test_fewer_calls_benchmark_compares_sequential_sjd_lantern_and_arpg(checkpoints_root, debug_tokenizer, tmp_path):
    """benchmarks/fewer_calls.py on the debug LlamaGen run: a row per decoding and batch, SJD's calls per image at
    most sequential's, then the call-cost and ARPG / LPD tables at GPT-nano size; on a run with LANTERN's drafter,
    its rows too."""
    from benchmarks import fewer_calls
    from tests.conftest import CONFIGS, checkpoint_for_config, run_dir_args

    ckpt = checkpoint_for_config(CONFIGS / "debug" / "causal.yaml", checkpoints_root, train=True,
                                 extra=["--model.init_args.tokenizer_ckpt", str(debug_tokenizer)])  # fmt: skip
    out = tmp_path / "fewer_calls.json"
    fewer_calls.main(["--ckpt", str(ckpt), "--batches", "2", "--windows", "4", "--inits", "uniform", "--deltas",
                      "0.2", "--images", "4", "--size", "GPT-nano", "--grid", "4", "--vocab", "32", "--steps", "4",
                      "--speed-batch", "2", "--json", str(out)])  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    decode = {r["decoding"]: r for r in rows if "calls_per_image" in r and "size" not in r}
    assert list(decode) == ["sequential", "SJD window 4, uniform", "LANTERN window 4, uniform, delta 0.2"]
    assert decode["sequential"]["calls_per_image"] == 16
    assert all(1 <= r["calls_per_image"] <= 16 and r["images_per_s"] > 0 for r in decode.values())
    cost = [r for r in rows if "ms_per_call" in r]
    assert [r["window"] for r in cost] == [1, 4] and cost[0]["x_one_token"] == 1.0
    parallel = [r for r in rows if r.get("size") == "GPT-nano" and "decoding" in r]
    expected = [("raster (LlamaGen's loop)", 16), ("PAR, 2x2 regions", 7), ("ARPG 4 steps", 4), ("LPD 4 steps", 4)]
    assert [(r["decoding"], r["calls_per_image"]) for r in parallel] == expected
    from lit_ar.cli import cli_main

    cli_main(["fit", "--config", str(CONFIGS / "debug" / "causal.yaml"), *run_dir_args(tmp_path / "drafted"),
              "--model.init_args.tokenizer_ckpt", str(debug_tokenizer), "--model.init_args.drafter", "true",
              "--trainer.max_steps", "8", "--trainer.limit_val_batches", "0"])  # fmt: skip
    fewer_calls.main(["--ckpt", str(tmp_path / "drafted" / "checkpoints" / "last.ckpt"), "--batches", "2", "--windows",
                      "4", "--inits", "uniform", "--deltas", "0.2", "--images", "4", "--json", str(out)])  # fmt: skip
    drafted = {r["decoding"]: r["calls_per_image"] for r in json.loads(out.read_text())["rows"]}
    assert list(drafted)[-2:] == ["drafter window 4", "drafter + LANTERN window 4, delta 0.2"]
    assert all(4 <= calls <= 16 for calls in drafted.values())


def test_order_nll_benchmark_bins_the_places_of_the_order(checkpoints_root, debug_tokenizer, tmp_path):
    from benchmarks import order_nll
    from tests.conftest import CONFIGS, checkpoint_for_config

    assert order_nll.places(64) == [(0, 1), (1, 4), (4, 12), (12, 30), (30, 64)]
    ckpt = checkpoint_for_config(CONFIGS / "debug" / "rar.yaml", checkpoints_root, train=True,
                                 extra=["--model.init_args.tokenizer_ckpt", str(debug_tokenizer)])  # fmt: skip
    out = tmp_path / "order_nll.json"
    order_nll.main(["--ckpt", str(ckpt), "--images", "8", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["label"] for r in rows] == ["class", "null class"]
    assert all(r["all"] > 0 and r["place 0"] > 0 for r in rows)


def test_flow_benchmark_times_mar_b_rows_per_precision_and_steps(tmp_path):
    from benchmarks import flow_ar

    out = tmp_path / "flow.json"
    argv = ["--skip-small", "--mar-b", "--mar-b-preset", "tiny", "--mar-b-ar-steps", "2", "4", "--mar-b-flow-steps",
            "1", "--mar-b-precisions", "fp32", "bf16-autocast", "--sampler", "heun", "--json", str(out)]  # fmt: skip
    flow_ar.main(argv)
    rows = json.loads(out.read_text())["rows"]
    expected = [(p, a) for p in ("fp32", "bf16-autocast") for a in (2, 4)]
    assert [(r["precision"], r["ar_steps"]) for r in rows] == expected
    for r in rows:
        assert r["images_per_s"] > 0 and 0 < r["head_fraction"] < 1 and (r["sampler"], r["preset"]) == ("heun", "tiny")
        assert r["vs_anchor"] == pytest.approx(r["images_per_s"] / flow_ar.MAR_ANCHOR_IMAGES_PER_S)


def test_aten_calls_counts_top_level_operator_calls():
    import torch

    from benchmarks.common import aten_calls

    x = torch.ones(3)
    assert aten_calls(lambda: x + 1) == 1
    assert aten_calls(lambda: torch.nn.functional.normalize(x + 1, dim=0)) > 2  # its inner calls count once each


def test_peers_mar_rows_time_the_peer_once_against_each_lit_ar_setting(tmp_path, monkeypatch):
    """MAR's own sampler is stood in for by a module at the path the real checkout has (models/mar.py), so the rows'
    logic runs without MAR's code: one row per (precision, setting), each against the same peer timing."""
    from benchmarks import peers

    fake = tmp_path / "mar" / "models"
    fake.mkdir(parents=True)
    (fake / "mar.py").write_text(
        "import torch\n"
        "class Stand(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.w = torch.nn.Linear(4, 4)\n"
        "        self.calls = []\n"
        "    def sample_tokens(self, bsz, num_iter, cfg, cfg_schedule, labels, temperature):\n"
        "        self.calls.append(num_iter)\n"
        "        return torch.zeros(bsz, 4).cuda()\n"  # MAR's .cuda() calls stay on the CPU here
        "def mar_base(**kw):\n"
        "    return Stand()\n"
    )
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setitem(sys.modules, "models", None)  # undone after the test, with the stand-in's modules below
    rows = peers.main(["--peer-root", str(tmp_path), "--families", "mar", "--precisions", "fp32", "bf16-autocast",
                       "--repeat", "1", "--mar-preset", "tiny", "--mar-settings", "2:euler:2", "1:heun:2",
                       "2:ddpm:3", "--json", str(tmp_path / "mar.json")])  # fmt: skip
    assert [(r["precision"], r["setting"].split("; ")[1]) for r in rows] == [
        ("fp32", "lit_ar 2 AR, euler 2"), ("fp32", "lit_ar 1 AR, heun 2"), ("fp32", "lit_ar 2 AR, ddpm 3"),
        ("bf16-autocast", "lit_ar 2 AR, euler 2"), ("bf16-autocast", "lit_ar 1 AR, heun 2"),
        ("bf16-autocast", "lit_ar 2 AR, ddpm 3"),
    ]  # fmt: skip
    # `ddpm` is lit_ar's MAR with MAR's diffusion head: its output layer predicts a variance too
    params = [int(r["params peer / lit_ar"].split(" / ")[1].replace(",", "")) for r in rows[:3]]
    assert params[0] == params[1] < params[2]
    for r in rows:
        assert r["peer images/s"] > 0 and r["lit_ar / peer"] == pytest.approx(r["lit_ar images/s"] / r["peer images/s"])
    assert rows[0]["peer images/s"] == rows[1]["peer images/s"]  # one peer timing per precision
    assert json.loads((tmp_path / "mar.json").read_text())["rows"][0]["model"] == "MAR-B"
    with pytest.raises(SystemExit):
        peers.main(["--peer-root", str(tmp_path), "--families", "mar", "--mar-settings", "64-euler-25"])
    monkeypatch.delitem(sys.modules, "models.mar", raising=False)


def isolated_and_shared_rows(common: list[str]):
    """`benchmarks.peers` with `--isolate 1` (a worker process a side), then `--isolate 0` (one process): each run's
    one row, checked to say how it ran, with its parameter counts (peer, lit_ar)."""
    from benchmarks import peers

    for isolate, processes in (("1", "1 a side"), ("0", "one, shared")):
        (row,) = peers.main(common + ["--isolate", isolate])
        assert row["processes"] == processes
        yield row, tuple(int(n.replace(",", "")) for n in row["params peer / lit_ar"].split(" / "))


def test_peers_training_rows_time_each_side_in_its_own_process_or_in_one(tmp_path, monkeypatch):
    """LlamaGen's GPT_B is stood in for by a small module at the path the real checkout has
    (autoregressive/models/gpt.py). With --isolate, every timed step ran in a worker process holding one side only."""

    fake = tmp_path / "LlamaGen" / "autoregressive" / "models"
    fake.mkdir(parents=True)
    (fake / "gpt.py").write_text(
        "import torch, torch.nn.functional as F\n"
        "class Stand(torch.nn.Module):\n"
        "    def __init__(self, vocab_size):\n"
        "        super().__init__()\n"
        "        self.emb = torch.nn.Embedding(vocab_size, 8)\n"
        "        self.out = torch.nn.Linear(8, vocab_size)\n"
        "    def forward(self, cond_idx, idx, targets):\n"
        "        logits = self.out(self.emb(torch.cat([cond_idx[:, None], idx], 1)))\n"
        "        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())\n"
        "def GPT_B(vocab_size, **kw):\n"
        "    return Stand(vocab_size)\n"
    )
    monkeypatch.setattr(sys, "path", list(sys.path))
    common = ["--peer-root", str(tmp_path), "--families", "llamagen-train", "--precisions", "fp32", "--repeat", "2",
              "--train-batch", "2", "--train-preset", "GPT-nano"]  # fmt: skip
    for row, (peer_params, ours_params) in isolated_and_shared_rows(common):
        assert peer_params == 2 * 16384 * 8 + 16384  # the stand-in's, so the peer side ran the checkout's GPT_B
        assert ours_params > peer_params
        assert row["peer tokens/s"] > 0 and row["lit_ar tokens/s"] == pytest.approx(256 * row["lit_ar images/s"])
    monkeypatch.delitem(sys.modules, "autoregressive.models.gpt", raising=False)


def test_peers_mar_training_rows_time_each_side_in_its_own_process_or_in_one(tmp_path, monkeypatch):
    """MAR's mar_base is stood in for by a small module at the path the real checkout has (models/mar.py), whose
    forward takes MAR's latents (B, 16, 16, 16) and calls .cuda() as MAR's does; lit_ar's side is the tiny preset."""
    fake = tmp_path / "mar" / "models"
    fake.mkdir(parents=True)
    (fake / "mar.py").write_text(
        "import torch\n"
        "class Stand(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.lin = torch.nn.Linear(16, 16)\n"
        "    def forward(self, imgs, labels):\n"
        "        assert imgs.shape[1:] == (16, 16, 16) and labels.shape == imgs.shape[:1]\n"
        "        x = imgs.flatten(2).transpose(1, 2).cuda()\n"
        "        return (self.lin(x) - x).pow(2).mean()\n"
        "def mar_base(**kw):\n"
        "    assert kw['diffusion_batch_mul'] == 4 and kw['buffer_size'] == 64\n"
        "    return Stand()\n"
    )
    monkeypatch.setattr(sys, "path", list(sys.path))
    common = ["--peer-root", str(tmp_path), "--families", "mar-train", "--precisions", "bf16-autocast", "--repeat",
              "2", "--train-batch", "2", "--train-preset", "tiny"]  # fmt: skip
    for row, (peer_params, ours_params) in isolated_and_shared_rows(common):
        assert row["model"] == "MAR-B train" and row["precision"] == "bf16-autocast"
        assert peer_params == 16 * 16 + 16  # the stand-in's, so the peer side ran the checkout's mar_base
        assert ours_params > peer_params
        assert row["peer tokens/s"] > 0 and row["lit_ar tokens/s"] == pytest.approx(256 * row["lit_ar images/s"])
    monkeypatch.delitem(sys.modules, "models.mar", raising=False)


def test_peers_var_rows_time_each_side_in_its_own_process_or_in_one(tmp_path, monkeypatch):
    """VAR's build_vae_var is stood in for by a small module at the path the real checkout has (models/__init__.py);
    lit_ar's side is a depth-2 VAR. With --isolate, every timed call ran in a worker process holding one side only."""

    fake = tmp_path / "VAR" / "models"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "import torch\n"
        "class Stand(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.lin = torch.nn.Linear(4, 4)\n"
        "    def autoregressive_infer_cfg(self, B, label_B, g_seed, cfg, top_k, top_p):\n"
        "        return self.lin(torch.randn(2 * B, 4))\n"
        "def build_vae_var(device, V, Cvae, ch, share_quant_resi, num_classes, depth, shared_aln):\n"
        "    return torch.nn.Conv2d(1, 1, 1), Stand()\n"
    )
    monkeypatch.setattr(sys, "path", list(sys.path))
    common = ["--peer-root", str(tmp_path), "--families", "var", "--precisions", "fp32", "--repeat", "1",
              "--var-depth", "2"]  # fmt: skip
    for row, (peer_params, ours_params) in isolated_and_shared_rows(common):
        assert row["batch"] == 2
        assert peer_params == 4 * 4 + 4  # the stand-in's, so the peer side ran the checkout's build_vae_var
        assert ours_params > 1_000_000  # lit_ar's depth-2 VAR
        assert row["peer images/s"] > 0 and row["lit_ar images/s"] > 0
    monkeypatch.delitem(sys.modules, "models", raising=False)


def test_head_loss_benchmark_times_eager_and_compiled_per_precision(tmp_path):
    from benchmarks import head_loss

    out = tmp_path / "head_loss.json"
    rows = head_loss.main(["--presets", "GPT-nano", "--vocab", "64", "--grid", "4", "--batch", "2", "--repeat", "1",
                           "--json", str(out)])  # fmt: skip
    assert [(r["precision"], r["form"]) for r in rows] == [
        ("fp32", "eager"), ("fp32", "compiled"), ("bf16-autocast", "eager"), ("bf16-autocast", "compiled"),
    ]  # fmt: skip
    assert all(r["ms"] > 0 and r["vocab"] == 64 for r in rows)
    assert len(json.loads(out.read_text())["rows"]) == 4


@pytest.mark.parametrize("script", ["shapes32_gpu.sh", "gpu_speed.sh"])
def test_gpu_scripts_parse(script):
    """The GPU scripts cannot run here; they must at least parse, so a lent GPU's minutes are not lost to a typo."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / script
    done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_shapes32_gpu_script_runs_end_to_end_on_cpu(tmp_path):
    """benchmarks/shapes32_gpu.sh at a toy budget on the CPU, from nothing: it trains the classifier and the three
    tokenizers that the families need, caches tokens, trains one family per tokenizer side by side and evaluates
    each. What a lent GPU then runs is this, at the real budget. About 90 s: the script starts a dozen lit_ar
    processes (classifier, three tokenizers, three caches, three fits, three evaluations), each importing torch."""
    root = Path(__file__).resolve().parent.parent
    runs, out = tmp_path / "runs", tmp_path / "out"
    toy = {
        "DEVICE": "cpu",
        "FAMILIES": "MaskGIT VAR FlowAR",
        "STEPS": "2",
        "BATCH": "8",
        "NTRAIN": "64",
        "MAXT": "00:00:02:00",
        "PREP_ARGS": "--trainer.max_steps 2 --data.num_train 64 --data.num_val 32",
    }
    # 20 samples against 64 references: fewer than the classifier's features, so FID needs `force`
    evaluate = " ".join(f"--model.init_args.evaluator.init_args.{a}" for a in ("per_class 2", "force true"))
    env = {"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "HOME": str(tmp_path), "RUNS": str(runs),
           "OUT_DIR": str(out), "EXTRA_EVAL": evaluate, **toy}  # fmt: skip
    done = subprocess.run(["bash", "benchmarks/shapes32_gpu.sh"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    status = (out / "status").read_text()
    assert done.returncode == 0, status + done.stderr
    for name in ("classifier", "tokenizer_vq", "tokenizer_msvq", "tokenizer_kl"):
        assert f"{name} trained" in status
    assert (runs / "classifier" / "checkpoints" / "best.ckpt").is_file()
    for family in ("MaskGIT", "VAR", "FlowAR"):
        assert f"{family} fit rc=0" in status and f"{family} eval rc=0" in status, status
        record = json.loads((out / family / "eval" / "evaluation.json").read_text())
        assert record["num_samples"] == 20 and 0.0 <= record["metrics"]["class_accuracy"] <= 1.0, record


@pytest.mark.parametrize("family", ["scale", "causal"])
def test_autocast_linears_benchmark_times_both_forms_and_checks_their_tokens(family, tmp_path):
    import lit_ar.systems.generator
    from benchmarks import autocast_linears
    from lit_ar.performance import linears_in_autocast_dtype

    out = tmp_path / "cast.json"
    argv = ["--family", family, "--size", "tiny", "--modes", "eager", "--repeat", "1", "--json", str(out)]
    (row,) = autocast_linears.main(argv)
    assert row["mode"] == "eager" and row["same tokens"] and row["cast images/s"] > 0 and row["uncast images/s"] > 0
    assert row["cast / uncast"] == pytest.approx(row["cast images/s"] / row["uncast images/s"])
    assert lit_ar.systems.generator.linears_in_autocast_dtype is linears_in_autocast_dtype  # put back after timing
    assert len(json.loads(out.read_text())["rows"]) == 1


def test_released_parity_refuses_a_missing_peer_checkout(tmp_path):
    """`benchmarks.released_parity` builds the peers' models from their checkouts (the tests compare on fixtures made
    by the same code, tests/test_released_weights.py); without a checkout it says which, before building anything."""
    from benchmarks import released_parity

    (tmp_path / "LlamaGen").mkdir()
    with pytest.raises(FileNotFoundError, match=r"--peer-root .*: no VAR/ checkout for var"):
        released_parity.main(["--peer-root", str(tmp_path), "--peers", "llamagen", "var"])
