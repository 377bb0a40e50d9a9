"""The run modes of ``python -m pdm_jax.main``: each owns its start-up checks, its batch
and its run function.

* ``train`` (:class:`TrainMode`): trains, resuming from ``<workdir>`` when it holds
  checkpoints (``pdm_jax.train.trainer``); with ``demo.use_metrics``, then writes the
  demo's ``metrics.json`` (``pdm_jax.evaluation.demo``).
* ``sample`` (:class:`SampleMode`): samples prompts from a checkpoint
  (``pdm_jax.sampling.mode``).
* ``evaluate`` (:class:`EvaluateMode`): samples validation prompts and scores them
  (``pdm_jax.evaluation.run``).

``mode.check(config, workdir)`` runs the checks every mode shares (``pdm_jax.preflight``),
then the mode's own:

* ``train``: the batch splits over the mesh's ``data`` × ``fsdp`` axes; with
  ``demo.use_metrics``, the demo's figures can be computed (synthetic data, a PDM, a known
  ``demo.given_map_task``); a frozen image stream (``two_stream``) has pretrained weights
  to start from (``pdm_jax.train.init.check_frozen_image_stream``); the learning-rate
  schedule's options; on COCO, ``data.dir``, and with sample grids
  (``train.eval_every_steps > 0``) the VAE that decodes them: unset turns the grids off
  with a warning, set but unreadable is refused. The grids sample the dataset's eval
  captions, whose contexts the prepared data holds, so they need no CLIP.
* ``sample``: ``sampler.task`` is known, has a map stream to work on when it needs one,
  and its ``sample.*`` inputs are given (``map``, ``image``, ``mask``); on COCO, the VAE,
  and the CLIP text encoder for raw prompts (``sample.prompt``/``sample.prompts_file``, or
  any prompt without ``data.dir``).
* ``evaluate``: ``eval.task`` is known (and a PDM's for the map tasks), ``eval.sweep``
  parses, ``eval.mask_fraction`` lies in (0, 1) for inpainting, ``eval.fid_stats`` (read),
  ``eval.inception`` and ``eval.clip`` exist when set; on COCO, ``data.dir`` and the VAE
  (not for ``given_image``, which decodes no image).
"""

import dataclasses
import logging
from typing import Any

import numpy as np
from etils import epath

from pdm_jax import checkpointing, preflight, sharding, specs
from pdm_jax.evaluation import demo, fid
from pdm_jax.evaluation import run as evaluation
from pdm_jax.sampling import inputs as sample_inputs
from pdm_jax.sampling import mode as sample_mode
from pdm_jax.specs import PreflightError, RunSpec
from pdm_jax.train import init as init_lib
from pdm_jax.train import state as state_lib
from pdm_jax.train import trainer


class RunMode:
    """One ``--mode`` of the command: its name, batch, start-up checks and run function."""

    name: str = ""
    # Whether the mode's mesh spans every process's devices (else: this process's).
    spans_processes: bool = False

    def batch_size(self, config: Any) -> int:
        """The global batch the mode shards over the data axis (``config``: a
        ``ConfigDict`` or ``RunSpec``); the CPU is split into devices by it."""
        raise NotImplementedError

    def check(self, config: Any, workdir: str) -> RunSpec:
        """Every start-up check of the mode: the shared ones, then its own.

        Args:
          config: the run's ``RunSpec`` (or its ``ConfigDict``), paths already resolved.
          workdir: the run's directory.

        Returns:
          The spec to run with (training may turn its sample grids off).

        Raises:
          PreflightError: naming the flag that fixes the problem.
        """
        run = specs.as_run_spec(config)
        preflight.preflight(
            run, spans_processes=self.spans_processes, check_solver=self.uses_solver(run)
        )
        return self.check_own(run, workdir)

    def uses_solver(self, run: RunSpec) -> bool:
        """Whether the mode samples with the solver settings of ``run.sampler``."""
        return True

    def check_own(self, run: RunSpec, workdir: str) -> RunSpec:
        """The mode's own start-up checks (after the shared ones)."""
        return run

    def run(self, run: RunSpec, workdir: str) -> Any:
        """Runs the mode with a checked spec."""
        raise NotImplementedError


class TrainMode(RunMode):
    """``--mode=train``: training, then the demo's figures when ``demo.use_metrics``."""

    name = "train"
    spans_processes = True

    def batch_size(self, config: Any) -> int:
        return int(config.train.batch_size)

    def check_own(self, run: RunSpec, workdir: str) -> RunSpec:
        sh = run.sharding
        mesh = sharding.create_mesh(sh.mesh_shape, sh.mesh_axes)  # fits: checked before
        shards = sharding.batch_shards(mesh)
        if run.train.batch_size % shards:
            raise PreflightError(
                f"train.batch_size={run.train.batch_size} does not split over the mesh's "
                f"data × fsdp = {shards} batch shards ({dict(mesh.shape)}): set "
                "--config.train.batch_size to a multiple, or change --config.sharding.mesh_shape."
            )
        if run.demo.use_metrics:
            with preflight.refused():
                demo.check_config(run)
        init_lib.check_frozen_image_stream(run, resuming=_will_resume(run, workdir))
        with preflight.refused():  # the schedule's options, before any data or model is built
            state_lib.learning_rate_schedule(run)
        preflight.require_data_dir(run, self.name)
        if run.data.source == "coco" and run.train.eval_every_steps > 0:
            return _check_grid_vae(run)
        return run

    def run(self, run: RunSpec, workdir: str) -> None:
        trainer.train_and_evaluate(run, workdir)
        if run.demo.use_metrics:
            demo.evaluate(run, workdir)


