"""Mesh and sharding rules, declared once.

Data parallelism over a ``data`` mesh axis that spans all devices; parameters are
replicated for now (the logical-axis rules below map every parameter axis to ``None``).
FSDP or tensor parallelism only change ``LOGICAL_AXIS_RULES`` and the mesh shape.
"""

import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"

# Logical axis name -> mesh axis (None = replicated). Models annotate their kernels and
# activations with the names on the left.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", DATA_AXIS),
    ("length", None),
    ("embed", None),
    ("mlp", None),
    ("heads", None),
    ("qkv", None),
    ("kv", None),
    ("patch", None),
    ("channels", None),
    ("vocab", None),
    ("context", None),
    ("conv_in", None),
    ("conv_out", None),
)


def create_mesh(
    mesh_shape: Sequence[int] = (-1,),
    axis_names: Sequence[str] = (DATA_AXIS,),
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Creates a device mesh; a ``-1`` entry takes all remaining devices.

    Args:
      mesh_shape: sizes per axis, at most one ``-1``.
      axis_names: mesh axis names, same length as ``mesh_shape``.
      devices: devices to use (default: all).

    Returns:
      A ``jax.sharding.Mesh``.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = list(mesh_shape)
    if len(shape) != len(axis_names):
        raise ValueError(
            f"mesh_shape {tuple(shape)} and axis names {tuple(axis_names)} differ in length."
        )
    if shape.count(-1) > 1:
        raise ValueError(f"At most one -1 in mesh_shape, got {tuple(shape)}.")
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1]))
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(
            f"Mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, but "
            f"{len(devices)} are available. Set --config.sharding.mesh_shape accordingly."
        )
    return Mesh(np.asarray(devices).reshape(shape), tuple(axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that places a full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Shards the leading (batch) axis over the data axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Turns this process's host batch into global ``jax.Array``s sharded over ``data``.

    Each process passes its own slice of the global batch (leading axis); the result has
    the global batch size.
    """
    sharding = batch_sharding(mesh)

    def put(x):
        x = np.asarray(x)
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        global_shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(put, batch)


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def host_cpu_devices(requested: int, batch_size: int, cores: int | None = None) -> int:
    """How many XLA CPU devices ``sharding.cpu_devices`` asks for on this host.

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


def mode_batch_size(config: Any, mode: str) -> int | None:
    """The global batch a ``pdm_jax.main`` mode shards over the data axis (None: none).

    Args:
      config: the full config.
      mode: ``train`` (``train.batch_size``), ``evaluate`` (``eval.batch_size``) or
        ``sample`` (``sample.batch_size``): the sampler shards each batch over all devices.

    Returns:
      The batch ``setup_cpu_devices`` should split the CPU by, or None for no split.
    """
    if mode == "train":
        return int(config.train.batch_size)
    if mode == "evaluate":
        return int(config.eval.batch_size)
    if mode == "sample":
        return int(config.sample.batch_size)
    raise ValueError(f"Unknown mode {mode!r}; choose one of train, sample, evaluate.")


def setup_cpu_devices(config: Any, batch_size: int | None) -> int:
    """Applies ``config.sharding.cpu_devices`` for a program whose global batch is given.

    Call it first thing in a program (before anything touches a JAX device). Logs a warning
    when a split was asked for but could not be applied (see ``use_cpu_devices``).

    Args:
      config: the full config (``sharding.cpu_devices``).
      batch_size: the global batch the data axis must divide (``mode_batch_size``); None
        for a program that runs on one device: no split.

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
