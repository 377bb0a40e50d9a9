"""Tests of ``pdm_jax.benchmark`` on the tiny demo model (CPU)."""

import jax
import jax.numpy as jnp
import pytest

from configs import pdm as pdm_configs
from pdm_jax import benchmark, sharding


@pytest.mark.parametrize("what", ["train_step", "denoise", "sample"])
def test_benchmark_record(what):
    config = pdm_configs.get_config("demo,tiny=1")
    # The batch is sharded over the 8 fake CPU devices of the test session.
    record = benchmark.run_benchmark(config, what, batch_size=8, steps=2, repeats=2, warmup=0)
    assert record["what"] == what and record["model"] == "one_stream"
    assert 0 < record["min_s"] <= record["median_s"]
    assert record["items_per_s"] == pytest.approx(8 / record["median_s"])
    assert record["device"].startswith("cpu")
    assert record["peak_memory_source"] == "process_rss" and record["peak_memory_bytes"] > 0
    assert record["flops_per_item"] > 0
    assert "mfu" not in record  # no known peak for CPUs


@pytest.mark.parametrize("num_devices", [1, 2, 8])
def test_total_flops_of_a_sharded_matmul(num_devices):
    # cost_analysis() of an SPMD program counts one device's share; the total must not.
    mesh = sharding.create_mesh(devices=jax.devices()[:num_devices])
    w = jax.device_put(jnp.ones((256, 256)), sharding.replicated(mesh))
    x = jax.device_put(jnp.ones((64, 256)), sharding.batch_sharding(mesh))
    compiled = jax.jit(lambda w, x: x @ w).lower(w, x).compile()
    flops, devices = benchmark._flops_per_device(compiled)
    assert (flops * devices, devices) == (2 * 64 * 256 * 256, num_devices)


def test_flops_per_item_does_not_depend_on_the_device_count():
    # Before the fix, 8 devices reported an eighth of the 1-device figure.
    def flops_per_item(devices):
        config = pdm_configs.get_config("demo,tiny=1")
        record = benchmark.run_benchmark(
            config, "denoise", batch_size=8, repeats=1, warmup=0, devices=devices
        )
        assert record["device"].endswith(f"x{len(devices)}")
        return record["flops_per_item"]

    assert flops_per_item(jax.devices()) == pytest.approx(
        flops_per_item(jax.devices()[:1]), rel=1e-2
    )
