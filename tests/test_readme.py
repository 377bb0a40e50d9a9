"""The README's code is what runs: the Python API example and the two commands of CI.

Both are read from README.md at test time, so a README edit (e.g. a renamed module in the
example) is all a change needs; nothing here repeats the README's code.
"""

import importlib.util
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CI_RUN = ROOT / ".ci" / "run"
EXTRACTOR = ROOT / ".ci" / "readme_commands.py"


def _extractor():
    spec = importlib.util.spec_from_file_location("readme_commands", EXTRACTOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def python_api_example(text: str) -> str:
    """The first fenced ``python`` block after the "Python API" paragraph."""
    start = text.index("\nPython API")
    begin = text.index("```python\n", start) + len("```python\n")
    return text[begin : text.index("\n```", begin)]


def test_python_api_example_runs_as_printed(monkeypatch):
    code = python_api_example(README.read_text(encoding="utf-8"))
    assert "from pdm_jax import models" in code
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))
    namespace = {"__name__": "readme_example"}
    exec(compile(code, f"{README}:Python API", "exec"), namespace)
    x_t, m_t, out = namespace["x_t"], namespace["m_t"], namespace["out"]
    assert namespace["eps"].shape == x_t.shape and namespace["map0"].shape == m_t.shape
    assert out["x"].shape == x_t.shape and out["m"].shape == m_t.shape
    assert all(np.isfinite(value).all() for value in out.values())


def test_ci_reads_exactly_two_commands_from_the_readme():
    commands = _extractor().commands(README.read_text(encoding="utf-8"))
    assert len(commands) == 2
    install_and_demo, tests = commands
    for command in commands:  # each runs in a new shell: it sets up its own environment
        assert command.startswith("python3 -m venv .venv && . .venv/bin/activate && ")
        assert "pip install -c constraints.txt -e " in command
    assert "python -m pdm_jax.main --config=configs/pdm.py:demo --workdir=workdir/demo" in (
        install_and_demo
    )
    assert "lint-imports" in tests and "python -m pytest" in tests
    assert tests.endswith(" && mkdocs build --strict")  # the docs site: links, API reference
    for n, command in enumerate(commands, 1):  # the command line CI uses
        printed = subprocess.run(
            [sys.executable, str(EXTRACTOR), str(n)], capture_output=True, text=True, check=True
        ).stdout
        assert printed == command + "\n"


def test_ci_run_has_no_copy_of_the_commands():
    run = CI_RUN.read_text(encoding="utf-8")
    assert "readme_commands.py" in run
    for fragment in ("pip install", "pytest", "ruff", "lint-imports", "pdm_jax.main"):
        assert fragment not in run, fragment


@pytest.mark.parametrize(
    "section, problem",
    [
        ("```bash\none\n```\n", "exactly 2"),
        ("```bash\none\n```\n```bash\ntwo\n```\n```bash\nthree\n```\n", "exactly 2"),
        ("```bash\none\n```\n```bash\n\n```\n", "non-empty"),
        ("```bash\none\n```\n```bash\ntwo\n", "unterminated"),
    ],
)
def test_extraction_fails_loudly(section, problem):
    text = f"# x\n\n## Two commands\n\n{section}\n## Next\n\n```bash\nthree\n```\n"
    with pytest.raises(ValueError, match=problem):
        _extractor().commands(text)


def test_extraction_reads_only_its_section_and_bash_blocks():
    text = (
        "```bash\nbefore\n```\n## Two commands\n```python\nnot bash\n```\n"
        "```bash\none \\\n  --flag\n```\ntext\n```bash\ntwo\n```\n## Next\n```bash\nafter\n```\n"
    )
    assert _extractor().commands(text) == ["one \\\n  --flag", "two"]
    with pytest.raises(ValueError, match="exactly one"):
        _extractor().commands(text.replace("## Two commands", "## Other"))
