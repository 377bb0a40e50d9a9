"""Start-up checks: what a later phase of a run needs is checked before the run starts.

A COCO run reads the VAE for the first time at its first sample grid (hours in) and an
evaluation at the end of its first sampled batch; a two-stream run from scratch trains a
map stream against a random frozen image stream without a word. ``preflight(config, mode,
workdir)``, called by ``python -m pdm_jax.main`` before the mode runs, checks:

* ``train``: a frozen image stream (``two_stream``) has pretrained weights to start from
  (``pdm_jax.train.init.check_frozen_image_stream``); on COCO with sample grids
  (``train.eval_every_steps > 0``), the VAE that decodes them: unset turns the grids off
  with a warning, set but unreadable is refused. The grids sample the dataset's eval
  captions, whose contexts the prepared data holds, so they need no CLIP.
* ``sample`` on COCO: the VAE, and the CLIP text encoder for raw prompts
  (``sample.prompt``/``sample.prompts_file``, or any prompt without ``data.dir``).
* ``evaluate``: ``eval.task`` is known (and a PDM's for the map tasks), ``eval.sweep`` parses
  (``method[/order]:NFE,...``, known methods, possible orders), ``eval.mask_fraction`` lies in
  (0, 1) for inpainting, ``eval.fid_stats`` (read), ``eval.inception`` and ``eval.clip`` exist
  when set; on COCO, the VAE (not for ``given_image``, which decodes no image).
* ``train`` and ``evaluate`` on COCO: ``data.dir`` is set.
* every mode: ``data.source``, ``diffusion.image_prediction`` and ``diffusion.map_pooling``
  are known; the solver settings of ``config.sampler`` (method, order, skip type, steps ≥
  order; not for an ``evaluate`` with ``eval.sweep``, whose cells replace them) and
  ``sampler.clip_x0`` ≥ 0, which training would otherwise first meet at its first sample
  grid or after its last step.
* ``train`` with ``demo.use_metrics``: the demo's figures can be computed (synthetic data, a
  PDM, a known ``demo.given_map_task``).
* ``sample``: ``sampler.task`` is known, has a map stream to work on when it needs one, and
  its ``sample.*`` inputs are given (``map``, ``image``, ``mask``).
* every mode: ``sharding.mesh_shape`` / ``mesh_axes`` make a mesh of the devices (all of
  them for ``train``, this process's for ``sample`` and ``evaluate``), and for ``train``
  the batch splits over its ``data`` × ``fsdp`` axes.

Every refusal is a :class:`PreflightError` naming the flag that fixes it.
"""

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
from etils import epath

from pdm_jax import checkpointing, models, sharding, specs
from pdm_jax.data import pipeline
from pdm_jax.data.coco import dataset as coco_dataset
from pdm_jax.diffusion import dpm_solver, losses
from pdm_jax.diffusion import maps as map_lib
from pdm_jax.diffusion.reverse import TASKS
from pdm_jax.evaluation import demo as demo_metrics
from pdm_jax.evaluation import fid
from pdm_jax.evaluation import run as evaluate
from pdm_jax.sampling import inputs as sample_inputs
from pdm_jax.specs import PreflightError
from pdm_jax.train import init as init_lib
from pdm_jax.train import state as state_lib

__all__ = ["PreflightError", "preflight"]


_VAE_FORMS = (
    "autoencoder_kl.pth, a diffusers vae/ directory or a `python -m pdm_jax.convert vae` output"
)
_CLIP_FORMS = (
    "a local clip-vit-large-patch14 directory or a `python -m pdm_jax.convert clip_text` output"
)


def preflight(config: Any, mode: str, workdir: str) -> specs.RunSpec:
    """Checks what ``mode`` will need; may turn the training grids off (with a warning).

    Args:
      config: the run's ``RunSpec`` (or its ``ConfigDict``), paths already resolved.
      mode: ``train``, ``sample`` or ``evaluate``.
      workdir: the run's directory.

    Returns:
      The spec to run with: ``train.eval_every_steps`` is 0 when a COCO run has no VAE
      for its grids.

    Raises:
      PreflightError: naming the flag that fixes the problem.
    """
    config = specs.as_run_spec(config)
    coco = config.data.source == "coco"
    with _refused():
        models.check_token_fusion(config.model)
    _check_mesh(config, mode)
    with _refused():  # the data, the loss and the sampler check these only when they run
        pipeline.check_source(config.data.source)
        losses.check_image_prediction(config.diffusion.image_prediction)
        map_lib.check_pooling(config.diffusion.map_pooling)
    _check_sampler(config, mode)
    if mode == "train":
        init_lib.check_frozen_image_stream(config, resuming=_will_resume(config, workdir))
        with _refused():  # the schedule's options, before any data or model is built
            state_lib.learning_rate_schedule(config)
    if coco and mode in ("train", "evaluate") and not config.data.dir:
        raise PreflightError(
            f"--mode={mode} on COCO reads the prepared data, and data.dir is unset: pass "
            "--config.data.dir=<the --output_dir of python -m pdm_jax.data.coco.prepare>."
        )
    if mode == "train" and coco and config.train.eval_every_steps > 0:
        config = _check_grid_vae(config)
    elif mode == "sample" and coco:
        _check_vae(config, "Sample mode decodes the sampled latents with it")
        s = config.sample
        if s.prompt or s.prompts_file or not config.data.dir:
            why = "raw prompts" if s.prompt or s.prompts_file else "sampling without data.dir"
            _check_text_encoder(config, f"{why} (the CLIP contexts the model is conditioned on)")
    elif mode == "evaluate":
        _check_eval_files(config)
        if coco and config.eval.task != "given_image":
            _check_vae(config, "Evaluation decodes every sample with it before scoring")
    return config


