"""Mesh and sharding rules, declared once.

The mesh has three axes (``MESH_AXES``): ``data`` (pure data parallelism: every device
holds whole parameters), ``fsdp`` (data parallelism whose devices also split the
parameters, gradients and optimizer moments: ZeRO-3 / FSDP) and ``tensor`` (tensor
parallelism: attention heads and MLP hidden units split over devices, Megatron-style).
The batch is split over ``data`` × ``fsdp``.

Models name the dimensions of their parameters and activations with logical axes
(``embed``, ``heads``, ...); ``LOGICAL_AXIS_RULES`` is the one table that maps them to mesh
axes. FSDP or tensor parallelism are a change of mesh shape, not of model code:
``mesh_shape=(-1, 1, 1)`` is data parallelism, ``(1, -1, 1)`` FSDP, ``(1, -1, 2)``
FSDP × 2-way tensor parallelism. A parameter dimension that its mesh axes do not divide
is replicated (``named_shardings``), so every model runs on every mesh.
"""

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
TENSOR_AXIS = "tensor"
MESH_AXES = (DATA_AXIS, FSDP_AXIS, TENSOR_AXIS)
# The mesh axes a batch is split over, outermost first.
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)

# Logical axis name -> mesh axes (None = replicated), in priority order: a mesh axis is
# used at most once per array, so in an activation ``(batch, length, embed)`` the batch
# takes ``data`` and ``fsdp`` and ``embed`` stays whole (FSDP gathers the weights, not the
# activations). Models annotate their kernels and activations with the names on the left.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),  # examples (activations)
    ("embed", FSDP_AXIS),  # model width D (parameters; FSDP)
    ("mlp", TENSOR_AXIS),  # MLP hidden units
    ("heads", TENSOR_AXIS),  # attention heads
    ("kv", None),  # per-head width
    ("vocab", TENSOR_AXIS),  # token vocabulary (text encoders)
    # Conv kernels (kh, kw, conv_in, conv_out): the output channels are the model width
    # (patch embeddings) or a few latent channels / map bits (final 3x3 convs, which no
    # mesh axis divides: replicated). ``fsdp`` splits them as it splits ``embed``.
    ("conv_out", FSDP_AXIS),
    ("conv_in", None),
    ("length", None),  # tokens (activations)
)