class SampleMode(RunMode):
    """``--mode=sample``: samples prompts from a checkpoint (``pdm_jax.sampling.mode``)."""

    name = "sample"

    def batch_size(self, config: Any) -> int:
        return int(config.sample.batch_size)

    def check_own(self, run: RunSpec, workdir: str) -> RunSpec:
        with preflight.refused():
            sample_inputs.check_task(run.sampler.task, run.model, run.sample)
        if run.data.source == "coco":
            preflight.check_vae(run, "Sample mode decodes the sampled latents with it")
            s = run.sample
            if s.prompt or s.prompts_file or not run.data.dir:
                why = "raw prompts" if s.prompt or s.prompts_file else "sampling without data.dir"
                preflight.check_text_encoder(
                    run, f"{why} (the CLIP contexts the model is conditioned on)"
                )
        return run

    def run(self, run: RunSpec, workdir: str) -> epath.Path:
        return sample_mode.run(run, workdir)


class EvaluateMode(RunMode):
    """``--mode=evaluate``: samples validation prompts and scores them."""

    name = "evaluate"

    def batch_size(self, config: Any) -> int:
        return int(config.eval.batch_size)

    def uses_solver(self, run: RunSpec) -> bool:
        return not run.eval.sweep  # each cell of a sweep replaces the solver settings

    def check_own(self, run: RunSpec, workdir: str) -> RunSpec:
        preflight.require_data_dir(run, self.name)
        _check_eval_files(run)
        if run.data.source == "coco" and run.eval.task != "given_image":
            preflight.check_vae(run, "Evaluation decodes every sample with it before scoring")
        return run

    def run(self, run: RunSpec, workdir: str) -> dict:
        return evaluation.run_evaluate(run, workdir)


MODES: dict[str, RunMode] = {m.name: m for m in (TrainMode(), SampleMode(), EvaluateMode())}


def get(name: str) -> RunMode:
    """The run mode called ``name``.

    Raises:
      ValueError: for a name that is not one of ``MODES``.
    """
    if name not in MODES:
        raise ValueError(f"Unknown mode {name!r}; choose one of {', '.join(MODES)}.")
    return MODES[name]


def _will_resume(config: RunSpec, workdir: str) -> bool:
    """Whether training will restore a state (own checkpoints or ``ckpt.resume_from``)."""
    if config.ckpt.resume_from:
        return True
    directory = checkpointing.checkpoint_dir(workdir)
    if not directory.is_dir():
        return False
    return bool(checkpointing.create_manager(directory, read_only=True).all_steps())


def _check_grid_vae(config: RunSpec) -> RunSpec:
    """The VAE of a COCO run's sample grids; unset: the grids are turned off (a warning)."""
    if not config.data.vae:
        logging.warning(
            "Sample grids are off: decoding COCO latents to images needs the VAE, and "
            "data.vae is unset. Pass --vae=PATH (or --config.data.vae=PATH; %s) to write "
            "<workdir>/samples/step_<N>.png every train.eval_every_steps (%d).",
            preflight.VAE_FORMS,
            config.train.eval_every_steps,
        )
        return config.replace(train=dataclasses.replace(config.train, eval_every_steps=0))
    preflight.check_vae(
        config, "The sample grids written every train.eval_every_steps decode with it"
    )
    return config


def _check_eval_files(config: RunSpec) -> None:
    """``eval.*`` settings valid, their files present, the reference statistics readable."""
    try:
        ev = evaluation.eval_settings(config)
    except (ValueError, FileNotFoundError) as e:
        raise PreflightError(f"{e} (checked before sampling starts)") from e
    if ev.fid_stats:
        try:
            with epath.Path(ev.fid_stats).open("rb") as f:
                mu, sigma = fid.load_stats(f)
        except Exception as e:
            raise PreflightError(
                f"eval.fid_stats={ev.fid_stats} cannot be read ({type(e).__name__}: {e}); "
                "write it with python -m pdm_jax.evaluation.reference_stats and pass "
                "--config.eval.fid_stats=PATH."
            ) from e
        if np.ndim(mu) != 1 or np.shape(sigma) != (len(mu), len(mu)):
            raise PreflightError(
                f"eval.fid_stats={ev.fid_stats} holds mu {np.shape(mu)} and sigma "
                f"{np.shape(sigma)}; FID statistics are mu [D] and sigma [D, D]."
            )
        if not ev.inception:
            logging.warning(
                "eval.fid_stats is set but eval.inception is not: FID is skipped. Pass "
                "--config.eval.inception=<pt_inception-2015-12-05-6726825d.pth> to score it."
            )
