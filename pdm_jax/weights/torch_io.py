"""Read PyTorch-style state dicts into flat ``{name: np.ndarray}`` dicts, and fit them to Flax.

``.safetensors`` files are read with the ``safetensors`` package (no torch needed). Pickled
checkpoints (``.pth``, ``.pt``, ``.bin``, ``.ckpt``) need torch, which is an optional extra:
it is imported only when such a file is read. bfloat16 tensors stay bfloat16 (``ml_dtypes``).

``fit_to_template`` is the last step of every converter: it takes converted arrays keyed by
Flax path (``"encoder/conv_in/kernel"``) and the parameter tree the module expects, and fails
with the full list of missing, unexpected and mis-shaped entries instead of the first one.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable, Mapping
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"
TORCH_EXTRA_HINT = 'install the optional torch extra: pip install -e ".[torch]"'


class ConversionError(ValueError):
    """A state dict does not fit a Flax module (wrong architecture, config or file)."""


def _require_file(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"checkpoint file {path!r} does not exist; pass the path of a local "
            f"{SAFETENSORS_SUFFIX} or {'/'.join(TORCH_SUFFIXES)} file"
        )
    return path


def _import_torch() -> Any:
    try:
        import torch  # optional dependency, imported on demand
    except ImportError as err:
        raise ImportError(
            f"reading pickled PyTorch checkpoints (.pth/.pt/.bin/.ckpt) needs torch; "
            f"{TORCH_EXTRA_HINT}, or convert the file to .safetensors first"
        ) from err
    return torch


def _torch_to_numpy(tensor: Any, torch: Any) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        # numpy has no bfloat16; reinterpret the bits so nothing is rounded.
        return tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def load_torch_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a pickled PyTorch state dict (needs the torch extra).

    Args:
      path: a ``.pth``/``.pt``/``.bin``/``.ckpt`` file holding a state dict, or a dict with
        the state dict under ``"state_dict"`` (Lightning checkpoints).

    Returns:
      ``{name: np.ndarray}`` with the tensors' dtypes (bfloat16 kept via ``ml_dtypes``).
    """
    path = _require_file(path)
    torch = _import_torch()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ConversionError(
            f"{path!r} pickles objects other than tensors, which are not loaded (unsafe); "
            "re-save just its state dict (torch.save(ckpt['state_dict'], ...)) or convert it "
            "to .safetensors"
        ) from err
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ConversionError(
            f"{path!r} holds a {type(obj).__name__}, not a state dict; save "
            "model.state_dict() rather than the module"
        )
    return {k: _torch_to_numpy(v, torch) for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a state dict from ``.safetensors`` (no torch) or a pickled torch file.

    Args:
      path: checkpoint file; the suffix picks the reader.

    Returns:
      ``{name: np.ndarray}``.
    """
    path = _require_file(path)
    if path.endswith(SAFETENSORS_SUFFIX):
        from safetensors.numpy import load_file

        return dict(load_file(path))
    if path.endswith(TORCH_SUFFIXES):
        return load_torch_checkpoint(path)
    raise ConversionError(
        f"unknown checkpoint format {path!r}; expected {SAFETENSORS_SUFFIX} or one of "
        f"{', '.join(TORCH_SUFFIXES)}"
    )


def save_safetensors(state: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Writes a flat ``{name: array}`` dict as ``.safetensors`` (numpy or jax arrays).

    Args:
      state: flat mapping from names to arrays.
      path: output file.
    """
    from safetensors.numpy import save_file

    # np.ascontiguousarray would turn scalars (e.g. CLIP's logit_scale) into shape (1,).
    arrays = {k: np.array(v, order="C", copy=True) for k, v in state.items()}
    save_file(arrays, os.fspath(path))


def find_weights_file(directory: str | os.PathLike, candidates: Iterable[str]) -> str:
    """Returns the first of ``candidates`` that exists in ``directory``.

    Args:
      directory: a local model directory.
      candidates: file names in order of preference (safetensors first, by convention).

    Returns:
      The path of the file found.
    """
    directory = os.fspath(directory)
    candidates = list(candidates)
    for name in candidates:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"no weights file in {directory!r}; looked for {', '.join(candidates)} "
        "(sharded checkpoints are not supported: merge them into one file)"
    )


def flatten_paths(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flattens a nested dict into ``{"a/b/c": leaf}``.

    Args:
      tree: nested mapping (e.g. Flax params or their ``jax.eval_shape``).
      prefix: path prefix for the keys.

    Returns:
      A flat dict keyed by ``/``-joined paths.
    """
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_paths(value, path + "/"))
        else:
            flat[path] = value
    return flat


def unflatten_paths(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of ``flatten_paths``.

    Args:
      flat: ``{"a/b/c": leaf}``.

    Returns:
      The nested dict.
    """
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def _listing(title: str, items: list[str], limit: int = 50) -> str:
    shown = "\n  ".join(items[:limit])
    more = f"\n  ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{title} ({len(items)}):\n  {shown}{more}"


def fit_to_template(
    converted: Mapping[str, np.ndarray],
    template: Mapping[str, Any],
    what: str,
    unexpected: Iterable[str] = (),
) -> dict[str, Any]:
    """Checks converted arrays against a module's parameter tree and builds the params.

    Args:
      converted: ``{flax_path: array}`` produced by a converter.
      template: the expected params tree (arrays or ``jax.ShapeDtypeStruct`` leaves, e.g.
        from ``jax.eval_shape(module.init, ...)["params"]``); its dtypes are the output dtypes.
      what: model name used in the error message.
      unexpected: source keys the converter could not place (reported as unexpected).

    Returns:
      The params tree (jax arrays, template dtypes).

    Raises:
      ConversionError: listing every missing, unexpected and mis-shaped entry.
    """
    expected = flatten_paths(template)
    missing = sorted(set(expected) - set(converted))
    extra = sorted([*unexpected, *(set(converted) - set(expected))])
    misshaped = sorted(
        f"{path}: checkpoint {tuple(np.shape(value))} vs model {tuple(expected[path].shape)}"
        for path, value in converted.items()
        if path in expected and tuple(np.shape(value)) != tuple(expected[path].shape)
    )
    if missing or extra or misshaped:
        parts = [
            _listing(title, items)
            for title, items in (
                ("missing (in the model, not in the checkpoint)", missing),
                ("unexpected (in the checkpoint, not in the model)", extra),
                ("mis-shaped", misshaped),
            )
            if items
        ]
        raise ConversionError(
            f"{what} checkpoint does not match the model config; check that the config "
            "matches the checkpoint.\n" + "\n".join(parts)
        )
    params = {
        path: jnp.asarray(np.asarray(converted[path]), dtype=leaf.dtype)
        for path, leaf in expected.items()
    }
    return unflatten_paths(params)
