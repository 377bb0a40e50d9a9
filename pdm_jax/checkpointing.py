"""Checkpoints: orbax ``CheckpointManager`` with the train state, the grain iterator and the config.

Layout: ``<workdir>/checkpoints/<step>/{state,data,config}``. ``state`` is the whole
``TrainState`` (params, EMA params, optimizer state, step, RNG), ``data`` the grain
iterator's state (one JSON per process), ``config`` the run's config as JSON. Saves are
atomic (orbax writes to a temporary directory and renames) and keep the last
``ckpt.max_to_keep``.

Everything here is independent of what the state holds: the trainer (``pdm_jax.train.init``)
saves and restores its ``TrainState``; sampling and evaluation read parameters only
(``load_params``); ``pdm_jax.weights.components`` writes converted weights in the same
layout.
"""

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

STATE, DATA, CONFIG = "state", "data", "config"


class CheckpointNotFoundError(FileNotFoundError):
    """No checkpoint where one was asked for; the message names the path looked in."""


class ConfigMismatchError(ValueError):
    """A checkpoint's parameters do not fit the config; the message lists the differences."""


def checkpoint_dir(workdir: str | epath.Path) -> epath.Path:
    """``<workdir>/checkpoints``."""
    return epath.Path(workdir) / "checkpoints"


def create_manager(
    directory: str | epath.Path,
    *,
    max_to_keep: int | None = None,
    async_save: bool = True,
    read_only: bool = False,
) -> ocp.CheckpointManager:
    """A checkpoint manager for the ``state``, ``data`` and ``config`` items.

    Args:
      directory: the checkpoints directory (created unless ``read_only``).
      max_to_keep: keep this many most recent checkpoints (None: all).
      async_save: write in a background thread (``wait_until_finished`` joins it).
      read_only: open for restoring only.

    Returns:
      An ``ocp.CheckpointManager``.
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=not read_only,
        read_only=read_only,
        enable_async_checkpointing=async_save,
    )
    handlers = {
        STATE: ocp.PyTreeCheckpointHandler(),
        DATA: grain.checkpoint.CheckpointHandler(),
        CONFIG: ocp.JsonCheckpointHandler(),
    }
    return ocp.CheckpointManager(epath.Path(directory), options=options, item_handlers=handlers)


@dataclasses.dataclass(frozen=True)
class _IteratorSnapshot:
    """The iterator's state taken when the save starts (the save may finish later)."""

    state: bytes

    def get_state(self) -> bytes:
        return self.state


def save(
    manager: ocp.CheckpointManager,
    state: Any,
    *,
    data_iterator: Any | None = None,
    config: Mapping[str, Any] | None = None,
) -> int:
    """Saves the state (and the data iterator and config) at ``state.step``.

    Args:
      manager: from ``create_manager``.
      state: the train state.
      data_iterator: a grain iterator (``get_state`` returning bytes), or None.
      config: the run's config as a JSON-able dict, stored for inspection.

    Returns:
      The step saved.
    """
    step = int(jax.device_get(state.step))
    items = {STATE: ocp.args.PyTreeSave(state)}
    if data_iterator is not None:
        items[DATA] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iterator.get_state()))
    if config is not None:
        items[CONFIG] = ocp.args.JsonSave(dict(config))
    manager.save(step, args=ocp.args.Composite(**items), force=True)
    return step


def locate(path: str | epath.Path, step: int | None = None) -> tuple[epath.Path, int]:
    """Resolves a workdir, a checkpoints directory or a step directory.

    Args:
      path: ``<workdir>``, ``<workdir>/checkpoints`` or ``<workdir>/checkpoints/<step>``.
      step: the step wanted (None: the one the path names, else the latest).

    Returns:
      ``(checkpoints_directory, step)``.

    Raises:
      CheckpointNotFoundError: naming the directory looked in (and the steps found there).
    """
    p = epath.Path(path)
    if not p.exists():
        raise CheckpointNotFoundError(f"No checkpoint at {p}: the path does not exist.")
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    elif p.name.isdigit() and (p / STATE).is_dir():
        step = int(p.name) if step is None else step
        p = p.parent
    steps = sorted(create_manager(p, read_only=True).all_steps())
    if not steps:
        raise CheckpointNotFoundError(
            f"No checkpoint found in {p} (looked for step directories holding a {STATE!r} "
            "item). Train first, or point the path at a workdir, its checkpoints directory "
            "or one step directory."
        )
    if step is None:
        return p, steps[-1]
    if step not in steps:
        raise CheckpointNotFoundError(
            f"No checkpoint for step {step} in {p}; available steps: {steps}."
        )
    return p, step


def _state_tree(manager: ocp.CheckpointManager, step: int) -> Mapping[str, Any]:
    meta = manager.item_metadata(step)[STATE]
    return meta.tree if hasattr(meta, "tree") else meta


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


def restore_state(
    manager: ocp.CheckpointManager,
    step: int,
    target: Any,
    model_name: str,
    data_iterator: Any | None = None,
) -> Any:
    """Restores the full state (placed as ``target`` says) and the data iterator in place.

    Args:
      manager: a manager over the checkpoints directory.
      step: the step to restore.
      target: abstract state with shardings (``abstract_train_state``).
      model_name: the config's ``model.name`` (named in errors).
      data_iterator: a grain iterator to restore, or None.

    Returns:
      The restored state.

    Raises:
      ConfigMismatchError: listing the parameters whose paths or shapes differ.
    """
    where = str(epath.Path(manager.directory) / str(step))
    tree = _state_tree(manager, step)
    lines = param_mismatches(tree.get("params", {}), target.params)
    if lines:
        raise mismatch_error(where, lines, model_name)
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    item = ocp.args.PyTreeRestore(item=target, restore_args=restore_args)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**{STATE: item}))
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigMismatchError(
            f"Could not restore the train state at {where} into the config's layout (the "
            f"parameters match; the optimizer state differs, e.g. another "
            f"ckpt.freeze_image_stream or grad clipping): {e}"
        ) from e
    if data_iterator is not None:
        if (epath.Path(where) / DATA).is_dir():
            try:
                manager.restore(
                    step,
                    args=ocp.args.Composite(
                        **{DATA: grain.checkpoint.CheckpointRestore(data_iterator)}
                    ),
                )
            except ValueError as e:
                raise ConfigMismatchError(
                    f"The data position saved at {where} does not fit this input pipeline "
                    f"(use the checkpoint's data.* settings, or ckpt.init_from to start a "
                    f"new data order from its parameters): {e}"
                ) from e
        else:
            logging.warning("Checkpoint %s has no data item; the data order restarts.", where)
    return restored[STATE]


def load_params(path: str | epath.Path, use_ema: bool = True) -> tuple[Any, str]:
    """Loads only the parameters of a checkpoint (host arrays).

    Args:
      path: a workdir, checkpoints directory or step directory.
      use_ema: take ``ema_params`` when the checkpoint has them.

    Returns:
      ``(params, where)``.
    """
    root, step = locate(path)
    manager = create_manager(root, read_only=True)
    tree = _state_tree(manager, step)
    key = "ema_params" if use_ema and "ema_params" in tree else "params"
    if key not in tree:
        raise ConfigMismatchError(
            f"The checkpoint at {root / str(step)} has no 'params' in its state item "
            f"(found {sorted(tree)}); it is not a pdm_jax checkpoint."
        )
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    sub = {key: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree[key])}
    args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=cpu), sub)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            **{STATE: ocp.args.PyTreeRestore(item=sub, restore_args=args, partial_restore=True)}
        ),
    )
    return jax.tree.map(np.asarray, restored[STATE][key]), str(root / str(step))
