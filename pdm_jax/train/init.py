"""Training's side of the checkpoints: the train state's layout and where a run starts.

Where training starts (``restore_or_initialize``), first match wins:

1. ``ckpt.resume_from`` names a step directory of ``<workdir>/checkpoints`` itself and the
   latest step there cannot be read → resume that step; the later steps are moved to
   ``<workdir>/checkpoints_superseded/`` (``resume_own_step``);
2. ``<workdir>/checkpoints`` has a checkpoint → resume the latest (state and data order);
3. ``ckpt.resume_from`` (a workdir, a checkpoints directory or one step directory) →
   resume it the same way;
4. ``ckpt.init_from`` → parameters only (EMA ones by default), e.g. a U-ViT checkpoint
   merged into the two-stream image stream; fresh optimizer, step 0;
5. from scratch (refused for a frozen two-stream image stream unless
   ``ckpt.allow_random_frozen_stream``: ``check_frozen_image_stream``).

A step whose files cannot be read stops the run with ``CorruptCheckpointError``, naming
the newest intact step and the ``ckpt.resume_from`` that resumes it (rule 1).

:class:`SignalGuard` turns SIGTERM/SIGINT into a stop at a step that every process shares,
so the loop saves that step first.
"""

import logging
import signal
import threading
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from pdm_jax import checkpointing, models, sharding, specs
from pdm_jax.models.handle import handle
from pdm_jax.models.image_stream import merge_image_stream
from pdm_jax.models.spec import INIT_FROM_IMAGE_STREAM, TWO_STREAM_NAMES
from pdm_jax.specs import RunSpec
from pdm_jax.train import state as state_lib

# Where rule 1 of the resume order moves the steps after the one it resumes.
SUPERSEDED = "checkpoints_superseded"


def abstract_train_state(
    config: RunSpec, mesh: Mesh
) -> tuple[state_lib.TrainState, state_lib.TrainState]:
    """The state's shapes with their shardings, and the sharding tree, without allocating."""
    abstract = jax.eval_shape(
        lambda r: state_lib.init_train_state(config, r), jax.random.key(config.seed)
    )
    shardings = state_lib.state_shardings(config, mesh, abstract)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    return target, shardings


def initial_params_fn(config: RunSpec, loaded: Any, where: str):
    """``(rng, loaded) -> params``: the loaded tree, or merged into a fresh two-stream one.

    Validates shapes eagerly, raising ``ConfigMismatchError`` listing the differences.
    """
    expected = handle(config.model).abstract_params
    lines = checkpointing.param_mismatches(loaded, expected)
    if not lines:
        return lambda rng, p: p
    fusion = [k for k in models.TOKEN_FUSION_PARAMS if k not in loaded]
    if config.model.token_fusion and fusion:
        # A one-stream checkpoint without the fusion layers: they start at zero, as a fresh
        # model's do, so the run starts from exactly the checkpoint's function.
        zeros = {
            k: jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), expected[k])
            for k in fusion
        }
        lines = checkpointing.param_mismatches({**loaded, **zeros}, expected)
        if not lines:
            logging.info("ckpt.init_from=%s has no %s: they start at zero.", where, fusion)
            return lambda rng, p: {**p, **zeros}
    if config.model.name in INIT_FROM_IMAGE_STREAM:
        try:
            merge_image_stream(expected, loaded)
        except ValueError as e:
            raise checkpointing.ConfigMismatchError(f"ckpt.init_from={where}: {e}") from e

        def merged(rng, p):
            init_rng, _ = jax.random.split(rng)
            return merge_image_stream(models.init_params(config.model, init_rng), p)

        return merged
    raise checkpointing.mismatch_error(where, lines, config.model.name)


