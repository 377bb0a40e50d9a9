"""The import-linter contracts in pyproject.toml cover every module of the package."""

import pathlib
import tomllib

import pdm_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = pathlib.Path(pdm_jax.__file__).parent


def _contracts() -> list[dict]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["importlinter"]["contracts"]


def _layered_names() -> set[str]:
    """Every module named in the package-wide layers contract (``a | b``, ``a : b``)."""
    (layers,) = [c for c in _contracts() if c["type"] == "layers" and "containers" not in c]
    names = set()
    for layer in layers["layers"]:
        for part in layer.replace(":", "|").split("|"):
            names.add(part.strip())
    return names


def _top_level_modules() -> set[str]:
    """``pdm_jax.x`` for every module file and subpackage directly under the package."""
    found = set()
    for path in PACKAGE.iterdir():
        if path.name.startswith(("_", ".")):
            continue
        if path.suffix == ".py" or (path / "__init__.py").exists():
            found.add(f"pdm_jax.{path.stem}")
    return found


def test_every_module_has_a_layer():
    missing = _top_level_modules() - _layered_names()
    assert not missing, (
        f"{sorted(missing)} are in no layer of the import-linter layers contract "
        "(pyproject.toml [tool.importlinter]): add each to the layer it belongs to."
    )


def test_the_layers_name_no_module_that_is_gone():
    gone = _layered_names() - _top_level_modules()
    assert not gone, f"the layers contract names modules that do not exist: {sorted(gone)}"


def test_every_package_keeps_its_siblings_acyclic():
    acyclic = [c for c in _contracts() if c["type"] == "acyclic_siblings"]
    assert acyclic and acyclic[0]["ancestors"] == ["pdm_jax"]
