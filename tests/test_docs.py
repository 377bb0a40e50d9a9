"""The documentation speaks of the software: no development history, a short README.

The project's prose (README, docs pages, code comments and strings, tests, configs, launch
scripts, notebooks, CI) is scanned for words that belong to a development diary rather than
to a manual: numbered work periods, issue numbers and "this …'s machine" of one day. Results
are recorded by commit and machine instead (docs/results.md).
"""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SCANNED = ("README.md", "docs", "pdm_jax", "tests", "configs", "launch", "colab", ".ci")
SUFFIXES = {".md", ".py", ".sh", ".ipynb", ".toml", ".yml", ".yaml", ".txt", ".json", ""}
MAX_README_LINES = 300

# Each pattern names a way a diary speaks; they are tight enough to leave alone an SSH or
# tmux session, `tf.Session`, hex colours (`#1f77b4`), `gs://` paths and "stop" commands.
HISTORY = {
    "numbered work period": re.compile(r"\bsessions? \d+", re.IGNORECASE),
    "a work period's machine": re.compile(
        r"\b(?:this|that|the same|one|earlier|previous|next|each) sessions?(?:'s)?\b"
        r"|\bsession's machine\b|\bsessions' machines?\b",
        re.IGNORECASE,
    ),
    "work period": re.compile(r"\bwork periods?\b", re.IGNORECASE),
    "issue number": re.compile(r"\bissues? #?\d+", re.IGNORECASE),
    "numbered stop": re.compile(r"\bstop \d+\b", re.IGNORECASE),
    "bare ticket number": re.compile(r"(?<![\w&/#'\"`=:\[\-])#\d{1,3}\b(?![\w\-])"),
}


def scanned_files() -> list[pathlib.Path]:
    """Every text file of the scanned parts of the project (build outputs excluded)."""
    files = []
    for name in SCANNED:
        path = ROOT / name
        if path.is_file():
            files.append(path)
            continue
        for file in sorted(path.rglob("*")):
            parts = set(file.relative_to(ROOT).parts)
            if parts & {"__pycache__", ".ipynb_checkpoints", "site"} or not file.is_file():
                continue
            if file.suffix in SUFFIXES and file != pathlib.Path(__file__).resolve():
                files.append(file)
    return files


def history_hits(text: str) -> list[tuple[int, str, str]]:
    """(line number, pattern name, matched text) for each development-history phrase."""
    hits = []
    for number, line in enumerate(text.splitlines(), 1):
        for name, pattern in HISTORY.items():
            hits.extend((number, name, m.group(0)) for m in pattern.finditer(line))
    return hits


def test_no_development_history_in_the_project():
    found = []
    for file in scanned_files():
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        rel = file.relative_to(ROOT)
        found += [f"{rel}:{n}: {name}: {match!r}" for n, name, match in history_hits(text)]
    assert not found, "development history in the project:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "text",
    [
        "as session 13 measured",
        "on this session's machine",
        "the 0.70 that issue #17 asks for",
        "see issue 16",
        "in one work period",
        "a stop 3 of the plan",
        "fixed in #12.",
    ],
)
def test_history_patterns_catch_a_diary(text):
    assert history_hits(text)


@pytest.mark.parametrize(
    "text",
    [
        "keep the run going in a tmux session",
        "ssh into the worker; the SSH session ends",
        "with tf.Session() as sess:",
        'colour "#1f77b4" and "#ff7f0e"',
        "gs://my-bucket/pdm/run#3",
        "launch/tpu_vm.sh stop --run_name=two-stream",
        "cell [#3] of the notebook",
        "a session-scoped fixture",
    ],
)
def test_history_patterns_leave_ordinary_words(text):
    assert not history_hits(text)


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines; keep it at most {MAX_README_LINES} and move "
        "details to a page under docs/"
    )
