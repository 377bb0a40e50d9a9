"""Test helper: write checkpoints that ``main``, sample mode and evaluation read, untrained."""

from typing import Any

import jax
import ml_collections
import numpy as np

from pdm_jax import checkpointing
from pdm_jax.train import state as state_lib


def params_only_state(params: Any, ema_params: Any = None, step: int = 0) -> state_lib.TrainState:
    """A train state holding host parameters and no optimizer state: nothing to compile.

    Args:
      params: the parameter tree.
      ema_params: its EMA (default: ``params``).
      step: the state's step.

    Returns:
      The state.
    """
    return state_lib.TrainState(
        step=np.asarray(step, np.int32),
        params=params,
        ema_params=params if ema_params is None else ema_params,
        opt_state=np.zeros((), np.float32),
        rng=jax.random.key(0),
    )


def save_state(workdir: Any, state: state_lib.TrainState, config: ml_collections.ConfigDict):
    """Saves ``state`` with ``config`` as ``workdir``'s checkpoint, as the trainer does."""
    manager = checkpointing.create_manager(checkpointing.checkpoint_dir(workdir))
    checkpointing.save(manager, state, config=config.to_dict())
    manager.wait_until_finished()
