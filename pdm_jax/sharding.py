"""Mesh and sharding rules, declared once.

Data parallelism over a ``data`` mesh axis that spans all devices; parameters are
replicated for now (the logical-axis rules below map every parameter axis to ``None``).
FSDP or tensor parallelism only change ``LOGICAL_AXIS_RULES`` and the mesh shape.
"""

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
