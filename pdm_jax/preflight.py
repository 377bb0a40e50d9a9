"""Start-up checks shared by every run mode, and the helpers the modes' own checks use.

A run should fail at start rather than hours in. ``python -m pdm_jax.main`` calls the
mode's ``check`` (``pdm_jax.modes``), which runs :func:`preflight` and then the mode's own
checks. :func:`preflight` checks, for every mode:

* ``model.token_fusion`` is set on a one-stream model only;
* ``sharding.mesh_shape`` / ``mesh_axes`` make a mesh of the devices (all of them for a
  mode whose mesh spans the processes, as training's does; this process's otherwise);
* ``data.source``, ``diffusion.image_prediction`` and ``diffusion.map_pooling`` are known;
* the solver settings of ``config.sampler`` (method, order, skip type, steps ≥ order),
  unless the mode replaces them (an evaluation's ``eval.sweep``), and ``sampler.clip_x0``
  ≥ 0: training would otherwise first meet them at its first sample grid or after its
  last step.

The helpers load what a COCO run reads late (the VAE, the CLIP text encoder) now, so a bad
path is refused at once. Every refusal is a :class:`PreflightError` naming the flag that
fixes it.
"""

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from pdm_jax import models, sharding, specs
from pdm_jax.data import pipeline
from pdm_jax.data.coco import dataset as coco_dataset
from pdm_jax.diffusion import dpm_solver, losses
from pdm_jax.diffusion import maps as map_lib
from pdm_jax.specs import PreflightError

__all__ = [
    "VAE_FORMS",
    "PreflightError",
    "check_text_encoder",
    "check_vae",
    "preflight",
    "refused",
    "require_data_dir",
]


VAE_FORMS = (
    "autoencoder_kl.pth, a diffusers vae/ directory or a `python -m pdm_jax.convert vae` output"
)
_CLIP_FORMS = (
    "a local clip-vit-large-patch14 directory or a `python -m pdm_jax.convert clip_text` output"
)


def preflight(config: Any, *, spans_processes: bool, check_solver: bool = True) -> specs.RunSpec:
    """The checks every mode shares (module docstring).

    Args:
      config: the run's ``RunSpec`` (or its ``ConfigDict``), paths already resolved.
      spans_processes: the mode's mesh spans every process's devices (training's does;
        sampling and evaluation use this process's devices).
      check_solver: check the solver settings of ``config.sampler`` (False when the mode
        replaces them, as an ``eval.sweep`` does).

    Returns:
      The run's spec.

    Raises:
      PreflightError: naming the flag that fixes the problem.
    """
    config = specs.as_run_spec(config)
    with refused():
        models.check_token_fusion(config.model)
    sh = config.sharding
    with refused():
        if spans_processes:
            sharding.create_mesh(sh.mesh_shape, sh.mesh_axes)
        else:
            sharding.local_mesh(sh.mesh_shape, sh.mesh_axes)
    with refused():  # the data, the loss and the sampler check these only when they run
        pipeline.check_source(config.data.source)
        losses.check_image_prediction(config.diffusion.image_prediction)
        map_lib.check_pooling(config.diffusion.map_pooling)
    s = config.sampler
    if check_solver:
        with refused():
            dpm_solver.check_settings(s.method, s.order, s.skip_type, s.steps)
    if s.clip_x0 < 0:
        raise PreflightError(
            f"sampler.clip_x0={s.clip_x0} is negative: pass 0 (no clipping) or the bound "
            "that x̂₀ is clipped to, e.g. --config.sampler.clip_x0=2."
        )
    return config


@contextlib.contextmanager
def refused() -> Iterator[None]:
    """A building block's ``ValueError`` (its message names the fix) as a ``PreflightError``."""
    try:
        yield
    except ValueError as e:
        raise PreflightError(str(e)) from e


def require_data_dir(config: specs.RunSpec, mode: str) -> None:
    """A COCO run of ``mode`` that reads the prepared data has ``data.dir`` set."""
    if config.data.source == "coco" and not config.data.dir:
        raise PreflightError(
            f"--mode={mode} on COCO reads the prepared data, and data.dir is unset: pass "
            "--config.data.dir=<the --output_dir of python -m pdm_jax.data.coco.prepare>."
        )


def check_vae(config: specs.RunSpec, why: str) -> None:
    """Loads ``data.vae`` now (the run's lazy loader reuses it) or refuses.

    Args:
      config: the run's spec.
      why: what the run decodes with it (a sentence, in the refusal).
    """
    path = config.data.vae
    if not path:
        raise PreflightError(
            f"This COCO run needs the VAE and data.vae is unset. {why}. Pass --vae=PATH (or "
            f"--config.data.vae=PATH): {VAE_FORMS}."
        )
    _load_or_refuse(coco_dataset.load_vae_once, path, "data.vae", "--vae", VAE_FORMS, why)


def check_text_encoder(config: specs.RunSpec, why: str) -> None:
    """Loads ``data.clip`` now (the run's lazy loader reuses it) or refuses.

    Args:
      config: the run's spec.
      why: what the run encodes with it (in the refusal).
    """
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


def _load_or_refuse(
    load: Callable[[str], Any], path: str, field: str, flag: str, forms: str, why: str
) -> Any:
    try:
        return load(path)
    except Exception as e:
        raise PreflightError(
            f"{field}={path} cannot be loaded ({type(e).__name__}: {e}). {why}. Pass a "
            f"working {flag}=PATH ({forms})."
        ) from e
