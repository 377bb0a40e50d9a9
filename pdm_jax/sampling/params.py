"""The one parameter loader of sampling and evaluation: a checkpoint's params, checked."""

from typing import Any

from pdm_jax import checkpointing
from pdm_jax.models.handle import handle
from pdm_jax.models.spec import ModelSpec


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
    expected = handle(model).abstract_params
    params = checkpointing.reshape_split_leaves(params, expected, where)
    lines = checkpointing.param_mismatches(params, expected)
    if lines:
        raise checkpointing.mismatch_error(where, lines, model.name)
    return params, step
