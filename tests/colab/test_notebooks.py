"""The Colab notebooks run end to end, in their smoke setting, in a Jupyter kernel on the CPU.

Each notebook is executed with nbclient in a ``python3`` kernel (this interpreter), with its
form fields (the ``NAME = value  # @param`` lines) set the way a user fills them in: the
smoke setting and output folders under ``tmp_path``. The kernel gets JAX's real CPU devices
(not the 8 fake ones of the other tests), as a Colab CPU runtime does. Any cell error fails
the test; the checks then read the pictures and text the cells produced.

The first cell's other branches, which a fresh Colab runtime takes, run here too: cloning
when the notebook is not inside a checkout (from this repository), and installing, with
``python -m pip`` replaced by a recorder, for a TPU, GPU and CPU runtime.
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


# A stand-in for ``python -m pip`` (first on the kernel's PYTHONPATH): it records its
# arguments and installs nothing.
_FAKE_PIP = """import json, os, sys
with open(os.environ["PIP_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
"""
# Run before the first cell: the runtime as the scenario describes it. The kernel's
# importlib.metadata answers for pdm_jax (not installed) and jax (the runtime's version).
_RUNTIME = """import importlib.metadata, os
os.environ.pop("TPU_ACCELERATOR_TYPE", None)
os.environ["PATH"] = {path!r}
if {tpu!r}:
    os.environ["TPU_ACCELERATOR_TYPE"] = "v5litepod-1"
_version = getattr(importlib.metadata.version, "real", importlib.metadata.version)

def version(name):
    if name == "pdm_jax" or (name == "jax" and {jax!r} is None):
        raise importlib.metadata.PackageNotFoundError(name)
    return {jax!r} if name == "jax" else _version(name)

version.real = _version
importlib.metadata.version = version
"""


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


def execute(nb: nbformat.NotebookNode, cwd: pathlib.Path, **env_vars) -> nbformat.NotebookNode:
    """Runs every cell in a fresh kernel started in ``cwd`` (``env_vars`` added to its
    environment); raises on a cell error."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", **env_vars)
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


def test_first_cell_installs_jax_for_the_accelerator_it_finds(tmp_path):
    fake = tmp_path / "fake"
    (fake / "pip").mkdir(parents=True)
    (fake / "pip" / "__init__.py").write_text("")
    (fake / "pip" / "__main__.py").write_text(_FAKE_PIP)
    gpu_bin = tmp_path / "gpu_bin"
    gpu_bin.mkdir()
    (gpu_bin / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA L4'\n")
    (gpu_bin / "nvidia-smi").chmod(0o755)
    path = os.environ["PATH"]
    scenarios = [  # (TPU, nvidia-smi, runtime's jax, USE_CONSTRAINTS)
        (True, False, "0.12.0", False),  # a newer jax than pyproject allows: jax[tpu]
        (True, False, "0.10.2", False),  # the runtime's TPU jax fits: kept
        (False, True, "0.10.2", True),  # the tested versions: jax[cuda12] and constraints
        (False, False, None, False),  # CPU: pyproject's jax, no plugin
    ]
    first = _read(NOTEBOOKS[0]).cells[1]
    nb = nbformat.v4.new_notebook()
    for tpu, gpu, jax, constraints in scenarios:
        runtime = _RUNTIME.format(tpu=tpu, jax=jax, path=f"{gpu_bin}:{path}" if gpu else path)
        install = with_form_values(
            nbformat.v4.new_notebook(cells=[copy.deepcopy(first)]), USE_CONSTRAINTS=constraints
        ).cells[0]
        nb.cells += [nbformat.v4.new_code_cell(runtime), install]
    log = tmp_path / "pip.log"
    text = text_of(execute(nb, REPO, PYTHONPATH=str(fake), PIP_LOG=str(log)))
    found = re.findall(rf"pdm_jax from {re.escape(str(REPO))}; accelerator: (\w+)", text)
    assert found == ["tpu", "tpu", "gpu", "cpu"]
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    bounds = re.search(r'"jax(>=[^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    editable = ["install", "-q", "-e", "."]
    assert calls == [
        [*editable, f"jax[tpu]{bounds}"],
        editable,
        [*editable, f"jax[cuda12]{bounds}", "-c", "constraints.txt"],
        editable,
    ]
