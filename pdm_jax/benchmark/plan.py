"""Planning a sharded train step: compile it, without running it, and read what one device holds.

``plan`` builds the train state abstractly (shapes and shardings), so planning a model
too large for this host allocates nothing; with ``--devices`` it runs on that many fake
CPU devices (``use_fake_cpu_devices``). Its record (described by
``python -m pdm_jax.benchmark --help``) gives the state's bytes per device, XLA's memory
analysis of the compiled step and the collectives in its HLO.
"""

import re
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from pdm_jax import models, sharding, specs
from pdm_jax.benchmark.programs import batch_shapes, flops_per_device
from pdm_jax.models.spec import UNET_NAMES
from pdm_jax.train import state as state_lib
from pdm_jax.train import step as step_lib

# Collective ops as XLA's HLO text names them (asynchronous ones add ``-start``/``-done``).
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_COLLECTIVE_OP = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


def count_collectives(hlo_text: str) -> dict[str, int]:
    """How many times each collective op occurs in a compiled module's HLO text.

    Args:
      hlo_text: ``compiled.as_text()``.

    Returns:
      ``{op: count}`` for every op of ``COLLECTIVES`` (asynchronous starts count as one).
    """
    counts = dict.fromkeys(COLLECTIVES, 0)
    for match in _COLLECTIVE_OP.finditer(hlo_text):
        counts[match.group(1)] += 1
    return counts


def plan(
    config: Any,
    batch_size: int,
    devices: Sequence[jax.Device] | None = None,
    compile_step: bool = True,
) -> dict[str, Any]:
    """Compiles, without running, the train step on the configured mesh of ``devices``.

    The train state is abstract (``jax.eval_shape`` shapes with their shardings): nothing
    of the model is allocated, so the plan for a model too large for this host works.

    Args:
      config: the full config (``model``, ``optim``, ``sharding.mesh_shape`` and
        ``mesh_axes``).
      batch_size: the global batch.
      devices: the mesh's devices (default: all).
      compile_step: False: only the state's layout (``state_bytes_per_device``), in
        seconds; the compiled program's fields are left out.

    Returns:
      The plan record (see ``python -m pdm_jax.benchmark --help``).
    """
    config = specs.as_run_spec(config)
    mesh = sharding.create_mesh(config.sharding.mesh_shape, config.sharding.mesh_axes, devices)
    rng = jax.random.key(config.seed)
    # The shapes and shardings ``state.create_train_state`` gives the state it allocates.
    abstract = jax.eval_shape(lambda r: state_lib.init_train_state(config, r), rng)
    shardings = state_lib.state_shardings(config, mesh, abstract)
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    m = config.model
    # A UNet's size is its unet_config; embed_dim and depth are the U-ViT's.
    size = (
        {"unet_config": m.unet_config}
        if m.name in UNET_NAMES
        else {"embed_dim": m.embed_dim, "depth": m.depth}
    )
    record = {
        "what": "plan",
        "model": m.name,
        **size,
        "num_params": models.count_params(state.params),
        "dtype": m.dtype,
        "batch_size": batch_size,
        "devices": mesh.size,
        "mesh_shape": dict(mesh.shape),
        "state_bytes_per_device": sharding.bytes_per_device(state),
    }
    if not compile_step:
        return record
    batch_sharding = sharding.batch_sharding(mesh)
    batch = {
        name: jax.ShapeDtypeStruct(b.shape, b.dtype, sharding=batch_sharding)
        for name, b in batch_shapes(config, batch_size).items()
    }
    empty = np.zeros((m.num_clip_token, m.clip_dim), np.float32)
    fn = step_lib.jit_train_step(config, mesh, shardings, state.params, empty)
    t0 = time.perf_counter()
    compiled = fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    record.update(
        temp_bytes_per_device=int(memory.temp_size_in_bytes),
        argument_bytes_per_device=int(memory.argument_size_in_bytes),
        output_bytes_per_device=int(memory.output_size_in_bytes),
        alias_bytes_per_device=int(memory.alias_size_in_bytes),
        peak_bytes_per_device=int(
            memory.argument_size_in_bytes
            + memory.output_size_in_bytes
            - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes
        ),
        flops_per_device=flops_per_device(compiled)[0],
        collectives=count_collectives(compiled.as_text()),
        compile_s=compile_s,
    )
    return record


def use_fake_cpu_devices(count: int) -> None:
    """Makes JAX run on ``count`` CPU devices (for ``plan``), before its backends exist.

    Args:
      count: the device count (≥ 1).

    Raises:
      ValueError: for a count below 1.
      RuntimeError: when JAX's backends were already initialised (call it first thing).
    """
    if count < 1:
        raise ValueError(f"--devices={count}: give a positive device count.")
    try:
        # JAX refuses both once its backends exist (there is no public query for that).
        jax.config.update("jax_num_cpu_devices", count)
        jax.config.update("jax_platforms", "cpu")
    except RuntimeError as e:
        raise RuntimeError(
            f"Cannot create {count} fake CPU devices: JAX's backends are already initialised. "
            "Call use_fake_cpu_devices before anything touches a JAX device (run "
            "python -m pdm_jax.benchmark --what=plan in a fresh process)."
        ) from e
