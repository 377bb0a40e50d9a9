"""Tests of ``pdm_jax.benchmark.programs``: the compiled programs and their FLOP counts (CPU)."""

import jax
import jax.numpy as jnp
import pytest

from configs import pdm as pdm_configs
from pdm_jax import runtime, sharding, specs
from pdm_jax.benchmark import programs, timing
from tests.models import small_unet


def _compile_denoise(config, devices=None):
    spec = specs.as_run_spec(config)
    fn, args_fn, _ = programs.build_program(spec, "denoise", 8, None, devices)
    return fn.lower(*args_fn()).compile()


def test_forward_programs_compile_with_the_cpu_inference_options(monkeypatch):
    config = small_unet.use_two_level_unet(pdm_configs.get_config("unet,tiny=1"))
    ours = _compile_denoise(config)
    monkeypatch.setattr(runtime, "inference_compiler_options", lambda mesh: None)
    default = _compile_denoise(config)
    # The memory scheduler: the UNet's temporaries shrink (SD-1: 281 -> 209 MB).
    temp = lambda c: c.memory_analysis().temp_size_in_bytes
    assert temp(ours) < temp(default)
    # On one device, no YNNPACK fusions, which XLA:CPU makes by default (and keeps on the
    # 8-device mesh).
    one = jax.devices()[:1]
    monkeypatch.undo()
    assert _compile_denoise(config, one).as_text().count("ynn_fusion") == 0
    assert ours.as_text().count("ynn_fusion") > 0
    # The options reach the sampler's programs and the denoise benchmark: a bad value fails
    # their compilation.
    bad = {"xla_cpu_scheduler_type": "NOT_A_SCHEDULER"}
    monkeypatch.setattr(runtime, "inference_compiler_options", lambda mesh: bad)
    demo = pdm_configs.get_config("demo,tiny=1")  # compiles in seconds
    for what in ("denoise", "sample"):
        with pytest.raises(Exception, match="not a valid enum value"):
            timing.run_benchmark(demo, what, batch_size=8, steps=3, repeats=1, warmup=0)


@pytest.mark.parametrize("num_devices", [1, 2, 8])
def test_total_flops_of_a_sharded_matmul(num_devices):
    # cost_analysis() of an SPMD program counts one device's share; the total must not.
    mesh = sharding.create_mesh(devices=jax.devices()[:num_devices])
    w = jax.device_put(jnp.ones((256, 256)), sharding.replicated(mesh))
    x = jax.device_put(jnp.ones((64, 256)), sharding.batch_sharding(mesh))
    compiled = jax.jit(lambda w, x: x @ w).lower(w, x).compile()
    flops, devices = programs.flops_per_device(compiled)
    assert (flops * devices, devices) == (2 * 64 * 256 * 256, num_devices)
