r"""python -m pdm_jax.benchmark --config=configs/pdm.py:two_stream --what=train_step --batch_size=8

Times one jitted program of the configured model after a warm-up and prints one JSON line
last: ``median_s``, ``min_s``, ``times_s`` (every timed call), ``items_per_s``,
``device``, ``peak_memory_bytes`` (device allocator peak where the backend reports one,
else the process's peak RSS), ``run_peak_memory_bytes`` (CPU: the peak RSS over the timed
calls alone, reset after the warm-up; None on accelerators), ``flops_per_device`` (XLA's
cost analysis of the SPMD program, which is one device's share; it counts a loop body
once: the chunked CPU attention's ``lax.map`` is undercounted), ``flops_per_item`` (summed
over the devices, so work every device repeats, such as the update of replicated
parameters, counts once per device), ``mfu`` (per-device FLOPs / time / the device's peak,
where the peak is known) and ``state_bytes_per_device`` (what one device holds of the
program's resident state: the train state for ``train_step``, the parameters for
``denoise`` and ``sample``).

``--what``: ``train_step`` (a full AdamW step; the two-stream image stream frozen),
``denoise`` (one network call, no CFG), ``sample`` (the whole DPM-Solver++ sampler with CFG,
``--steps`` steps), or ``plan``: compile, without running, the train step for
``--devices`` fake CPU devices on the configured mesh and report what one device would
hold::

    python -m pdm_jax.benchmark --what=plan --devices=64 --batch_size=512 \\
        --config=configs/pdm.py:two_stream,size=L --config.sharding.mesh_shape=1,16,4 \\
        --config.sharding.mesh_axes=data,fsdp,tensor

Its record: ``state_bytes_per_device``, ``temp_bytes_per_device`` /
``argument_bytes_per_device`` / ``output_bytes_per_device`` / ``alias_bytes_per_device``
(XLA's memory analysis of the compiled program), ``peak_bytes_per_device`` (arguments +
outputs − donated aliases + temporaries), ``flops_per_device`` and ``collectives`` (counts
of each collective op in the compiled HLO); ``--nocompile`` gives the state alone, in
seconds. The state is abstract (shapes and shardings), so planning a 256-chip model
allocates nothing. XLA:CPU's buffer assignment and fusion
differ from a TPU's or GPU's: temporaries are an estimate, the state exact.

``--reference=diffusers`` (``--what=denoise`` of a plain ``unet`` config, torch extra):
diffusers' PyTorch ``UNet2DConditionModel`` (the same ``unet_config``, float32, its own
random weights) runs the same shapes in a fresh process (so its peak RSS is its own) with
the same warm-up and repeats, its timed calls alternating with ours (ours, its, ours, ...:
both sides see the same drift of the machine's speed); the record gains ``reference``
(its ``median_s``, ``min_s``, ``times_s``, ``peak_memory_bytes``,
``run_peak_memory_bytes``, ``torch_threads``), ``time_ratio`` (our median / its median),
``paired_time_ratio`` (the median over the pairs of adjacent calls of ours / its),
``memory_ratio`` (our peak RSS over the timed calls / its, both measured from the warm-up
on) and ``process_memory_ratio`` (the whole processes' peaks, set-up and compilation
in)::

    python -m pdm_jax.benchmark --config=configs/pdm.py:unet,sd=1 --what=denoise \
        --batch_size=2 --reference=diffusers
"""

import functools
import json
import sys
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from pdm_jax import cli, runtime
from pdm_jax.benchmark import plan, programs, reference, timing


def _define_flags() -> dict[str, flags.FlagHolder]:
    """The command-line flags, defined only when run as a program: importing this module
    (e.g. beside ``pdm_jax.data.coco.prepare``, which has its own ``--batch_size``) adds none.

    Returns:
      The flag holders by name.
    """
    return {
        "config": config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True),
        "what": flags.DEFINE_enum(
            "what",
            "train_step",
            [*programs.WHATS, "plan"],
            "What to time, or plan: compile the train step without running it.",
        ),
        "devices": flags.DEFINE_integer(
            "devices",
            None,
            "plan only: compile for this many fake CPU devices (default: the devices JAX sees).",
        ),
        "batch_size": flags.DEFINE_integer("batch_size", 8, "Global batch size."),
        "steps": flags.DEFINE_integer(
            "steps", None, "Sampler steps (default: config.sampler.steps)."
        ),
        "compile": flags.DEFINE_boolean(
            "compile",
            True,
            "plan only: --nocompile reports the state's layout alone (seconds, not minutes).",
        ),
        "repeats": flags.DEFINE_integer("repeats", 5, "Timed repeats after the warm-up."),
        "warmup": flags.DEFINE_integer("warmup", 1, "Untimed calls after compilation."),
        "reference": flags.DEFINE_enum(
            "reference",
            "none",
            list(reference.REFERENCES),
            "denoise of a plain unet only: also time diffusers' PyTorch UNet on the same shapes.",
        ),
    }


def main(argv: list[str], defined: dict[str, flags.FlagHolder]) -> None:
    """Runs the benchmark (or the plan) the flags describe and prints its JSON record.

    A config the run cannot use (``ValueError``, ``specs.ConfigError`` among them: a mesh
    shape the devices do not fill, a CPU device count that does not divide the batch, ...)
    exits with its one-line message, without a traceback.
    """
    del argv
    values = {name: holder.value for name, holder in defined.items()}
    num_devices, compile_step = values.pop("devices"), values.pop("compile")
    chosen = values.pop("reference")
    if chosen != "none" and (values["what"] != "denoise" or values["config"].model.name != "unet"):
        raise app.UsageError(
            "--reference=diffusers times diffusers' UNet forward: it needs --what=denoise and a "
            "plain UNet config (configs/pdm.py:unet,sd=1)."
        )
    if values["what"] != "plan" and (num_devices is not None or not compile_step):
        raise app.UsageError("--devices and --nocompile are for --what=plan only.")
    try:
        record = _run(values, num_devices, compile_step, chosen)
    except ValueError as e:  # specs.ConfigError is one
        sys.exit(f"error: {e}")
    print(json.dumps(record))


def _run(
    values: dict[str, Any], num_devices: int | None, compile_step: bool, chosen: str
) -> dict[str, Any]:
    """The record of the plan or benchmark that ``main``'s flag values describe."""
    if values["what"] == "plan":
        if num_devices is not None:
            plan.use_fake_cpu_devices(num_devices)
        return plan.plan(values["config"], values["batch_size"], compile_step=compile_step)
    runtime.setup_cpu_devices(values["config"], values["batch_size"])
    if chosen == "diffusers":
        # Started first: its set-up overlaps our compilation, its timed calls alternate
        # with ours.
        with reference.DiffusersReference(
            values["config"], values["batch_size"], values["warmup"]
        ) as ref:
            record = timing.run_benchmark(**values, between=ref.time_call)
            return reference.with_reference(record, ref.finish())
    return timing.run_benchmark(**values)


if __name__ == "__main__":
    cli.run(functools.partial(main, defined=_define_flags()))
