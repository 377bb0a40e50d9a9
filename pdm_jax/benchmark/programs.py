"""The programs the benchmark compiles: train step, denoiser and sampler, on synthetic data."""

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pdm_jax import models, runtime, sharding
from pdm_jax.models.handle import param_shardings
from pdm_jax.models.spec import IMAGE_ONLY
from pdm_jax.sampling import sampler as sampler_lib
from pdm_jax.train import state as state_lib
from pdm_jax.train import step as step_lib

WHATS = ("train_step", "denoise", "sample")


def batch_shapes(config: Any, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of a training batch (the common schema) for the configured model."""
    m = config.model
    shapes = {
        "latent": jax.ShapeDtypeStruct(
            (batch_size, m.img_size, m.img_size, m.in_chans), np.float32
        ),
        "context": jax.ShapeDtypeStruct((batch_size, m.num_clip_token, m.clip_dim), np.float32),
    }
    if m.name not in IMAGE_ONLY:
        side = m.img_size * m.map_patch_factor
        shapes["map"] = jax.ShapeDtypeStruct((batch_size, side, side), np.int32)
    return shapes


def synthetic_batch(
    config: Any, batch_size: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """A random batch in the training schema for the configured model."""
    batch = {}
    for name, shape in batch_shapes(config, batch_size).items():
        if name == "map":
            batch[name] = rng.integers(0, 201, shape.shape).astype(shape.dtype)
        else:
            batch[name] = rng.standard_normal(shape.shape).astype(shape.dtype)
    return batch


def build_program(
    config: Any,
    what: str,
    batch_size: int,
    steps: int | None,
    devices: Sequence[jax.Device] | None = None,
) -> tuple[Any, Callable[[], tuple[Any, ...]], Callable[[Any], Any]]:
    """One program of the configured model with its inputs, ready to lower.

    Args:
      config: a run spec (``specs.as_run_spec``).
      what: ``train_step`` (a full AdamW step), ``denoise`` (one network call, no CFG) or
        ``sample`` (the whole DPM-Solver++ sampler with CFG).
      batch_size: the global batch, sharded over a mesh of ``devices`` (default: all).
      steps: sampler steps (None: ``config.sampler.steps``).
      devices: the mesh's devices.

    Returns:
      ``(jitted_fn, args_fn, run)``: ``args_fn()`` gives the arguments to lower with;
      ``run(compiled)`` calls the compiled program once (threading the donated train state
      through).
    """
    mesh = sharding.create_mesh(config.sharding.mesh_shape, config.sharding.mesh_axes, devices)
    batch = sharding.shard_batch(
        synthetic_batch(config, batch_size, np.random.default_rng(0)), mesh
    )
    empty = jnp.zeros((config.model.num_clip_token, config.model.clip_dim), jnp.float32)
    rng = jax.random.key(config.seed)
    if what == "train_step":
        state, shardings = state_lib.create_train_state(config, rng, mesh)
        fn = step_lib.jit_train_step(config, mesh, shardings, state.params, empty)
        holder = {"state": state}

        def run(compiled):
            holder["state"], metrics = compiled(holder["state"], batch)
            return metrics

        return fn, (lambda: (holder["state"], batch)), run
    placed = param_shardings(config.model, mesh)
    params = jax.jit(functools.partial(models.init_params, config.model), out_shardings=placed)(rng)
    denoise = models.denoise_fn(config.model)
    has_map = config.model.has_map
    m_t = None
    if has_map:
        side = config.model.img_size * config.model.map_patch_factor
        m_t = jnp.zeros((batch_size, side, side, config.model.num_bits), jnp.float32)
    t = jnp.full((batch_size,), 500.0)
    if what == "denoise":
        options = runtime.inference_compiler_options(mesh)  # as the sampler's programs
        fn = sharding.MeshProgram(jax.jit(denoise, compiler_options=options), mesh)
        args = (params, batch["latent"], m_t, t, batch["context"])
        return fn, (lambda: args), (lambda compiled: compiled(*args))
    solver = dataclasses.replace(config.sampler, steps=steps) if steps else config.sampler
    spec = sampler_lib.ProgramSpec(
        config.model, config.diffusion, solver, "cogenerate", (0, 1), mesh, (False,) * 4
    )
    fn = sampler_lib.program(spec)  # the program Sampler runs (per-example seeds)
    seeds = jax.device_put(np.arange(batch_size, dtype=np.uint32), sharding.batch_sharding(mesh))
    args = (params, seeds, batch["context"], empty, None, None, None, None)
    return fn, (lambda: args), (lambda compiled: compiled(*args))


def flops_per_device(compiled: jax.stages.Compiled) -> tuple[float | None, int]:
    """XLA's FLOP count of one device's share of a compiled program, and the device count.

    ``cost_analysis()`` describes the one SPMD-partitioned module each device runs: its
    FLOPs are per device (measured on CPU: ``x @ w`` with ``x[64, 256]`` sharded by rows
    reports 8.4 MFLOP on 1 device, 4.2 on 2, 1.05 on 8). The devices are those of the
    program's input and output shardings.

    Returns:
      ``(flops or None where the backend reports none, device count)``.
    """
    shardings = jax.tree.leaves((compiled.input_shardings, compiled.output_shardings))
    num_devices = len({d for s in shardings for d in s.device_set}) or 1
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        flops = float(cost.get("flops", 0.0)) or None
    except Exception:  # cost analysis is best-effort: some backends do not report it
        flops = None
    return flops, num_devices
