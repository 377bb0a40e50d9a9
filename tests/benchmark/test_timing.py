"""Tests of ``pdm_jax.benchmark.timing`` on the tiny demo model (CPU)."""

import jax
import pytest

from configs import pdm as pdm_configs
from pdm_jax import models
from pdm_jax.benchmark import timing


@pytest.mark.parametrize("what", ["train_step", "denoise", "sample"])
def test_benchmark_record(what):
    config = pdm_configs.get_config("demo,tiny=1")
    # The batch is sharded over the 8 fake CPU devices of the test session.
    record = timing.run_benchmark(config, what, batch_size=8, steps=2, repeats=2, warmup=0)
    assert record["what"] == what and record["model"] == "one_stream"
    assert 0 < record["min_s"] <= record["median_s"]
    assert record["items_per_s"] == pytest.approx(8 / record["median_s"])
    assert record["device"].startswith("cpu")
    assert record["peak_memory_source"] == "process_vmhwm" and record["peak_memory_bytes"] > 0
    # The timed calls' own peak (reset after the warm-up) lies within the process's.
    assert 0 < record["run_peak_memory_bytes"] <= record["peak_memory_bytes"]
    assert record["flops_per_item"] == pytest.approx(record["flops_per_device"] * 8 / 8)
    assert "mfu" not in record  # no known peak for CPUs
    # On the data-only mesh every device holds all of it, float32.
    params = 4 * models.count_params(models.abstract_params(config.model))
    if what == "train_step":  # params, EMA params, Adam's two moments, step, rng, counts
        assert 4 * params <= record["state_bytes_per_device"] < 4 * params + 1024
    else:
        assert record["state_bytes_per_device"] == params


def test_flops_per_item_does_not_depend_on_the_device_count():
    # Before the fix, 8 devices reported an eighth of the 1-device figure.
    def flops_per_item(devices):
        config = pdm_configs.get_config("demo,tiny=1")
        record = timing.run_benchmark(
            config, "denoise", batch_size=8, repeats=1, warmup=0, devices=devices
        )
        assert record["device"].endswith(f"x{len(devices)}")
        return record["flops_per_item"]

    assert flops_per_item(jax.devices()) == pytest.approx(
        flops_per_item(jax.devices()[:1]), rel=1e-2
    )
