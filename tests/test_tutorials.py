"""Every tutorial and notebook executes (small size), so the docs never rot."""

import jupytext
import pytest
from conftest import REPO
from nbclient import NotebookClient

DOCS = sorted([*REPO.glob("tutorials/*.py"), *REPO.glob("notebooks/*.py")])


@pytest.mark.parametrize("path", DOCS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_doc_executes(path, tmp_path, monkeypatch):
    monkeypatch.setenv("LIT_AR_SMALL", "1")
    monkeypatch.setenv("LIT_AR_RUN_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = jupytext.read(path)
    # execute() raises on the first failing cell; the tutorials assert what they show
    NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
