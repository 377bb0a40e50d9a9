"""Parameter trees: a checkpoint's against the config's, and the layouts that still load.

``param_mismatches`` lists the paths and shapes that differ and ``mismatch_error`` turns
them into the error; ``split_dim_leaves``, ``reshape_split_leaves`` and ``stored_layout``
read checkpoints of the flat attention layout into the heads layout; ``with_frozen_params``
fills the EMA placeholders of frozen parameters. Everything works on trees of arrays,
metadata or shape structs; nothing here reads files.
"""

import logging
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec

from pdm_jax.checkpointing.errors import ConfigMismatchError


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    flat = traverse_util.flatten_dict(dict(tree), sep="/")
    return {k: tuple(v.shape) for k, v in flat.items()}


def param_mismatches(found: Any, expected: Any) -> list[str]:
    """Differences between two parameter trees (arrays, metadata or shape structs).

    Args:
      found: the checkpoint's tree.
      expected: the tree the config builds.

    Returns:
      One line per missing, unexpected or mis-shaped path; empty when they match.
    """
    a, b = _flat_shapes(found), _flat_shapes(expected)
    lines = [f"{k}: missing from the checkpoint, config shape {b[k]}" for k in sorted(b.keys() - a)]
    lines += [f"{k}: in the checkpoint {a[k]}, not in the config" for k in sorted(a.keys() - b)]
    lines += [
        f"{k}: checkpoint {a[k]} vs config {b[k]}" for k in sorted(a.keys() & b) if a[k] != b[k]
    ]
    return lines


def mismatch_error(where: str, lines: list[str], model_name: str) -> ConfigMismatchError:
    """The error for a checkpoint whose parameters differ from the config (``lines``)."""
    shown = lines[:40] + ([f"... and {len(lines) - 40} more"] if len(lines) > 40 else [])
    return ConfigMismatchError(
        f"The checkpoint at {where} does not match the config (model.name="
        f"{model_name!r}); {len(lines)} parameter(s) differ:\n  "
        + "\n  ".join(shown)
        + "\nUse the config the checkpoint was trained with (its 'config' item holds it)."
    )


def _refines(old: tuple[int, ...], new: tuple[int, ...]) -> bool:
    """Whether ``new`` splits each dimension of ``old`` into consecutive ones (same order)."""
    if old == new or math.prod(old) != math.prod(new):
        return False
    i = 0
    for d in old:
        size = 1
        while i < len(new) and (size < d or (size == d and new[i] == 1 and d == 1)):
            size *= new[i]
            i += 1
        if size != d:
            return False
    return i == len(new)


def split_dim_leaves(found: Any, expected: Any) -> dict[str, tuple[int, ...]]:
    """Parameters saved with dimensions that the config's layout splits into several.

    Checkpoints written before the attention kernels were laid out by heads hold ``qkv``
    as ``[D, 3D]`` and ``proj`` as ``[D, D]``; the models now keep ``[D, 3, H, Dh]`` and
    ``[H, Dh, D]``, the same numbers in the same order, so such a checkpoint is read by a
    reshape. Only a pure split of consecutive dimensions qualifies (never a transpose).

    Args:
      found: the checkpoint's parameter tree (arrays or metadata).
      expected: the config's parameter tree (arrays or shape structs).

    Returns:
      ``{path: config shape}`` for each such leaf, or ``{}`` when any other difference
      exists (then ``param_mismatches`` tells).
    """
    a, b = _flat_shapes(found), _flat_shapes(expected)
    if a.keys() != b.keys():
        return {}
    split = {k: b[k] for k in a if a[k] != b[k]}
    if not all(_refines(a[k], new) for k, new in split.items()):
        return {}
    return split


def reshape_split_leaves(params: Any, expected: Any, where: str) -> Any:
    """``params`` with each leaf the config splits (``split_dim_leaves``) reshaped to it.

    Paths that only one side has are left as they are (a U-ViT read into a two-stream
    model's image stream); other differences stay for ``param_mismatches`` to report.

    Args:
      params: host parameter tree read from a checkpoint.
      expected: the config's parameter tree (shape structs).
      where: the checkpoint, for the log line.

    Returns:
      The tree, unchanged when nothing needs a reshape.
    """
    a, b = _flat_shapes(params), _flat_shapes(expected)
    split = {k: b[k] for k in a.keys() & b.keys() if _refines(a[k], b[k])}
    if not split:
        return params
    logging.info(
        "%s: %d parameter(s) saved in the flat attention layout, reshaped to the heads layout "
        "(%s, ...).",
        where,
        len(split),
        next(iter(split)),
    )
    flat = traverse_util.flatten_dict(dict(params), sep="/")
    flat = {k: (np.reshape(v, split[k]) if k in split else v) for k, v in flat.items()}
    return traverse_util.unflatten_dict(flat, sep="/")


def stored_layout(target: Any, stored_params: Any, split: Mapping[str, tuple[int, ...]]) -> Any:
    """``target`` with the split leaves (params, EMA, moments) at their stored shapes.

    A leaf mirrors a split parameter when its trailing dict keys are the parameter's path
    and its shape is the config's; it is read whole (replicated) and reshaped afterwards.

    Args:
      target: abstract train state with shardings.
      stored_params: the checkpoint's parameter tree (metadata).
      split: ``split_dim_leaves(stored_params, target.params)``.

    Returns:
      The restore target for the checkpoint as it was saved.
    """
    old = {k: v for k, v in _flat_shapes(stored_params).items() if k in split}

    def layout(path, t):
        keys = "/".join(
            str(e.key)
            for e in path
            if isinstance(e, jax.tree_util.DictKey)  # dict keys (optax states: attributes)
        )
        for k, new in split.items():
            if (keys == k or keys.endswith("/" + k)) and tuple(t.shape) == tuple(new):
                whole = NamedSharding(t.sharding.mesh, PartitionSpec())
                return jax.ShapeDtypeStruct(old[k], t.dtype, sharding=whole)
        return t

    return jax.tree_util.tree_map_with_path(layout, target)


def with_frozen_params(ema_params: Any, params: Any) -> Any:
    """The full EMA parameter tree: each frozen leaf's placeholder replaced by its parameter.

    The train state keeps no EMA copy of a frozen parameter (the two-stream image stream
    with ``ckpt.freeze_image_stream``): it never changes, so its EMA is the parameter
    itself, and its ``ema_params`` leaf is a scalar placeholder (a scalar parameter keeps a
    real copy). A leaf whose shape differs from its parameter's is such a placeholder.

    Args:
      ema_params: the state's ``ema_params``.
      params: the state's ``params`` (same tree structure).

    Returns:
      ``ema_params`` with every placeholder replaced by the parameter.
    """
    return jax.tree.map(lambda e, p: e if e.shape == p.shape else p, ema_params, params)