def restore_or_initialize(
    config: RunSpec,
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
      data_iterator: restored in place when resuming (not with
        ``ckpt.reset_data_position``: the caller then moves it to the step itself).

    Returns:
      ``(state, shardings, origin)``; ``origin`` says where the state came from.
    """
    target, shardings = abstract_train_state(config, mesh)
    if config.ckpt.reset_data_position:
        data_iterator = None  # the trainer takes up the data order at the step (seek)
    own_step = resume_own_step(config, workdir, manager)
    if own_step is not None:
        state = checkpointing.restore_state(
            manager, own_step, target, config.model.name, data_iterator
        )
        where = checkpointing.checkpoint_dir(workdir) / str(own_step)
        return state, shardings, f"resumed {where} (ckpt.resume_from)"
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
            config.ckpt.init_from,
            config.ckpt.use_ema_for_init,
            fix="Rerun with --config.ckpt.init_from={path}",
        )
        loaded = checkpointing.reshape_split_leaves(
            loaded, handle(config.model).abstract_params, where
        )
        params_fn = initial_params_fn(config, loaded, where)

        def init(r, p):
            return state_lib.init_train_state(config, r, params_fn(r, p))

        # The loaded tree goes to the devices already split like the parameters it fills
        # (a U-ViT's entries like the two-stream image stream's), never whole on one.
        loaded = jax.device_put(
            loaded, sharding.mirror_shardings(loaded, target.params, shardings.params, mesh)
        )
        state = jax.jit(init, out_shardings=shardings)(rng, loaded)
        return state, shardings, f"parameters from {where} (ckpt.init_from)"
    check_frozen_image_stream(config, resuming=False)
    state, shardings = state_lib.create_train_state(config, rng, mesh)
    return state, shardings, "from scratch"


def resume_own_step(
    config: RunSpec, workdir: str | epath.Path, manager: ocp.CheckpointManager
) -> int | None:
    """Rule 1 of the resume order: an intact earlier step of the run's own checkpoints.

    When ``ckpt.resume_from`` is ``<workdir>/checkpoints/<step>`` and a later step exists,
    the latest step is read: if it cannot be (a damaged checkpoint), the steps after
    ``<step>`` are moved to ``<workdir>/checkpoints_superseded/`` (kept, not deleted;
    training would otherwise collide with them) and ``<step>`` is resumed. If it can be,
    the run has moved on since (a restart with the same flags): the latest wins, with a
    warning. To roll back over readable steps, move them away by hand.

    Args:
      config: the full config (``ckpt.resume_from``).
      workdir: the run's directory.
      manager: the run's manager (reloaded after moving steps).

    Returns:
      The step to resume, or None when rule 1 does not apply.

    Raises:
      CheckpointNotFoundError: the named step does not exist.
    """
    path = config.ckpt.resume_from
    own = checkpointing.checkpoint_dir(workdir)
    if not path or not epath.Path(path).name.isdigit():
        return None
    if not _same_directory(epath.Path(path).parent, own):
        return None
    step = int(epath.Path(path).name)
    steps = sorted(manager.all_steps())
    if step not in steps:
        raise checkpointing.CheckpointNotFoundError(
            f"ckpt.resume_from={path}: no checkpoint for step {step} in {own}; available "
            f"steps: {steps}."
        )
    later = [s for s in steps if s > step]
    if not later:
        return step
    _, error = checkpointing.try_read(
        lambda s: checkpointing.read_state_on_host(manager, s), later[-1]
    )
    if error is None:
        logging.warning(
            "ckpt.resume_from=%s names step %d of this run, but its latest step %d can be "
            "read: resuming step %d (the run has moved on since). To roll back over intact "
            "steps, move them out of %s first.",
            path,
            step,
            later[-1],
            later[-1],
            own,
        )
        return None
    moved = epath.Path(workdir) / SUPERSEDED
    if jax.process_index() == 0:
        moved.mkdir(parents=True, exist_ok=True)
        for s in later:
            target = moved / str(s)
            n = 1
            while target.exists():
                target, n = moved / f"{s}-{n}", n + 1
            (own / str(s)).rename(target)
            logging.warning("ckpt.resume_from=%s: moved step %d to %s.", path, s, target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("pdm_resume_own_step")
    manager.reload()
    return step


def _same_directory(a: epath.Path, b: epath.Path) -> bool:
    if a == b:
        return True
    try:
        return a.exists() and b.exists() and a.resolve() == b.resolve()
    except (OSError, NotImplementedError):
        return False


def check_frozen_image_stream(config: RunSpec, *, resuming: bool) -> None:
    """Refuses to train a frozen image stream that would stay at its random initialisation.

    Args:
      config: the full config (``model.name``, ``ckpt``).
      resuming: whether the run restores a saved train state.

    Raises:
      PreflightError: for ``two_stream`` with ``ckpt.freeze_image_stream`` starting from
        scratch (no ``ckpt.init_from``), unless ``ckpt.allow_random_frozen_stream``.
    """
    ck = config.ckpt
    frozen = config.model.name in TWO_STREAM_NAMES and ck.freeze_image_stream
    if not frozen or resuming or ck.init_from:
        return
    if ck.allow_random_frozen_stream:
        logging.warning(
            "Training a two-stream PDM whose frozen image stream is randomly initialised "
            "(ckpt.allow_random_frozen_stream=True): its images will stay noise."
        )
        return
    raise specs.PreflightError(
        "This two-stream PDM freezes its image stream (ckpt.freeze_image_stream=True) but "
        "starts from scratch: the frozen stream would stay random and the map stream would "
        "learn against noise. Initialise the image stream from a pretrained U-ViT with "
        "--config.ckpt.init_from=<U-ViT checkpoint> (a `uvit` training workdir, or the "
        "output of `python -m pdm_jax.convert uvit`; docs/weights.md). To train it from "
        "random weights on purpose (tests, benchmarks), pass "
        "--config.ckpt.allow_random_frozen_stream=True."
    )


class SignalGuard:
    """Within ``with``: a stop signal makes ``should_stop`` true at a step all processes share.

    The training loop asks ``should_stop(step)`` after every step; when it is true, it saves
    that step, then stops.

    * One process (no ``jax.distributed``): SIGTERM/SIGINT set a flag instead of stopping
      the process. A second signal while saving falls back to the previous handler (e.g.
      ``KeyboardInterrupt``). Outside the main thread it does nothing (signals can only be
      handled there).
    * Several processes: a per-process flag would send the processes that saw the signal
      into the collective save while the others enter the next step's all-reduce — a hang.
      JAX's preemption service (started by ``jax.distributed.initialize``) catches SIGTERM
      in any process, tells every process, and agrees on one step (the largest any of them
      has reached, plus one); ``should_stop`` is true on every process at that step
      (``CheckpointManager.reached_preemption``). SIGTERM is left to that service; SIGINT
      keeps Python's default (``KeyboardInterrupt``, no checkpoint).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, manager: ocp.CheckpointManager | None = None):
        """Args:
        manager: the run's checkpoint manager; in a multi-process run its
          ``reached_preemption`` is the shared stop decision.
        """
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._manager = manager
        self.synchronized = jax.process_count() > 1
        if self.synchronized and manager is None:
            raise ValueError("A multi-process SignalGuard needs the run's CheckpointManager.")

    @property
    def requested(self) -> bool:
        """Whether a stop signal arrived (this process; see ``should_stop``)."""
        return self.signum is not None

    def should_stop(self, step: int) -> bool:
        """Whether to save ``step`` and stop: the same answer on every process.

        Call it once per step, on every process, with increasing steps.
        """
        if not self.synchronized:
            return self.requested
        if self._manager.reached_preemption(step):
            self.signum = signal.SIGTERM
            logging.warning(
                "Preemption (SIGTERM to one of the %d processes): every process saves step "
                "%d, then stops.",
                jax.process_count(),
                step,
            )
            return True
        return False

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
        if self.synchronized:
            return self  # SIGTERM belongs to JAX's preemption service
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
