"""Tests of ``pdm_jax.benchmark`` on the tiny demo model (CPU)."""

import pytest

from configs import pdm as pdm_configs
from pdm_jax import benchmark


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
