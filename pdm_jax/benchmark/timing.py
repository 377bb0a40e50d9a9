"""Timing one compiled program of the model: ``run_benchmark``.

It compiles one of ``programs.WHATS``, makes untimed warm-up calls, then times
``repeats`` calls and returns one record: times, throughput, peak memory, FLOPs and MFU,
and what one device holds of the program's resident state (the fields are described by
``python -m pdm_jax.benchmark --help``).
"""

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

from pdm_jax import sharding, specs
from pdm_jax.benchmark import memory
from pdm_jax.benchmark.programs import build_program, flops_per_device

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


def _device_peak(device: jax.Device) -> tuple[int, str] | None:
    """The device allocator's peak, where the backend reports one (accelerators)."""
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device"
    return None


def run_benchmark(
    config: Any,
    what: str,
    batch_size: int,
    steps: int | None = None,
    repeats: int = 5,
    warmup: int = 1,
    devices: Sequence[jax.Device] | None = None,
    between: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """Compiles, warms up and times the program on ``devices`` (default: all).

    Args:
      config: the full config (or a run spec).
      what: one of ``programs.WHATS``.
      batch_size: the global batch.
      steps: sampler steps (None: ``config.sampler.steps``).
      repeats: timed calls.
      warmup: untimed calls after the first (compiling) one.
      devices: the mesh's devices.
      between: called after each timed call, outside its timing (e.g.
        ``DiffusersReference.time_call``, to alternate the reference's calls with ours).

    Returns:
      The result record (see ``python -m pdm_jax.benchmark --help``).
    """
    config = specs.as_run_spec(config)
    fn, args_fn, run = build_program(config, what, batch_size, steps, devices)
    state_bytes = sharding.bytes_per_device(args_fn()[0])  # before the step donates it
    t0 = time.perf_counter()
    compiled = fn.lower(*args_fn()).compile()
    jax.block_until_ready(run(compiled))
    compile_s = time.perf_counter() - t0
    flops, num_devices = flops_per_device(compiled)
    for _ in range(warmup):
        jax.block_until_ready(run(compiled))
    times = []
    with memory.phase_peak() as rss:  # the timed calls' own peak RSS
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(run(compiled))
            times.append(time.perf_counter() - t0)
            if between is not None:
                between()
    median = statistics.median(times)
    device = (list(devices) if devices else jax.devices())[0]
    peak, peak_source = _device_peak(device) or (rss.process_bytes, rss.source)
    run_peak = rss.phase_bytes if peak_source == rss.source else None
    record = {
        "what": what,
        "model": config.model.name,
        "batch_size": batch_size,
        "median_s": median,
        "min_s": min(times),
        "times_s": times,
        "items_per_s": batch_size / median,
        "first_call_s": compile_s,
        "repeats": repeats,
        "device": f"{device.platform}:{device.device_kind} x{num_devices}",
        "peak_memory_bytes": peak,
        "peak_memory_source": peak_source,
        "run_peak_memory_bytes": run_peak,
        "flops_per_device": flops,
        "flops_per_item": flops * num_devices / batch_size if flops else None,
        "state_bytes_per_device": state_bytes,
    }
    peak_flops = next((v for k, v in _PEAK_FLOPS.items() if k in device.device_kind), None)
    if flops and peak_flops:
        record["mfu"] = flops / median / peak_flops
    return record