@contextlib.contextmanager
def _refused() -> Iterator[None]:
    """A building block's ``ValueError`` (its message names the fix) as a ``PreflightError``."""
    try:
        yield
    except ValueError as e:
        raise PreflightError(str(e)) from e


def _check_mesh(config: specs.RunSpec, mode: str) -> None:
    """The configured mesh fits the devices, and the train batch splits over it."""
    sh = config.sharding
    with _refused():
        if mode == "train":
            mesh = sharding.create_mesh(sh.mesh_shape, sh.mesh_axes)
        else:
            mesh = sharding.local_mesh(sh.mesh_shape, sh.mesh_axes)
    shards = sharding.batch_shards(mesh)
    if mode == "train" and config.train.batch_size % shards:
        raise PreflightError(
            f"train.batch_size={config.train.batch_size} does not split over the mesh's "
            f"data × fsdp = {shards} batch shards ({dict(mesh.shape)}): set "
            "--config.train.batch_size to a multiple, or change --config.sharding.mesh_shape."
        )


def _check_sampler(config: specs.RunSpec, mode: str) -> None:
    """``config.sampler`` as the run will use it: training's grids and the demo's figures,
    sample mode (its task and that task's inputs) and evaluation (unless ``eval.sweep``
    replaces the solver settings; the sweep is checked with the other ``eval.*``)."""
    s = config.sampler
    if not (mode == "evaluate" and config.eval.sweep):
        with _refused():
            dpm_solver.check_settings(s.method, s.order, s.skip_type, s.steps)
    if s.clip_x0 < 0:
        raise PreflightError(
            f"sampler.clip_x0={s.clip_x0} is negative: pass 0 (no clipping) or the bound "
            "that x̂₀ is clipped to, e.g. --config.sampler.clip_x0=2."
        )
    if mode == "train" and config.demo.use_metrics:
        with _refused():
            demo_metrics.check_config(config)
    if mode != "sample":
        return
    if s.task not in TASKS:
        raise PreflightError(
            f"sampler.task={s.task!r} is not a sampling task: pass --config.sampler.task= "
            f"one of {TASKS}."
        )
    if s.task != "cogenerate" and not config.model.has_map:
        raise PreflightError(
            f"sampler.task={s.task!r} needs a map stream, and model.name={config.model.name!r} "
            "has none: sample it with --config.sampler.task=cogenerate."
        )
    with _refused():
        sample_inputs.check_task_inputs(config.sample, s.task)


def _will_resume(config: specs.RunSpec, workdir: str) -> bool:
    """Whether training will restore a state (own checkpoints or ``ckpt.resume_from``)."""
    if config.ckpt.resume_from:
        return True
    directory = checkpointing.checkpoint_dir(workdir)
    if not directory.is_dir():
        return False
    return bool(checkpointing.create_manager(directory, read_only=True).all_steps())


def _check_grid_vae(config: specs.RunSpec) -> specs.RunSpec:
    if not config.data.vae:
        logging.warning(
            "Sample grids are off: decoding COCO latents to images needs the VAE, and "
            "data.vae is unset. Pass --vae=PATH (or --config.data.vae=PATH; %s) to write "
            "<workdir>/samples/step_<N>.png every train.eval_every_steps (%d).",
            _VAE_FORMS,
            config.train.eval_every_steps,
        )
        return config.replace(train=dataclasses.replace(config.train, eval_every_steps=0))
    _check_vae(config, "The sample grids written every train.eval_every_steps decode with it")
    return config


def _check_vae(config: specs.RunSpec, why: str) -> None:
    """Loads ``data.vae`` now (the run's lazy loader reuses it) or refuses."""
    path = config.data.vae
    if not path:
        raise PreflightError(
            f"This COCO run needs the VAE and data.vae is unset. {why}. Pass --vae=PATH (or "
            f"--config.data.vae=PATH): {_VAE_FORMS}."
        )
    _load_or_refuse(coco_dataset.load_vae_once, path, "data.vae", "--vae", _VAE_FORMS, why)


def _check_text_encoder(config: specs.RunSpec, why: str) -> None:
    """Loads ``data.clip`` now (the run's lazy loader reuses it) or refuses."""
    path = config.data.clip
    if not path:
        raise PreflightError(
            f"This COCO run needs the CLIP text encoder for {why}, and data.clip is unset. "
            f"Pass --text_encoder=DIR (or --config.data.clip=DIR): {_CLIP_FORMS}."
        )
    _load_or_refuse(
        coco_dataset.load_text_encoder_once,
        path,
        "data.clip",
        "--text_encoder",
        _CLIP_FORMS,
        f"It encodes {why}",
    )


def _load_or_refuse(load, path: str, field: str, flag: str, forms: str, why: str) -> Any:
    try:
        return load(path)
    except Exception as e:
        raise PreflightError(
            f"{field}={path} cannot be loaded ({type(e).__name__}: {e}). {why}. Pass a "
            f"working {flag}=PATH ({forms})."
        ) from e


def _check_eval_files(config: specs.RunSpec) -> None:
    """``eval.*`` settings valid, their files present, the reference statistics readable."""
    try:
        ev = evaluate.eval_settings(config)
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
