"""The README and the docs as a user reads them: every relative link resolves, and every command in a ```bash block
parses (`lit_ar ... --print_config`, `python -m ... --help`, a script that exists)."""

import contextlib
import io
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest
from conftest import REPO

from lit_ar.cli import cli_main

PAGES = sorted([REPO / "README.md", REPO / "CONTRIBUTING.md", *(REPO / "docs").glob("*.md")])
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^[ \t]*```bash\n(.*?)^[ \t]*```", re.S | re.M)
RUNNERS = {"lit_ar", "python", "torchrun", "srun", "bash"}


def page_id(page: Path) -> str:
    return str(page.relative_to(REPO))


def relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # links in code blocks are not links
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


def shell_commands(page: Path) -> list[list[str]]:
    """The commands of a page's ```bash blocks, as argument lists: comments dropped, continuation lines joined,
    `&&` and `;` chains split, `VAR=value` prefixes and a loop's `do`/`(`...`)` wrapping removed."""
    commands = []
    for block in FENCE.findall(page.read_text()):
        lines = [line.split(" #", 1)[0] for line in block.splitlines() if not line.lstrip().startswith("#")]
        for part in re.split(r"&&|;|\n", "\n".join(lines).replace("\\\n", " ")):
            words = shlex.split(part.strip().strip("()"))
            while words and (words[0] in ("do", "then") or re.match(r"^[A-Z_]+=", words[0])):
                words = words[1:]
            if words and words[0] in RUNNERS:
                commands.append(words)
    return commands


def as_lit_ar(words: list[str]) -> list[str] | None:
    """The `lit_ar` arguments of a command (direct, under srun, or torchrun's `-m lit_ar`), else None."""
    if words[0] == "srun":
        words = words[1:]
    if words[0] == "lit_ar":
        return words[1:]
    if words[0] == "torchrun" and "-m" in words and words[words.index("-m") + 1] == "lit_ar":
        return words[words.index("-m") + 2 :]
    return None


def made_by_an_earlier_command(args: list[str]) -> list[str]:
    """Drop `--config runs/...` files that an earlier command of the page writes (they do not exist yet)."""
    out, i = [], 0
    while i < len(args):
        if args[i] == "--config" and args[i + 1].startswith("runs/") and not (REPO / args[i + 1]).exists():
            i += 2
            continue
        out.append(args[i])
        i += 1
    return out


COMMANDS = [(page, words) for page in PAGES for words in shell_commands(page)]


def test_the_pages_have_commands_and_links():
    readme = [words for page, words in COMMANDS if page.name == "README.md"]
    assert sum(as_lit_ar(w) is not None for w in readme) >= 6, readme
    assert all(relative_links(REPO / name) for name in ("README.md", "docs/results.md"))


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_relative_link_resolves(page):
    missing = [link for link in relative_links(page) if not (page.parent / link.split("#", 1)[0]).exists()]
    assert not missing, f"{page_id(page)} links to files that do not exist: {missing}"


@pytest.mark.parametrize(
    "page, words",
    [c for c in COMMANDS if as_lit_ar(c[1]) is not None],
    ids=lambda x: page_id(x) if isinstance(x, Path) else " ".join(x)[:80],
)
def test_every_lit_ar_command_parses(page, words, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the commands are written for the repository root
    args = made_by_an_earlier_command(as_lit_ar(words))
    out = io.StringIO()
    with pytest.raises(SystemExit) as exit_, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        cli_main([*args, "--print_config"])
    assert exit_.value.code in (0, None), f"{page_id(page)}: `{shlex.join(words)}` does not parse:\n{out.getvalue()}"


def python_targets() -> list[tuple[Path, list[str]]]:
    """`python -m module [subcommand]` (options left out: `--help` is what is checked) and `python|bash file`."""
    targets = {}
    for page, words in COMMANDS:
        if words[0] == "bash" or (words[0] == "python" and words[1] != "-m"):
            targets[tuple(words[:2])] = page
        elif words[0] == "python" and words[2] not in ("pytest", "pip"):
            subcommand = words[3:4] if len(words) > 3 and re.match(r"^[a-z][\w-]*$", words[3]) else []
            targets[tuple(words[:3] + subcommand)] = page
    return [(page, list(head)) for head, page in targets.items()]


@pytest.mark.parametrize("page, words", python_targets(), ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_every_python_command_exists_and_answers_help(page, words, monkeypatch):
    if words[1] != "-m":
        assert (REPO / words[1]).is_file(), f"{page_id(page)}: `{shlex.join(words)}` names no file"
        return
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", [words[2], *words[3:], "--help"])
    out = io.StringIO()
    with pytest.raises(SystemExit) as exit_, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        runpy.run_module(words[2], run_name="__main__", alter_sys=True)
    assert exit_.value.code in (0, None), f"{page_id(page)}: `{shlex.join(words)} --help` failed:\n{out.getvalue()}"
    assert "usage" in out.getvalue().lower()


def test_the_quickstart_benchmark_reads_the_readme_commands():
    from benchmarks.quickstart import readme_quickstart, run_folders

    commands = readme_quickstart()
    assert [c[:2] for c in commands] == [["lit_ar", "fit"], ["lit_ar", "fit"], ["lit_ar", "predict"]]
    assert run_folders(commands) == [REPO / "runs/quickstart/tokenizer/vq_digits",
                                     REPO / "runs/quickstart/causal/llamagen_digits"]  # fmt: skip


def test_the_quickstart_logs_real_images_reconstructions_and_sample_grids_within_its_run():
    import yaml

    def callbacks(*paths):
        stack = [yaml.safe_load((REPO / p).read_text()) for p in paths]
        trainer = {k: v for config in stack for k, v in config["trainer"].items()}  # the overlay's lists win
        return trainer, {c["class_path"].rsplit(".", 1)[-1]: c.get("init_args", {}) for c in trainer["callbacks"]}

    trainer, tokenizer = callbacks("configs/tokenizer/vq_digits.yaml", "configs/quickstart/tokenizer/vq_digits.yaml")
    assert {"RealImageGrid", "ReconstructionGrid"} <= set(tokenizer) and trainer["max_steps"] >= 51  # one epoch
    trainer, generator = callbacks("configs/causal/llamagen_digits.yaml",
                                   "configs/quickstart/causal/llamagen_digits.yaml")  # fmt: skip
    assert generator["SampleGrid"]["every_n_steps"] <= trainer["max_steps"]
    assert trainer["val_check_interval"] <= trainer["max_steps"] and "SampleWriter" in generator
