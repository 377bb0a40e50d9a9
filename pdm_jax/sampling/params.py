"""The one parameter loader of sampling and evaluation: a checkpoint's params, checked."""

import functools
from typing import Any

from jax.sharding import Mesh

from pdm_jax import checkpointing, models, sharding
from pdm_jax.models.spec import ModelSpec


@functools.lru_cache(maxsize=16)
def param_shardings(model: ModelSpec, mesh: Mesh) -> Any:
    """Where each parameter of ``model`` lives on ``mesh``: its logical axes under the rules.

    Cached per (model, mesh): the sampler places its parameters with it at every swap.

    Args:
      model: the model spec (its partitioning annotations name each dimension).
      mesh: the device mesh.

    Returns:
      Tree like the parameters with ``NamedSharding`` leaves (``sharding.named_shardings``:
      dimensions their mesh axes do not divide are replicated).
    """
    return sharding.named_shardings(
        models.param_logical_axes(model), models.abstract_params(model), mesh
    )


def load_params(
    workdir: str, step: int, use_ema: bool, model: ModelSpec, *, step_flag: str
) -> tuple[Any, int]:
    """Host parameters of ``<workdir>/checkpoints`` at ``step`` (-1: the latest), checked.

    Args:
      workdir: a training run's directory (or its checkpoints or step directory).
      step: the checkpoint step; -1 takes the latest.
      use_ema: take the EMA parameters when the checkpoint has them.
      model: the spec the parameters must fit.
      step_flag: the flag that picks another step (``--config.sample.step``), named when
        the step cannot be read.

    Returns:
      ``(params, step)``.

    Raises:
      CheckpointNotFoundError: naming the directory looked in.
      ConfigMismatchError: listing mismatched parameter paths and shapes.
      CorruptCheckpointError: the step cannot be read (names an intact step and the flag).
    """
    root, step = checkpointing.locate(
        checkpointing.checkpoint_dir(workdir), None if step < 0 else step
    )
    params, where = checkpointing.load_params(
        root / str(step), use_ema=use_ema, fix=f"Rerun with {step_flag}={{step}}"
    )
    expected = models.abstract_params(model)
    params = checkpointing.reshape_split_leaves(params, expected, where)
    lines = checkpointing.param_mismatches(params, expected)
    if lines:
        raise checkpointing.mismatch_error(where, lines, model.name)
    return params, step
