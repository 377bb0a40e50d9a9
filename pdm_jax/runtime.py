"""How a program uses its host and its devices: CPU device split, multi-process start, XLA options.

Everything here acts on the runtime before or while programs compile; the mesh and the
logical-axis rules live in ``pdm_jax.sharding``.

- ``setup_cpu_devices`` splits the host CPU into single-threaded XLA devices
  (``config.sharding.cpu_devices``); it must run before JAX initialises its backends.
- ``initialize_distributed`` joins a multi-process run (``jax.distributed``).
- ``inference_compiler_options`` gives the XLA options of forward-only programs.
"""

import logging
import os
from typing import Any

import jax
from jax.sharding import Mesh

# Two XLA:CPU options for forward-only programs, measured on SD 1.x's UNet at batch 2
# (docs/benchmarks.md, "Benchmark against diffusers"):
# - the memory-optimised scheduler. The default one starts buffers long before their use
#   (later layers' outputs were live at the first 64×64 feed-forward, where the
#   temporaries peaked): 281 → 209 MB of temporaries.
# - no YNNPACK fusions (dots and convolutions go to XLA's own kernels): the same speed
#   (12.66 vs 12.72 s, alternating in one process) and 60 MB less resident at the peak
#   (4.26 vs 4.32 GB, two runs each), as YNNPACK keeps its fused intermediates outside
#   XLA's buffer plan.
#   Single-device meshes only: with several CPU devices in one process, XLA's own dot
#   kernels share the Eigen pool with the collectives, and an all-gather of an 8-device
#   test mesh on 2 cores timed out waiting for its participants.
CPU_INFERENCE_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
CPU_SINGLE_DEVICE_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def inference_compiler_options(mesh: Mesh) -> dict[str, str] | None:
    """XLA options for a forward-only program (denoising, sampling) on ``mesh``.

    Returns:
      ``CPU_INFERENCE_OPTIONS`` on a CPU mesh (with ``CPU_SINGLE_DEVICE_OPTIONS`` on one
      device), else None (GPU and TPU schedule for memory themselves).
    """
    if mesh.devices.flat[0].platform != "cpu":
        return None
    if mesh.devices.size == 1:
        return {**CPU_INFERENCE_OPTIONS, **CPU_SINGLE_DEVICE_OPTIONS}
    return dict(CPU_INFERENCE_OPTIONS)


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def host_cpu_devices(requested: int, batch_size: int, cores: int | None = None) -> int:
    """How many XLA CPU devices ``config.sharding.cpu_devices`` asks for on this host.

    Args:
      requested: ``0`` (keep JAX's one multi-threaded device), ``-1`` (one per usable
        core, reduced to the largest count that divides ``batch_size``) or an explicit
        count.
      batch_size: the global batch, which the data axis must divide.
      cores: usable cores (default: this process's CPU affinity).

    Returns:
      The device count; 0 when ``requested`` is 0.
    """
    if requested == 0:
        return 0
    if requested > 0:
        if batch_size % requested:
            raise ValueError(
                f"sharding.cpu_devices={requested} does not divide the batch size "
                f"{batch_size}; pick a divisor, or -1 to choose one."
            )
        return requested
    if requested != -1:
        raise ValueError(f"sharding.cpu_devices={requested}: use 0, -1 or a positive count.")
    cores = _usable_cores() if cores is None else cores
    return max(n for n in range(1, max(cores, 1) + 1) if batch_size % n == 0)


def use_cpu_devices(count: int) -> bool:
    """Splits the host CPU into ``count`` single-threaded XLA devices (data parallelism).

    XLA:CPU runs one program on one thread pool; a small model's ops are too short to
    keep several threads busy (the demo step takes as long on 1 thread as on 2), while
    ``count`` devices each run their slice of the batch on their own core. It only
    affects the CPU backend and must run before JAX initialises its backends.

    Args:
      count: devices to create (≤ 1: nothing to do).

    Returns:
      Whether the setting was applied: False when JAX's backends already exist or
      ``XLA_FLAGS`` already sets ``--xla_force_host_platform_device_count`` (an explicit
      choice wins).
    """
    if count <= 1:
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags:
        return False
    try:
        # Once the backends exist, changing ``jax_num_cpu_devices`` raises RuntimeError
        # (JAX's own check; there is no public "backends initialised?" query).
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:
        return False
    if "xla_cpu_multi_thread_eigen" not in flags:
        flags += " --xla_cpu_multi_thread_eigen=false"
    os.environ["XLA_FLAGS"] = flags.strip()
    return True


def setup_cpu_devices(config: Any, batch_size: int | None) -> int:
    """Applies ``config.sharding.cpu_devices`` for a program whose global batch is given.

    Call it first thing in a program (before anything touches a JAX device). Logs a warning
    when a split was asked for but could not be applied (see ``use_cpu_devices``).

    Args:
      config: the full config (``sharding.cpu_devices``).
      batch_size: the global batch the data axis must divide; None for a program that runs
        on one device: no split.

    Returns:
      The device count asked for (0 or 1: no split).
    """
    if batch_size is None:
        return 0
    count = host_cpu_devices(int(config.sharding.cpu_devices), batch_size)
    if count > 1 and not use_cpu_devices(count):
        logging.warning(
            "sharding.cpu_devices=%d not applied: JAX's backends were already initialised or "
            "XLA_FLAGS sets --xla_force_host_platform_device_count.",
            count,
        )
    return count


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Joins a multi-process run (``jax.distributed.initialize``), before any JAX computation.

    Without arguments JAX detects the cluster (TPU pods, SLURM, Open MPI); with all three it
    joins the processes they name (any cluster, or several processes on one machine). CPU
    devices of different processes talk through gloo (``jax_cpu_collectives_implementation``,
    unless the ``JAX_CPU_COLLECTIVES_IMPLEMENTATION`` environment variable chooses another),
    so multi-process runs work, and are tested, on CPU too. JAX's preemption service starts
    here: a SIGTERM to any process is shared with all of them
    (``jax.experimental.multihost_utils.reached_preemption_sync_point``).

    Args:
      coordinator_address: ``host:port`` of process 0's coordinator.
      num_processes: the number of processes.
      process_id: this process's index.
    """
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
