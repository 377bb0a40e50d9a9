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
import logging
import math
import os
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


def bytes_per_device(abstract: Any, shardings: Any) -> int:
    """Bytes one device holds of a tree of arrays laid out by ``shardings``.

    Args:
      abstract: arrays or ``jax.ShapeDtypeStruct``s.
      shardings: the matching tree of shardings.

    Returns:
      The sum over leaves of one shard's size (the largest, for uneven splits).
    """
    total = 0
    for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True):
        total += math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize  # PRNG keys too
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


# Two XLA:CPU options for forward-only programs, measured on SD 1.x's UNet at batch 2
# (README, "Benchmark against diffusers"):
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