def create_mesh(
    mesh_shape: Sequence[int] = (-1, 1, 1),
    axis_names: Sequence[str] = MESH_AXES,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Creates a device mesh; a ``-1`` entry takes all remaining devices.

    Without ``devices`` the mesh comes from ``jax.make_mesh``, which orders the devices by
    the physical topology (TPU torus, GPU NVLink islands) so the inner axes get the fast
    links; an explicit device list is reshaped in its order.

    Args:
      mesh_shape: sizes per axis, at most one ``-1``.
      axis_names: mesh axis names (from ``MESH_AXES``), same length as ``mesh_shape``.
      devices: devices to use (default: all).

    Returns:
      A ``jax.sharding.Mesh`` whose axes are all of type ``Auto`` (XLA propagates the
      shardings between the constrained arrays).

    Raises:
      ValueError: for mismatched lengths, unknown or repeated axis names, more than one
        ``-1``, or a shape that does not use exactly the available devices.
    """
    given = devices is not None
    devices = list(jax.devices() if devices is None else devices)
    shape, names = [int(s) for s in mesh_shape], tuple(axis_names)
    if len(shape) != len(names):
        raise ValueError(
            f"mesh_shape {tuple(shape)} and mesh_axes {names} differ in length; set "
            "--config.sharding.mesh_shape and --config.sharding.mesh_axes together."
        )
    unknown = [a for a in names if a not in MESH_AXES]
    if unknown or len(set(names)) != len(names):
        raise ValueError(
            f"mesh_axes {names}: each must be one of {MESH_AXES}, at most once "
            "(--config.sharding.mesh_axes)."
        )
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh_shape {tuple(shape)}: sizes must be positive, with at most one -1.")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"Mesh shape {tuple(shape)} needs {math.prod(shape)} devices, but "
            f"{len(devices)} are available. Set --config.sharding.mesh_shape accordingly."
        )
    types = (AxisType.Auto,) * len(names)
    if given:
        return Mesh(np.asarray(devices).reshape(shape), names, axis_types=types)
    return jax.make_mesh(tuple(shape), names, axis_types=types)


def local_mesh(
    mesh_shape: Sequence[int] = (-1, 1, 1),
    axis_names: Sequence[str] = MESH_AXES,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """The configured mesh on this process's devices: model axes kept, ``data`` fills up.

    Sampling and evaluation split their work between processes by example, so each
    process samples on its own devices with the configured ``fsdp`` / ``tensor`` sizes
    and as many data replicas as its devices allow.

    Args:
      mesh_shape: ``config.sharding.mesh_shape``.
      axis_names: ``config.sharding.mesh_axes``.
      devices: the devices (default: ``jax.local_devices()``).

    Returns:
      The mesh.
    """
    devices = list(jax.local_devices() if devices is None else devices)
    shape, names = list(mesh_shape), tuple(axis_names)
    if DATA_AXIS in names and len(shape) == len(names):
        fixed = [s for s, a in zip(shape, names, strict=True) if a != DATA_AXIS]
        if -1 not in fixed:
            shape[names.index(DATA_AXIS)] = -1
    return create_mesh(shape, names, devices)


def rules_for(mesh: Mesh, exclude: Sequence[str] = ()) -> tuple[tuple[str, Any], ...]:
    """``LOGICAL_AXIS_RULES`` restricted to the axes of ``mesh`` (others: replicated).

    Args:
      mesh: the device mesh.
      exclude: mesh axes no rule may use (e.g. those a ``vmap`` splits the batch over).

    Returns:
      Rules for ``nn.logical_axis_rules`` / ``nn.logical_to_mesh_axes`` on this mesh.
    """
    out = []
    for name, target in LOGICAL_AXIS_RULES:
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(
            a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1 and a not in exclude
        )
        out.append((name, axes[0] if len(axes) == 1 else (axes or None)))
    return tuple(out)


def _axis_size(mesh: Mesh, entry: str | tuple[str, ...] | None) -> int:
    if entry is None:
        return 1
    axes = (entry,) if isinstance(entry, str) else entry
    return math.prod(mesh.shape[a] for a in axes)


def mesh_spec(logical: PartitionSpec | None, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """The mesh ``PartitionSpec`` of one array from its logical one.

    Args:
      logical: logical axis names per dimension (None or a shorter spec: the rest is
        unnamed).
      shape: the array's shape.
      mesh: the device mesh.

    Returns:
      A spec over ``mesh``'s axes. A dimension its mesh axes do not divide is replicated,
      except for ``fsdp``: as in big_vision's FSDP, it then moves to the largest other
      dimension it divides that no mesh axis splits (U-ViT-H's width 1152 on 256 devices:
      the MLP kernels still shard along their 4608 hidden units), and the tensor stays
      whole only when none does.
    """
    if logical is None or len(logical) == 0:
        return PartitionSpec()
    names = tuple(logical) + (None,) * (len(shape) - len(logical))
    axes = nn.logical_to_mesh_axes(names, rules_for(mesh))
    out = [a if n % _axis_size(mesh, a) == 0 else None for a, n in zip(axes, shape, strict=True)]
    if FSDP_AXIS in axes and FSDP_AXIS not in out:
        size = _axis_size(mesh, FSDP_AXIS)
        free = [i for i, a in enumerate(out) if a is None and shape[i] % size == 0]
        if free:
            out[max(free, key=lambda i: (shape[i], -i))] = FSDP_AXIS
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def named_shardings(logical_specs: Any, abstract: Any, mesh: Mesh) -> Any:
    """NamedShardings for a tree of arrays from their logical ``PartitionSpec``s.

    Args:
      logical_specs: tree of logical ``PartitionSpec`` leaves (``nn.get_partition_spec``).
      abstract: the same tree of arrays or ``jax.ShapeDtypeStruct``s (their shapes).
      mesh: the device mesh.

    Returns:
      The tree of ``NamedSharding``s (dimensions that do not divide: replicated).
    """
    return jax.tree.map(
        lambda spec, a: NamedSharding(mesh, mesh_spec(spec, a.shape, mesh)),
        logical_specs,
        abstract,
        is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None,
    )


def bytes_per_device(tree: Any, shardings: Any = None) -> int:
    """Bytes one device holds of a tree of arrays laid out by their shardings.

    Nothing is allocated: the leaves may be abstract (``jax.ShapeDtypeStruct``), so the
    layout of a model too large for this host can be measured.

    Args:
      tree: arrays or ``jax.ShapeDtypeStruct``s (e.g. a ``TrainState``).
      shardings: the matching tree of shardings; None: each leaf's own ``sharding``
        (arrays, or ``ShapeDtypeStruct``s built with one).

    Returns:
      The sum over leaves of one shard's size (``shard_shape``: the largest, for uneven
      splits), PRNG keys included.

    Raises:
      ValueError: without ``shardings``, for a leaf that carries no sharding.
    """
    leaves = jax.tree.leaves(tree)
    if shardings is None:
        for leaf in leaves:
            if getattr(leaf, "sharding", None) is None:
                raise ValueError(f"A {leaf.dtype}{list(leaf.shape)} leaf has no sharding.")
        placements = [leaf.sharding for leaf in leaves]
    else:
        placements = jax.tree.leaves(shardings)
    total = 0
    for a, s in zip(leaves, placements, strict=True):
        total += math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
    return total


def trailing_dict_keys(path: Sequence[Any]) -> tuple[str, ...]:
    """The trailing run of dict keys of a pytree path."""
    keys = []
    for entry in reversed(path):
        if not isinstance(entry, jax.tree_util.DictKey):
            break
        keys.append(str(entry.key))
    return tuple(reversed(keys))


def mirror_shardings(tree: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for a tree whose leaves mirror parameters (train state, optimizer moments).

    A leaf takes the sharding of the parameter it mirrors: the one whose path is the leaf
    path's trailing dict keys (``opt_state...mu['in_blocks_0']['attn']['qkv']['kernel']``
    mirrors ``in_blocks_0/attn/qkv/kernel``) and whose shape it has; other leaves (step
    counts, RNG keys) are replicated.

    Args:
      tree: arrays or ``jax.ShapeDtypeStruct``s.
      params: the parameter tree (arrays or ``jax.ShapeDtypeStruct``s).
      param_shardings: its shardings.
      mesh: the device mesh.

    Returns:
      The tree of ``NamedSharding``s.
    """
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    by_path = {
        trailing_dict_keys(path): (tuple(leaf.shape), s)
        for (path, leaf), s in zip(flat, jax.tree.leaves(param_shardings), strict=True)
    }

    def one(path, leaf):
        shape, found = by_path.get(trailing_dict_keys(path), (None, None))
        return found if shape == tuple(leaf.shape) else replicated(mesh)

    return jax.tree_util.tree_map_with_path(one, tree)


