"""Checkpoints: orbax ``CheckpointManager`` with the train state, the grain iterator and the config.

Layout: ``<workdir>/checkpoints/<step>/{state,data,config}``. ``state`` is the whole
``TrainState`` (params, EMA params, optimizer state, step, RNG), ``data`` the grain
iterator's state (one JSON per process), ``config`` the run's config as JSON. Saves are
atomic (orbax writes to a temporary directory and renames) and keep the last
``ckpt.max_to_keep``.

Everything here is independent of what the state holds: training (``pdm_jax.train``)
saves and restores its ``TrainState``; sampling and evaluation read parameters only
(``load_params``); ``pdm_jax.weights.components`` writes converted weights in the same
layout.

Modules:

- ``store``: the manager, ``save``, ``locate``, ``restore_state``, ``load_params``,
  ``read_state_on_host`` and the data item's process-count check.
- ``compat``: parameter trees against the config (``param_mismatches``,
  ``mismatch_error``), the flat attention layout read into the heads layout, and the
  EMA placeholders of frozen parameters (``with_frozen_params``).
- ``diagnose``: reading a step that may be damaged (``try_read``), and the error that
  names the newest intact earlier step (``corrupt_checkpoint_error``).
- ``errors``: the exceptions, and the fixes their messages suggest.

The names below are the package's API; ``from pdm_jax import checkpointing`` and
``checkpointing.save(...)`` is how callers use it.
"""

from pdm_jax.checkpointing.compat import (
    mismatch_error,
    param_mismatches,
    reshape_split_leaves,
    split_dim_leaves,
    with_frozen_params,
)
from pdm_jax.checkpointing.diagnose import corrupt_checkpoint_error, try_read
from pdm_jax.checkpointing.errors import (
    LOAD_FIX,
    RESET_DATA_POSITION,
    RESUME_FIX,
    CheckpointNotFoundError,
    ConfigMismatchError,
    CorruptCheckpointError,
)
from pdm_jax.checkpointing.store import (
    CONFIG,
    DATA,
    STATE,
    check_data_topology,
    checkpoint_dir,
    create_manager,
    load_params,
    locate,
    read_state_on_host,
    restore_state,
    save,
)

__all__ = [
    "CONFIG",
    "DATA",
    "LOAD_FIX",
    "RESET_DATA_POSITION",
    "RESUME_FIX",
    "STATE",
    "CheckpointNotFoundError",
    "ConfigMismatchError",
    "CorruptCheckpointError",
    "check_data_topology",
    "checkpoint_dir",
    "corrupt_checkpoint_error",
    "create_manager",
    "load_params",
    "locate",
    "mismatch_error",
    "param_mismatches",
    "read_state_on_host",
    "reshape_split_leaves",
    "restore_state",
    "save",
    "split_dim_leaves",
    "try_read",
    "with_frozen_params",
]
