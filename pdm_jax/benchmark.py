r"""python -m pdm_jax.benchmark --config=configs/pdm.py:two_stream --what=train_step --batch_size=8

Times one jitted program of the configured model after a warm-up and prints one JSON
line last: ``median_s``, ``min_s``, ``items_per_s``, ``device``, ``peak_memory_bytes``
(device allocator peak where the backend reports one, else the process's peak RSS),
``flops_per_item`` (XLA cost analysis, which counts a loop body once: the chunked CPU
attention's ``lax.map`` is undercounted; summed over the devices, so work every device
repeats, such as ``train_step``'s update of replicated parameters, counts once per device)
and ``mfu`` when the device's peak is known.

``--what``: ``train_step`` (a full AdamW step; the two-stream image stream frozen),
``denoise`` (one network call, no CFG), ``sample`` (the whole DPM-Solver++ sampler with CFG,
``--steps`` steps).
"""

import dataclasses
import functools
import json
import resource
import statistics
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from pdm_jax import models, sharding, specs
from pdm_jax.sampling import sampler as sampler_lib
from pdm_jax.train import state as state_lib
from pdm_jax.train import step as step_lib

# Dense bf16/fp32 peaks (FLOP/s) for MFU, by device kind substring; CPUs are not listed.
_PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5": 459e12,
    "TPU v6": 918e12,
}


def synthetic_batch(
    config: Any, batch_size: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """A random batch in the training schema for the configured model."""
    m = config.model
    batch = {
        "latent": rng.standard_normal((batch_size, m.img_size, m.img_size, m.in_chans)).astype(
            np.float32
        ),
        "context": rng.standard_normal((batch_size, m.num_clip_token, m.clip_dim)).astype(
            np.float32
        ),
    }
    if m.name not in ("uvit", "unet"):
        side = m.img_size * m.map_patch_factor
        batch["map"] = rng.integers(0, 201, (batch_size, side, side)).astype(np.int32)
    return batch


def _program(
    config: Any,
    what: str,
    batch_size: int,
    steps: int | None,
    devices: Sequence[jax.Device] | None = None,
):
    """Returns ``(jitted_fn, args_fn, run)``.

    ``args_fn()`` gives the arguments to lower with; ``run(compiled)`` calls the compiled
    program once (threading the donated train state through). The batch is sharded over
    a mesh of ``devices`` (default: all).
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
    params = jax.jit(functools.partial(models.init_params, config.model))(rng)
    denoise = models.denoise_fn(config.model)
    has_map = config.model.has_map
    m_t = None
    if has_map:
        side = config.model.img_size * config.model.map_patch_factor
        m_t = jnp.zeros((batch_size, side, side, config.model.num_bits), jnp.float32)
    t = jnp.full((batch_size,), 500.0)
    if what == "denoise":
        fn = jax.jit(denoise)
        args = (params, batch["latent"], m_t, t, batch["context"])
        return fn, (lambda: args), (lambda compiled: compiled(*args))
    solver = dataclasses.replace(config.sampler, steps=steps) if steps else config.sampler
    spec = sampler_lib.ProgramSpec(
        config.model, config.diffusion, solver, "cogenerate", (0, 1), mesh, (False,) * 4
    )
    fn = sampler_lib.program(spec)  # the program Sampler runs (per-example seeds)
    params = jax.device_put(params, sharding.replicated(mesh))
    seeds = jax.device_put(np.arange(batch_size, dtype=np.uint32), sharding.batch_sharding(mesh))
    args = (params, seeds, batch["context"], empty, None, None, None, None)
    return fn, (lambda: args), (lambda compiled: compiled(*args))


def _peak_memory(device: jax.Device) -> tuple[int, str]:
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_rss"


def _total_flops(compiled: jax.stages.Compiled) -> tuple[float | None, int]:
    """XLA's FLOP count of a compiled program over all its devices, and their number.

    ``cost_analysis()`` describes the one SPMD-partitioned module each device runs: its
    FLOPs are per device (measured on CPU: ``x @ w`` with ``x[64, 256]`` sharded by rows
    reports 8.4 MFLOP on 1 device, 4.2 on 2, 1.05 on 8), so the total is that × the device
    count. The devices are those of the program's input and output shardings.
    """
    shardings = jax.tree.leaves((compiled.input_shardings, compiled.output_shardings))
    num_devices = len({d for s in shardings for d in s.device_set}) or 1
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        flops = float(cost.get("flops", 0.0)) or None
    except Exception:  # cost analysis is best-effort: some backends do not report it
        flops = None
    return (flops * num_devices if flops else None), num_devices


def run_benchmark(
    config: Any,
    what: str,
    batch_size: int,
    steps: int | None = None,
    repeats: int = 5,
    warmup: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> dict[str, Any]:
    """Compiles, warms up and times the program on ``devices`` (default: all).

    Returns:
      The result record (see the module docstring).
    """
    config = specs.as_run_spec(config)
    fn, args_fn, run = _program(config, what, batch_size, steps, devices)
    t0 = time.perf_counter()
    compiled = fn.lower(*args_fn()).compile()
    jax.block_until_ready(run(compiled))
    compile_s = time.perf_counter() - t0
    flops, num_devices = _total_flops(compiled)
    for _ in range(warmup):
        jax.block_until_ready(run(compiled))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run(compiled))
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    device = (list(devices) if devices else jax.devices())[0]
    peak, peak_source = _peak_memory(device)
    record = {
        "what": what,
        "model": config.model.name,
        "batch_size": batch_size,
        "median_s": median,
        "min_s": min(times),
        "items_per_s": batch_size / median,
        "first_call_s": compile_s,
        "repeats": repeats,
        "device": f"{device.platform}:{device.device_kind} x{num_devices}",
        "peak_memory_bytes": peak,
        "peak_memory_source": peak_source,
        "flops_per_item": flops / batch_size if flops else None,
    }
    peak_flops = next((v for k, v in _PEAK_FLOPS.items() if k in device.device_kind), None)
    if flops and peak_flops:
        record["mfu"] = flops / median / (peak_flops * num_devices)
    return record


def _define_flags() -> dict[str, flags.FlagHolder]:
    """The command-line flags, defined only when run as a program: importing this module
    (e.g. beside ``pdm_jax.data.coco.prepare``, which has its own ``--batch_size``) adds none.
    """
    return {
        "config": config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True),
        "what": flags.DEFINE_enum(
            "what", "train_step", ["train_step", "denoise", "sample"], "What to time."
        ),
        "batch_size": flags.DEFINE_integer("batch_size", 8, "Global batch size."),
        "steps": flags.DEFINE_integer(
            "steps", None, "Sampler steps (default: config.sampler.steps)."
        ),
        "repeats": flags.DEFINE_integer("repeats", 5, "Timed repeats after the warm-up."),
        "warmup": flags.DEFINE_integer("warmup", 1, "Untimed calls after compilation."),
    }


def main(argv: list[str], defined: dict[str, flags.FlagHolder]) -> None:
    """Runs the benchmark the flags describe and prints its JSON record."""
    del argv
    sharding.setup_cpu_devices(defined["config"].value, defined["batch_size"].value)
    record = run_benchmark(**{name: holder.value for name, holder in defined.items()})
    print(json.dumps(record))


if __name__ == "__main__":
    app.run(functools.partial(main, defined=_define_flags()))
