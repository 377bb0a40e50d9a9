"""Unreadable checkpoints: try a read, and name the newest earlier step that reads in full.

``try_read`` runs one read and hands back its error (quietly: orbax's pending reads and
asyncio's reports of them are collected and silenced); ``read_or_raise_corrupt`` turns a
failed read into ``corrupt_checkpoint_error``, which tries the earlier steps, newest first,
and names the first intact one with the caller's fix (``errors.RESUME_FIX``,
``errors.LOAD_FIX``, or a mode's step flag).
"""

import gc
import logging
import sys
from collections.abc import Callable
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from pdm_jax.checkpointing.errors import (
    CheckpointNotFoundError,
    ConfigMismatchError,
    CorruptCheckpointError,
)


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


def read_or_raise_corrupt(
    manager: ocp.CheckpointManager,
    step: int,
    read: Callable[[int], Any],
    fix: str,
    check: Callable[[int], Any] | None = None,
) -> Any:
    """``read(step)``; when the step cannot be read, ``corrupt_checkpoint_error`` (raised).

    Args:
      manager: a manager over the checkpoints directory.
      step: the step to read.
      read: ``step -> value``.
      fix: how to use an intact step instead (``{step}``, ``{path}``), for the message.
      check: tried on the earlier steps to find an intact one (default ``read``).

    Returns:
      ``read(step)``.

    Raises:
      CorruptCheckpointError: the step cannot be read (names an intact step, if any).
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
