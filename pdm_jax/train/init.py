"""Training's side of the checkpoints: the train state's layout and where a run starts.

Where training starts (``restore_or_initialize``), first match wins:

1. ``<workdir>/checkpoints`` has a checkpoint → resume it (state and data order);
2. ``ckpt.resume_from`` (a workdir, a checkpoints directory or one step directory) →
   resume it the same way;
3. ``ckpt.init_from`` → parameters only (EMA ones by default), e.g. a U-ViT checkpoint
   merged into the two-stream image stream; fresh optimizer, step 0;
4. from scratch (refused for a frozen two-stream image stream unless
   ``ckpt.allow_random_frozen_stream``: ``preflight.check_frozen_image_stream``).

:class:`SignalGuard` turns SIGTERM/SIGINT into a flag the loop polls so it can save first.
"""

import logging
import signal
import threading
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh

from pdm_jax import checkpointing, models
from pdm_jax.train import preflight
from pdm_jax.train import state as state_lib


def abstract_train_state(
    config: ml_collections.ConfigDict, mesh: Mesh
) -> tuple[state_lib.TrainState, state_lib.TrainState]:
    """The state's shapes with their shardings, and the sharding tree, without allocating."""
    abstract = jax.eval_shape(
        lambda r: state_lib.init_train_state(config, r), jax.random.key(config.seed)
    )
    shardings = state_lib.state_shardings(mesh, abstract)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    return target, shardings


def initial_params_fn(config: ml_collections.ConfigDict, loaded: Any, where: str):
    """``(rng, loaded) -> params``: the loaded tree, or merged into a fresh two-stream one.

    Validates shapes eagerly, raising ``ConfigMismatchError`` listing the differences.
    """
    expected = models.abstract_params(config.model)
    lines = checkpointing.param_mismatches(loaded, expected)
    if not lines:
        return lambda rng, p: p
    if config.model.name == "two_stream":
        try:
            models.merge_image_stream(expected, loaded)
        except ValueError as e:
            raise checkpointing.ConfigMismatchError(f"ckpt.init_from={where}: {e}") from e

        def merged(rng, p):
            init_rng, _ = jax.random.split(rng)
            return models.merge_image_stream(models.init_params(config.model, init_rng), p)

        return merged
    raise checkpointing.mismatch_error(where, lines, config.model.name)


def restore_or_initialize(
    config: ml_collections.ConfigDict,
    workdir: str | epath.Path,
    mesh: Mesh,
    manager: ocp.CheckpointManager,
    data_iterator: Any | None = None,
) -> tuple[state_lib.TrainState, state_lib.TrainState, str]:
    """The train state, following the resume order of the module docstring.

    Args:
      config: the full config.
      workdir: the run's directory (its own checkpoints come first).
      mesh: the device mesh.
      manager: the run's manager (over ``checkpointing.checkpoint_dir(workdir)``).
      data_iterator: restored in place when resuming.

    Returns:
      ``(state, shardings, origin)``; ``origin`` says where the state came from.
    """
    target, shardings = abstract_train_state(config, mesh)
    if manager.latest_step() is not None:
        step = manager.latest_step()
        state = checkpointing.restore_state(manager, step, target, config.model.name, data_iterator)
        return state, shardings, f"resumed {checkpointing.checkpoint_dir(workdir) / str(step)}"
    if config.ckpt.resume_from:
        root, step = checkpointing.locate(config.ckpt.resume_from)
        other = checkpointing.create_manager(root, read_only=True)
        state = checkpointing.restore_state(other, step, target, config.model.name, data_iterator)
        return state, shardings, f"resumed {root / str(step)} (ckpt.resume_from)"
    rng = jax.random.key(config.seed)
    if config.ckpt.init_from:
        loaded, where = checkpointing.load_params(
            config.ckpt.init_from, config.ckpt.use_ema_for_init
        )
        params_fn = initial_params_fn(config, loaded, where)

        def init(r, p):
            return state_lib.init_train_state(config, r, params_fn(r, p))

        state = jax.jit(init, out_shardings=shardings)(rng, loaded)
        return state, shardings, f"parameters from {where} (ckpt.init_from)"
    preflight.check_frozen_image_stream(config, resuming=False)
    state, shardings = state_lib.create_train_state(config, rng, mesh)
    return state, shardings, "from scratch"


class SignalGuard:
    """Within ``with``: SIGTERM/SIGINT set ``signum`` instead of stopping the process.

    The training loop polls ``requested`` after each step, saves, then stops. A second
    signal while saving falls back to the previous handler (e.g. ``KeyboardInterrupt``).
    Outside the main thread it does nothing (signals can only be handled there).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop signal arrived."""
        return self.signum is not None

    def _handle(self, signum, frame):
        del frame
        if self.signum is not None:
            self.__exit__()
            signal.raise_signal(signum)
            return
        self.signum = signum
        logging.warning(
            "Received %s: saving a checkpoint, then stopping.", signal.strsignal(signum)
        )

    def __enter__(self) -> "SignalGuard":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
