"""Checkpoint files: the orbax manager, saving, finding a step, and reading it back.

Layout: ``<workdir>/checkpoints/<step>/{state,data,config}`` (the items ``STATE``, ``DATA``
and ``CONFIG``). ``save`` writes the train state, the grain iterator's state and the
config; ``locate`` resolves a path to a step; ``restore_state`` reads the whole state into
the config's layout (and the iterator in place); ``load_params`` reads the parameters
only, as host arrays; ``read_state_on_host`` reads a step as it was saved. Parameter
trees are compared and migrated by ``compat``; a step that cannot be read is diagnosed by
``diagnose``.
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

from pdm_jax.checkpointing.compat import (
    mismatch_error,
    param_mismatches,
    split_dim_leaves,
    stored_layout,
    with_frozen_params,
)
from pdm_jax.checkpointing.diagnose import read_or_raise_corrupt, try_read
from pdm_jax.checkpointing.errors import (
    LOAD_FIX,
    RESET_DATA_POSITION,
    RESUME_FIX,
    CheckpointNotFoundError,
    ConfigMismatchError,
)

STATE, DATA, CONFIG = "state", "data", "config"


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


def restore_state(
    manager: ocp.CheckpointManager,
    step: int,
    target: Any,
    model_name: str,
    data_iterator: Any | None = None,
    *,
    fix: str = RESUME_FIX,
) -> Any:
    """Restores the full state (placed as ``target`` says) and the data iterator in place.

    Args:
      manager: a manager over the checkpoints directory.
      step: the step to restore.
      target: abstract state with shardings (``abstract_train_state``).
      model_name: the config's ``model.name`` (named in errors).
      data_iterator: a grain iterator to restore, or None.
      fix: how to use an intact step instead (``{step}``, ``{path}``), for the message.

    Returns:
      The restored state.

    Raises:
      ConfigMismatchError: listing the parameters whose paths or shapes differ.
      CorruptCheckpointError: the step's files cannot be read (names an intact step).
    """
    where = str(epath.Path(manager.directory) / str(step))
    if data_iterator is not None:
        check_data_topology(epath.Path(where))
    read_all = lambda s: read_state_on_host(manager, s)
    tree = read_or_raise_corrupt(manager, step, lambda s: _state_tree(manager, s), fix, read_all)
    lines = param_mismatches(tree.get("params", {}), target.params)
    split = split_dim_leaves(tree.get("params", {}), target.params)
    if lines and not split:
        raise mismatch_error(where, lines, model_name)
    stored = stored_layout(target, tree.get("params", {}), split) if split else target
    restore_args = ocp.checkpoint_utils.construct_restore_args(stored)
    item = ocp.args.PyTreeRestore(item=stored, restore_args=restore_args)
    args = ocp.args.Composite(**{STATE: item})
    restored, e = try_read(lambda s: manager.restore(s, args=args), step)
    if e is not None:
        # Unreadable files, or a layout that differs: reading the step as it was saved tells.
        read_or_raise_corrupt(manager, step, read_all, fix)
        if not isinstance(e, ValueError | KeyError | TypeError):
            raise e
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
                    f"(use the checkpoint's data.* settings, or rerun with "
                    f"--config.{RESET_DATA_POSITION}=True to take up the data order at the "
                    f"checkpoint's step): {e}"
                ) from e
        else:
            logging.warning("Checkpoint %s has no data item; the data order restarts.", where)
    if split:
        logging.info(
            "%s: %d parameter(s) (and their EMA and optimizer moments) saved in the flat "
            "attention layout, reshaped to the heads layout.",
            where,
            len(split),
        )
        return jax.tree.map(
            lambda x, t: (
                x if x.shape == t.shape else jax.device_put(x.reshape(t.shape), t.sharding)
            ),
            restored[STATE],
            target,
        )
    return restored[STATE]


def check_data_topology(step_dir: epath.Path) -> None:
    """Refuses a data item saved by another number of processes, naming the option.

    Grain saves one iterator state per process (``process_<i>-of-<n>.json``) and reads only
    this process's, for the same ``n``: it cannot re-map the positions to another process
    count.

    Args:
      step_dir: ``<checkpoints>/<step>``.

    Raises:
      ConfigMismatchError: the step has a data item, but none for this process count.
    """
    data = step_dir / DATA
    if not data.is_dir():
        return
    index, count = jax.process_index(), jax.process_count()
    if (data / f"process_{index}-of-{count}.json").exists():
        return
    saved = sorted(p.name for p in data.glob("process_*-of-*.json"))
    if not saved:
        return  # nothing of another layout to refuse; the restore itself reports
    counts = sorted({name.rsplit("-of-", 1)[1].removesuffix(".json") for name in saved})
    raise ConfigMismatchError(
        f"The checkpoint at {step_dir} holds the data position of a run with "
        f"{' or '.join(counts)} process(es) ({', '.join(saved)}), "
        f"and this run has {count}: grain keeps one iterator state per process and cannot "
        f"re-map it. Rerun with --config.{RESET_DATA_POSITION}=True to restore the train "
        "state and take up the data order at the checkpoint's step (the data order is the "
        "same for every process count, so with data.num_workers=0 that is where it left "
        "off), or resume with the process count it was saved with."
    )


def load_params(
    path: str | epath.Path, use_ema: bool = True, *, fix: str = LOAD_FIX
) -> tuple[Any, str]:
    """Loads only the parameters of a checkpoint (host arrays).

    Args:
      path: a workdir, checkpoints directory or step directory.
      use_ema: take ``ema_params`` when the checkpoint has them.
      fix: how to use an intact step instead (``{step}``, ``{path}``), for the message.

    Returns:
      ``(params, where)``.

    Raises:
      CorruptCheckpointError: the step's files cannot be read (names an intact step).
    """
    root, step = locate(path)
    manager = create_manager(root, read_only=True)
    read = lambda s: _read_params(manager, s, use_ema)
    params = read_or_raise_corrupt(manager, step, read, fix)
    return params, str(root / str(step))


def _read_params(manager: ocp.CheckpointManager, step: int, use_ema: bool) -> Any:
    """The (EMA) parameters of one step as host arrays (``load_params``'s read)."""
    root = epath.Path(manager.directory)
    tree = _state_tree(manager, step)
    if "params" not in tree:
        raise ConfigMismatchError(
            f"The checkpoint at {root / str(step)} has no 'params' in its state item "
            f"(found {sorted(tree)}); it is not a pdm_jax checkpoint."
        )
    keys = ["ema_params", "params"] if use_ema and "ema_params" in tree else ["params"]
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    sub = {
        key: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree[key])
        for key in keys
    }
    args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=cpu), sub)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            **{STATE: ocp.args.PyTreeRestore(item=sub, restore_args=args, partial_restore=True)}
        ),
    )[STATE]
    params = restored["params"]
    if "ema_params" in restored:  # frozen leaves: their parameter (with_frozen_params)
        params = with_frozen_params(restored["ema_params"], params)
    return jax.tree.map(np.asarray, params)


def read_state_on_host(manager: ocp.CheckpointManager, step: int) -> Any:
    """Reads a step's whole ``state`` item as saved, as numpy arrays (no target needed).

    It checks that every array of the step can be read, whatever the config.
    """
    tree = _state_tree(manager, step)
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    restored = manager.restore(
        step, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(restore_args=args)})
    )
    return restored[STATE]
