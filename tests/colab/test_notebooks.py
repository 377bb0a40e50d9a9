"""The Colab notebooks run end to end, in their smoke setting, in a Jupyter kernel on the CPU.

Each notebook is executed with nbclient in a ``python3`` kernel (this interpreter), with its
form fields (the ``NAME = value  # @param`` lines) set the way a user fills them in: the
smoke setting and output folders under ``tmp_path``. The kernel gets JAX's real CPU devices
(not the 8 fake ones of the other tests), as a Colab CPU runtime does. Any cell error fails
the test; the checks then read the pictures and text the cells produced.
"""

import copy
import json
import os
import pathlib
import re
import subprocess

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[2]
COLAB = REPO / "colab"
NOTEBOOKS = ("pdm_jax_demo.ipynb", "pdm_jax_weights.ipynb")
_PARAM_LINE = re.compile(r"^(\w+) = .*?(  # @param .*)$", re.M)


def _read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(COLAB / name, as_version=4)


def with_form_values(nb: nbformat.NotebookNode, **values) -> nbformat.NotebookNode:
    """A copy of ``nb`` whose ``NAME = ...  # @param`` lines hold ``values`` (all must exist)."""
    nb = copy.deepcopy(nb)
    unset = set(values)

    def fill(match: re.Match) -> str:
        name = match.group(1)
        if name not in values:
            return match.group(0)
        unset.discard(name)
        return f"{name} = {values[name]!r}{match.group(2)}"

    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.source = _PARAM_LINE.sub(fill, cell.source)
    assert not unset, f"the notebook has no form field {sorted(unset)}"
    return nb


def execute(nb: nbformat.NotebookNode, cwd: pathlib.Path) -> nbformat.NotebookNode:
    """Runs every cell in a fresh kernel started in ``cwd``; raises on a cell error."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = re.sub(
        r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")
    ).strip()
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    client.execute(env=env)
    return nb


def text_of(nb: nbformat.NotebookNode) -> str:
    """Everything the cells printed (stdout and stderr streams, plain-text results)."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                parts.append(out.text)
            elif "text/plain" in out.get("data", {}):
                parts.append(out.data["text/plain"])
    return "".join(parts)


def shown_images(nb: nbformat.NotebookNode) -> int:
    return sum(
        "image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", [])
    )


def _picture(path: pathlib.Path) -> np.ndarray:
    assert path.is_file(), f"{path} was not written"
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


@pytest.mark.slow
def test_demo_notebook_trains_and_shows_all_four_tasks(tmp_path):
    workdir = tmp_path / "demo"
    nb = execute(with_form_values(_read(NOTEBOOKS[0]), SMOKE=True, WORKDIR=str(workdir)), REPO)
    text = text_of(nb)
    assert f"pdm_jax from {REPO}" in text  # the checkout it runs in, no install
    assert "mesh: {'data': " in text and "backend cpu" in text
    assert (workdir / "checkpoints" / "4").is_dir()  # the smoke run's 4 steps
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["step"] == 4 and metrics["num_prompts"] == 4
    num_shown = 4
    for task in ("cogenerate", "given_map", "given_image", "inpaint"):
        picture = _picture(workdir / "colab" / f"{task}.png")
        rows = num_shown + (task == "cogenerate")  # co-generation adds PROMPT
        assert picture.shape[0] > rows * 128 and picture.shape[1] > 4 * 128, task
        assert picture.std() > 10, f"{task}.png is blank"
    assert shown_images(nb) >= 5  # the held-out grid and the four task figures


@pytest.mark.slow
def test_weights_notebook_converts_and_samples_typed_prompts(tmp_path):
    out = tmp_path / "weights"
    prompts = "a dog on a wooden floor | a red bus"
    nb = with_form_values(
        _read(NOTEBOOKS[1]), SMOKE=True, OUT_DIR=str(out), PROMPTS=prompts, NUM_SAMPLES=2
    )
    text = text_of(execute(nb, REPO))
    assert "-m pdm_jax.convert pdm --input" in text and "--model_kwargs=" in text
    assert "-m pdm_jax.convert clip_text --input" in text
    converted = out / "tiny_weights" / "converted"
    assert (converted / "nnet_ema" / "checkpoints" / "0").is_dir()
    assert (converted / "clip-text" / "pdm_jax_component.json").is_file()
    per_image = re.search(r"then [\d.]+ s, ([\d.]+) s per image", text)
    assert per_image and float(per_image.group(1)) > 0, text[-2000:]
    for k in range(4):  # 2 prompts × 2 samples
        image = _picture(out / f"{k:03d}_image.png")
        assert image.shape == (256, 256, 3) and image.std() > 1
        assert _picture(out / f"{k:03d}_map.png").shape[0] == 256
    assert _picture(out / "grid.png").shape[0] > 4 * 128


def test_first_cell_clones_the_repository_when_not_run_in_a_checkout(tmp_path):
    if subprocess.run(["git", "-C", str(REPO), "rev-parse"], capture_output=True).returncode:
        pytest.skip("the repository is not a git checkout here: nothing to clone from")
    clone = tmp_path / "clone"
    nb = with_form_values(_read(NOTEBOOKS[0]), REPO_URL=str(REPO), BRANCH="", CLONE_DIR=str(clone))
    where = "import configs, pdm_jax\nprint(pdm_jax.__file__, list(configs.__path__))"
    nb.cells = [nb.cells[1], nbformat.v4.new_code_cell(where)]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    text = text_of(execute(nb, outside))
    assert (clone / "pyproject.toml").is_file()
    assert f"pdm_jax from {clone}" in text
    assert f"{clone}/pdm_jax/__init__.py" in text and f"{clone}/configs" in text


def test_notebooks_share_the_first_cell_and_are_committed_without_outputs():
    first_cells = {_read(name).cells[1].source for name in NOTEBOOKS}
    assert len(first_cells) == 1, "the install cells of the notebooks differ"
    for name in NOTEBOOKS:
        for cell in _read(name).cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{name}: strip outputs"
