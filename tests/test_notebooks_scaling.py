"""notebooks/02_scaling.py executes at the small size (it runs the scaling study through the benchmark harness and
asserts what its plot shows), writes its study JSON and figure, and can plot a JSON measured elsewhere."""

import json

import jupytext
from conftest import REPO
from nbclient import NotebookClient

NOTEBOOK = REPO / "notebooks" / "02_scaling.py"


def execute(tmp_path, monkeypatch, **env):
    monkeypatch.setenv("LIT_AR_SMALL", "1")
    monkeypatch.setenv("LIT_AR_RUN_DIR", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    notebook = jupytext.read(NOTEBOOK)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()


def test_scaling_notebook_runs_the_study_and_plots_it(tmp_path, monkeypatch):
    execute(tmp_path, monkeypatch)
    study = json.loads((tmp_path / "scaling.json").read_text())
    grids = sorted({(r["family"], r["grid"]) for r in study["rows"]})
    assert grids == sorted((f, g) for f in ("causal", "masked", "scale", "mar", "flowar") for g in (4, 8, 16))
    assert (tmp_path / "scaling.png").stat().st_size > 0