class MeshProgram:
    """A jitted function traced and run inside its mesh and ``LOGICAL_AXIS_RULES``.

    Inside, the models' ``nn.with_logical_constraint`` annotations turn into sharding
    constraints on ``mesh`` (outside a mesh and rules context they are no-ops).
    """

    def __init__(self, jitted: Any, mesh: Mesh, exclude: Sequence[str] = ()):
        """Args:
        jitted: the ``jax.jit``-ed function.
        mesh: the mesh its shardings live on.
        exclude: mesh axes the rules leave alone (``rules_for``).
        """
        self.jitted, self.mesh = jitted, mesh
        self.rules = rules_for(mesh, exclude)

    @contextlib.contextmanager
    def context(self):
        """The mesh and the logical-axis rules for it."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def __call__(self, *args, **kwargs):
        """Runs (tracing and compiling on first use) inside ``context``."""
        with self.context():
            return self.jitted(*args, **kwargs)

    def lower(self, *args, **kwargs):
        """``jitted.lower`` inside ``context`` (for ``.compile()`` and its analyses)."""
        with self.context():
            return self.jitted.lower(*args, **kwargs)


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that places a full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes of ``mesh`` that split a batch (``data``, ``fsdp``; those present)."""
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_shards(mesh: Mesh) -> int:
    """How many parts a batch is split into on ``mesh`` (data × fsdp)."""
    return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Shards the leading (batch) axis over ``data`` × ``fsdp``."""
    axes = batch_axes(mesh)
    return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Turns this process's host batch into global ``jax.Array``s split over the batch axes.

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
