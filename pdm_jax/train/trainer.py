"""The training loop: data → jitted step → metrics, sample grids and checkpoints.

``train_and_evaluate(config, workdir)`` wires the pieces together:

* the ``sharding.mesh_shape`` mesh (data × fsdp × tensor), the state born sharded on it by
  the logical-axis rules (or restored, in the order of ``pdm_jax.train.init``);
* the grain loader of ``pdm_jax.data.pipeline``; each host batch becomes a global array;
* ``jit_train_step`` (state donated, compiled once);
* every ``log_every_steps``: mean image/map/total loss, grad norm, learning rate and
  examples/s through clu writers (TensorBoard + console; only process 0 writes files),
  with ``ReportProgress`` adding steps/s and an ETA;
* every ``eval_every_steps``: ``<workdir>/samples/step_<N>.png`` (caption | image | map)
  sampled with the EMA parameters;
* every ``checkpoint_every_steps``, at the end and on SIGTERM/SIGINT: a checkpoint, saved
  before that step's grid (a stop signal skips the grid). With several processes, a
  SIGTERM to any of them stops all at one shared step (``init.SignalGuard``).

The host checks the losses and norms of every step before a checkpoint is written; a NaN
or Inf stops training with ``NonFiniteLossError`` naming the step, so the last checkpoint
on disk is always a finite one.
"""

import logging
import time
from typing import Any

import jax
import numpy as np
from clu import metric_writers, periodic_actions
from etils import epath

from pdm_jax import checkpointing, sharding, specs, visualize
from pdm_jax.data import pipeline
from pdm_jax.data.schema import DatasetInfo
from pdm_jax.sampling.sampler import Sampler
from pdm_jax.train import init as init_lib
from pdm_jax.train import step as step_lib
from pdm_jax.train.state import TrainState

# Metrics whose non-finite value means the state is no longer trustworthy.
_FINITE_KEYS = ("loss", "grad_norm", "param_norm")


class NonFiniteLossError(FloatingPointError):
    """A loss (or gradient/parameter norm) became NaN or Inf; the message names the step."""


class TrainingInterrupted(Exception):
    """Training stopped on SIGTERM/SIGINT after saving a checkpoint."""

    def __init__(self, signum: int, step: int, directory: str):
        self.signum, self.step = signum, step
        super().__init__(f"Stopped by signal {signum} at step {step}; checkpoint in {directory}.")


class _MetricBuffer:
    """Per-step device metrics, fetched and checked only when the host needs them.

    ``add`` also bounds how far the host runs ahead of the device: it waits for the step
    ``max_in_flight`` steps back, so a stop signal is served within a few steps and the
    steps/s that ``ReportProgress`` measures are those of the device.
    """

    def __init__(self, max_in_flight: int = 2):
        self._pending: list[tuple[int, dict[str, jax.Array]]] = []
        self._max_in_flight = max_in_flight

    def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
        self._pending.append((step, metrics))
        if len(self._pending) > self._max_in_flight:
            jax.block_until_ready(self._pending[-1 - self._max_in_flight][1]["loss"])

    def drain(self) -> dict[str, float]:
        """Fetches the pending steps, raises on non-finite values, returns the means."""
        if not self._pending:
            return {}
        steps = [s for s, _ in self._pending]
        host = jax.device_get([m for _, m in self._pending])
        self._pending.clear()
        for step, m in zip(steps, host, strict=True):
            bad = {k: float(m[k]) for k in _FINITE_KEYS if k in m and not np.isfinite(m[k])}
            if bad:
                raise NonFiniteLossError(
                    f"Non-finite training metrics at step {step}: {bad}. Training stopped; "
                    "no checkpoint was written after the last finite step."
                )
        summary = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        summary["learning_rate"] = float(host[-1]["learning_rate"])
        return summary


def _write_sample_grid(
    sampler: Sampler,
    state: TrainState,
    info: DatasetInfo,
    path: epath.Path,
) -> None:
    prompts = list(info.eval_prompts)
    sampler.set_params(checkpointing.with_frozen_params(state.ema_params, state.params))
    samples = sampler(list(range(len(prompts))), captions=prompts, task="cogenerate")
    if jax.process_index() == 0:  # every process samples (the params span them all)
        grid = visualize.sample_grid(
            prompts, samples.images, samples.maps, info.category_names, info.colour_table
        )
        visualize.save_png(path, grid)


