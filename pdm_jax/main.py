r"""python -m pdm_jax.main --config=configs/pdm.py:demo --workdir=workdir/demo

Command-line entry point. ``--mode`` picks a run mode of ``pdm_jax.modes``: ``train``
trains (resuming from ``<workdir>`` when it holds checkpoints) and, for configs with
``demo.use_metrics``, then writes the demo's ``metrics.json``; ``sample`` samples from the
latest checkpoint; ``evaluate`` samples validation prompts and scores them. Any config
field can be overridden with ``--config.a.b=value``. For COCO configs,
``--text_encoder=DIR`` (a local CLIP text directory: raw prompts) and ``--vae=PATH`` (the
autoencoder: latents → PNGs) set ``config.data.clip`` and ``config.data.vae``.

Paths may be relative, start with ``~`` or be URLs (``gs://``): ``--workdir`` and the
config's path fields are resolved once, first (``pdm_jax.paths``). Before the mode runs,
its ``check`` (``pdm_jax.preflight`` and the mode's own) checks what it will need later
(weights, evaluation files, a pretrained frozen stream), so a run fails at start rather
than hours in.
"""

import logging as std_logging
import os
import sys
from typing import Any

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from pdm_jax import checkpointing, cli, modes, paths, runtime, specs
from pdm_jax.train import trainer

FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    """Defines the command's flags (when it runs, never at import: the names are common)."""
    config_flags.DEFINE_config_file(
        "config",
        None,
        "Config file and variant, e.g. configs/pdm.py:demo.",
        flag_values=fv,
        lock_config=True,
    )
    flags.DEFINE_string(
        "workdir", None, "Directory for checkpoints, logs and samples.", flag_values=fv
    )
    flags.DEFINE_enum("mode", "train", list(modes.MODES), "What to run.", flag_values=fv)
    flags.DEFINE_bool(
        "distributed",
        False,
        "Multi-host run: call jax.distributed.initialize() first. Alone it detects the "
        "cluster (TPU pods, SLURM, Open MPI); with --coordinator_address, --num_processes "
        "and --process_id it joins the processes named there (any cluster; several local "
        "processes on CPU, with gloo collectives).",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "coordinator_address",
        None,
        "--distributed without cluster detection: host:port of process 0's coordinator "
        "(the same on every process).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "num_processes",
        None,
        "--distributed without cluster detection: how many processes take part.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "process_id",
        None,
        "--distributed without cluster detection: this process's index, 0..num_processes-1.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "text_encoder",
        None,
        "COCO configs: local CLIP ViT-L/14 text directory (Hugging Face folder, SD root or a "
        "`pdm_jax.convert clip_text` output) for raw prompts; sets config.data.clip.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "vae",
        None,
        "COCO configs: VAE checkpoint (autoencoder_kl.pth, a diffusers vae/ directory or a "
        "`pdm_jax.convert vae` output) that decodes latents to PNGs; sets config.data.vae.",
        flag_values=fv,
    )
    flags.mark_flags_as_required(["config", "workdir"], flag_values=fv)
    for name in ("text_encoder", "vae"):
        flags.register_validator(
            name,
            lambda path: path is None or os.path.exists(paths.resolve(path)),  # local only
            message="the path does not exist; pass a local file or directory.",
            flag_values=fv,
        )


# Errors whose message says what went wrong and how to fix it: no traceback needed.
_USER_ERRORS = (
    checkpointing.CheckpointNotFoundError,
    checkpointing.ConfigMismatchError,
    checkpointing.CorruptCheckpointError,
    trainer.NonFiniteLossError,
    specs.ConfigError,
    FileNotFoundError,
)


class _QuietLibraries(std_logging.Filter):
    """Drops orbax's per-save INFO chatter; its warnings and errors still show."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def _apply_weight_flags(config: ml_collections.ConfigDict) -> None:
    """``--text_encoder`` / ``--vae`` → ``config.data.clip`` / ``config.data.vae``."""
    given = {"clip": FLAGS.text_encoder, "vae": FLAGS.vae}
    given = {field: path for field, path in given.items() if path is not None}
    if given and config.data.source != "coco":
        raise app.UsageError(
            f"--text_encoder/--vae apply to COCO configs, but data.source is "
            f"{config.data.source!r}, whose dataset encodes its own prompts and images; drop "
            "them or use a COCO config (e.g. configs/pdm.py:two_stream)."
        )
    for field, path in given.items():
        config.data[field] = path


_CLUSTER_FLAGS = ("coordinator_address", "num_processes", "process_id")


def cluster_arguments(distributed: bool, **given: Any) -> dict[str, Any]:
    """``jax.distributed.initialize``'s arguments from the cluster flags, checked.

    Args:
      distributed: ``--distributed``.
      **given: ``coordinator_address``, ``num_processes``, ``process_id`` as passed
        (None: not given).

    Returns:
      The given ones (none: JAX detects the cluster).

    Raises:
      app.UsageError: they are given without ``--distributed``, only some of them are
        given, or ``process_id`` is outside ``0..num_processes-1``.
    """
    given = {name: given[name] for name in _CLUSTER_FLAGS if given.get(name) is not None}
    if not given:
        return {}
    if not distributed:
        raise app.UsageError(
            f"--{' --'.join(given)} only apply to multi-process runs; add --distributed "
            "(or drop them for a single-process run)."
        )
    missing = [name for name in _CLUSTER_FLAGS if name not in given]
    if missing:
        raise app.UsageError(
            f"--distributed with --{' --'.join(given)} also needs --{' --'.join(missing)}: "
            "give all three (every process the same --coordinator_address and "
            "--num_processes, its own --process_id), or none to detect the cluster "
            "(TPU pods, SLURM)."
        )
    if given["num_processes"] < 1 or not 0 <= given["process_id"] < given["num_processes"]:
        raise app.UsageError(
            f"--process_id={given['process_id']} must lie in 0..num_processes-1 "
            f"(--num_processes={given['num_processes']})."
        )
    return given


def main(argv: list[str]) -> None:
    """Runs ``--mode`` with ``--config`` in ``--workdir``."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = FLAGS.config
    _apply_weight_flags(config)
    paths.resolve_config_paths(config, specs.path_fields())
    workdir = paths.resolve(FLAGS.workdir)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    cluster = cluster_arguments(
        FLAGS.distributed, **{name: FLAGS[name].value for name in _CLUSTER_FLAGS}
    )
    mode = modes.get(FLAGS.mode)
    runtime.setup_cpu_devices(config, mode.batch_size(config))
    if FLAGS.distributed:
        runtime.initialize_distributed(**cluster)
    logging.info(
        "JAX devices: %s (process %d of %d)",
        jax.devices(),
        jax.process_index(),
        jax.process_count(),
    )
    try:
        run = mode.check(specs.from_config(config), workdir)
        mode.run(run, workdir)
    except trainer.TrainingInterrupted as e:
        logging.warning("%s", e)
        sys.exit(128 + e.signum)
    except _USER_ERRORS as e:
        logging.error("%s: %s", type(e).__name__, e)
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
