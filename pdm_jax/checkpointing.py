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
import gc
import logging
import math
import sys
from collections.abc import Callable, Mapping
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec

STATE, DATA, CONFIG = "state", "data", "config"


class CheckpointNotFoundError(FileNotFoundError):
    """No checkpoint where one was asked for; the message names the path looked in."""


class ConfigMismatchError(ValueError):
    """A checkpoint's parameters do not fit the config; the message lists the differences."""


class CorruptCheckpointError(RuntimeError):
    """A checkpoint's files cannot be read (truncated by a full disk, an incomplete copy).

    The message names the unreadable step directory, the newest earlier step that was read
    in full, and the flag that uses it. Nothing falls back to another step on its own.
    """


# How to use an intact step instead, per caller; ``{step}`` and ``{path}`` name it.
RESUME_FIX = (
    "To resume training from it, rerun with --config.ckpt.resume_from={path} (a step of the "
    "run's own checkpoints: the later steps are then moved to <workdir>/checkpoints_superseded)"
)
LOAD_FIX = "Pass that step directory ({path}) instead"


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
    tree = _read_or_raise_corrupt(manager, step, lambda s: _state_tree(manager, s), fix, read_all)
    lines = param_mismatches(tree.get("params", {}), target.params)
    split = split_dim_leaves(tree.get("params", {}), target.params)
    if lines and not split:
        raise mismatch_error(where, lines, model_name)
    stored = _stored_layout(target, tree.get("params", {}), split) if split else target
    restore_args = ocp.checkpoint_utils.construct_restore_args(stored)
    item = ocp.args.PyTreeRestore(item=stored, restore_args=restore_args)
    args = ocp.args.Composite(**{STATE: item})
    restored, e = try_read(lambda s: manager.restore(s, args=args), step)
    if e is not None:
        # Unreadable files, or a layout that differs: reading the step as it was saved tells.
        _read_or_raise_corrupt(manager, step, read_all, fix)
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


def _stored_layout(target: Any, stored_params: Any, split: Mapping[str, tuple[int, ...]]) -> Any:
    """``target`` with the split leaves (params, EMA, moments) at their stored shapes.

    A leaf mirrors a split parameter when its trailing dict keys are the parameter's path
    and its shape is the config's; it is read whole (replicated) and reshaped afterwards.
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


# The option that resumes a checkpoint without its saved data position.
RESET_DATA_POSITION = "ckpt.reset_data_position"


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
    params = _read_or_raise_corrupt(manager, step, read, fix)
    return params, str(root / str(step))


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


def _first_line(error: BaseException, limit: int = 300) -> str:
    """The innermost cause of a read error, one line, without tensorstore's spec dump."""
    seen = set()
    while error.__cause__ is not None and id(error) not in seen:
        seen.add(id(error))
        error = error.__cause__
    text = (str(error).strip().splitlines() or [""])[0].split(" [tensorstore_spec=")[0]
    text = text if len(text) <= limit else text[:limit] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class _UnretrievedReadErrors(logging.Filter):
    """Drops asyncio's "Future/Task exception was never retrieved" reports of failed reads."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(
            ("Future exception was never retrieved", "Task exception was never retrieved")
        )


_UNRETRIEVED = _UnretrievedReadErrors()


def try_read(read: Callable[[int], Any], step: int) -> tuple[Any, Exception | None]:
    """``(read(step), None)``, or ``(None, error)`` when reading the step raises.

    ``CheckpointNotFoundError`` and ``ConfigMismatchError`` pass through: they are not read
    errors. The error comes back without its traceback, and the reads it left pending
    inside orbax are collected here with Python's "Exception ignored in <coroutine>"
    reports of them silenced: the error already says what failed. Futures that orbax still
    holds may only be collected at exit; asyncio's "Future (or Task) exception was never
    retrieved" reports of them are dropped too, from the first failed read on.
    """
    previous = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        try:
            return read(step), None
        except (CheckpointNotFoundError, ConfigMismatchError):
            raise
        except Exception as e:
            error = e
        logging.getLogger("asyncio").addFilter(_UNRETRIEVED)
        cause, seen = error, set()
        while cause is not None and id(cause) not in seen:
            seen.add(id(cause))
            cause.__traceback__ = None
            cause = cause.__cause__ or cause.__context__
        gc.collect()
        return None, error
    finally:
        sys.unraisablehook = previous


def _read_or_raise_corrupt(
    manager: ocp.CheckpointManager,
    step: int,
    read: Callable[[int], Any],
    fix: str,
    check: Callable[[int], Any] | None = None,
) -> Any:
    """``read(step)``; when the step cannot be read, ``corrupt_checkpoint_error`` (raised).

    ``check`` (default ``read``) is tried on the earlier steps to find an intact one.
    """
    value, error = try_read(read, step)
    if error is not None:
        raise corrupt_checkpoint_error(manager, step, _first_line(error), check or read, fix)
    return value


def corrupt_checkpoint_error(
    manager: ocp.CheckpointManager,
    step: int,
    reason: str,
    read: Callable[[int], Any],
    fix: str,
) -> CorruptCheckpointError:
    """The error for an unreadable ``step``, naming the newest earlier step ``read`` reads.

    Args:
      manager: a manager over the checkpoints directory.
      step: the unreadable step.
      reason: the read error, one line.
      read: ``step -> value``: the read that failed (or a fuller one), tried on the
        earlier steps, newest first.
      fix: how to use the intact step (``{step}`` and ``{path}`` are filled in).

    Returns:
      The error (not raised).
    """
    root = epath.Path(manager.directory)
    failed = []
    for earlier in sorted((s for s in manager.all_steps() if s < step), reverse=True):
        if try_read(read, earlier)[1] is None:
            how = fix.format(step=earlier, path=root / str(earlier))
            return CorruptCheckpointError(
                f"Checkpoint {root / str(step)} cannot be read ({reason}); its files are "
                f"damaged (a full disk or an incomplete copy truncates them). Step {earlier} "
                f"({root / str(earlier)}) can be read"
                + (f"; steps {failed} in between do not" if failed else "")
                + f". {how}. Nothing was restored."
            )
        failed.append(earlier)
    checked = f"steps {failed} cannot be read either" if failed else "it has no earlier step"
    return CorruptCheckpointError(
        f"Checkpoint {root / str(step)} cannot be read ({reason}); its files are damaged (a "
        f"full disk or an incomplete copy truncates them), and {root} has no intact step "
        f"to use instead ({checked}). Restore the directory from a copy, or start again "
        "(e.g. from --config.ckpt.init_from) in a new workdir."
    )