def train_and_evaluate(config: Any, workdir: str) -> TrainState:
    """Trains ``config`` in ``workdir`` until ``train.num_train_steps``.

    Args:
      config: the run's ``RunSpec`` (or the ``ConfigDict`` it is made from).
      workdir: run directory (checkpoints, TensorBoard events, sample grids).

    Returns:
      The final train state.

    Raises:
      NonFiniteLossError: on a NaN/Inf loss (naming the step).
      TrainingInterrupted: after saving, when SIGTERM/SIGINT arrived.
    """
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config = specs.as_run_spec(config)
    t = config.train
    mesh = sharding.create_mesh(config.sharding.mesh_shape, config.sharding.mesh_axes)
    source, info = pipeline.create_source(config.data, "train")
    data_iter = iter(pipeline.create_loader(source, config.data, batch_size=t.batch_size))
    manager = checkpointing.create_manager(
        checkpointing.checkpoint_dir(workdir),
        max_to_keep=config.ckpt.max_to_keep,
        async_save=config.ckpt.async_save,
    )
    state, shardings, origin = init_lib.restore_or_initialize(
        config, workdir, mesh, manager, data_iter
    )
    start = int(jax.device_get(state.step))
    if config.ckpt.reset_data_position:
        pipeline.seek(data_iter, start, pipeline.per_process_batch_size(t.batch_size))
        logging.info("Data order taken up at step %d (ckpt.reset_data_position).", start)
    logging.info("Train state: %s; step %d of %d.", origin, start, t.num_train_steps)
    step_fn = step_lib.jit_train_step(config, mesh, shardings, state.params, info.empty_context)

    writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0, asynchronous=True
    )
    if start == 0:
        writer.write_hparams(_flat_hparams(config))
    report = periodic_actions.ReportProgress(
        num_train_steps=t.num_train_steps,
        writer=writer,
        every_steps=t.log_every_steps,
        every_secs=None,
    )
    sampler = None
    if t.eval_every_steps > 0 and info.eval_prompts:
        sampler = Sampler.for_run(
            config,
            info,
            checkpointing.with_frozen_params(state.ema_params, state.params),
            batch_size=len(info.eval_prompts),
            mesh=mesh,
        )
    buffer = _MetricBuffer()
    config_json = config.to_dict()
    ckpt_dir = str(checkpointing.checkpoint_dir(workdir))
    tick, tick_step = time.perf_counter(), start

    def save(s: TrainState) -> None:
        buffer.drain()  # raises before a non-finite state reaches the disk
        checkpointing.save(manager, s, data_iterator=data_iter, config=config_json)

    try:
        with init_lib.SignalGuard(manager) as guard:
            for step in range(start + 1, t.num_train_steps + 1):
                with jax.profiler.StepTraceAnnotation("train", step_num=step):
                    batch = sharding.shard_batch(next(data_iter), mesh)
                    state, metrics = step_fn(state, batch)
                buffer.add(step, metrics)
                report(step)
                last = step == t.num_train_steps
                if step % t.log_every_steps == 0 or last:
                    summary = buffer.drain()
                    now = time.perf_counter()
                    summary["examples_per_sec"] = (
                        (step - tick_step) * t.batch_size / max(now - tick, 1e-9)
                    )
                    tick, tick_step = now, step
                    writer.write_scalars(step, summary)
                stop = guard.should_stop(step)  # the same step on every process
                # The step's checkpoint comes first: a failing grid loses no training.
                if step % t.checkpoint_every_steps == 0 or last or stop:
                    save(state)
                if stop:
                    manager.wait_until_finished()
                    raise TrainingInterrupted(guard.signum, step, ckpt_dir)
                if sampler is not None and (step % t.eval_every_steps == 0 or last):
                    buffer.drain()
                    paused = time.perf_counter()
                    with report.timed("sample_grid"):
                        _write_sample_grid(
                            sampler, state, info, workdir / "samples" / f"step_{step:07d}.png"
                        )
                    tick += time.perf_counter() - paused  # examples/s counts training only
            if manager.latest_step() != int(jax.device_get(state.step)):
                save(state)
    except NonFiniteLossError as e:
        manager.wait_until_finished()
        raise NonFiniteLossError(
            f"{e} Last good checkpoint: step {manager.latest_step()} in {ckpt_dir}."
        ) from None
    finally:
        manager.wait_until_finished()
        writer.close()
    return state


def _flat_hparams(config: specs.RunSpec) -> dict[str, Any]:
    """Config as ``{"a.b": scalar}`` for TensorBoard's hparams plugin."""
    out = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, bool | int | float | str):
            out[prefix] = value
        else:
            out[prefix] = str(value)

    walk("", config.to_dict())
    return out
