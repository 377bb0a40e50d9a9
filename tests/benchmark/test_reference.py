"""Tests of ``pdm_jax.benchmark.reference``: diffusers' UNet timed beside ours (torch extra)."""

import json
import statistics

import pytest

from configs import pdm as pdm_configs
from pdm_jax import models
from pdm_jax.benchmark import reference
from tests.cli import cpu_env, run_module
from tests.models import small_unet


@pytest.mark.torch
def test_denoise_against_diffusers_reports_the_ratio(tmp_path):
    pytest.importorskip("diffusers")
    result = run_module(
        "pdm_jax.benchmark",
        "--config=configs/pdm.py:unet,tiny=1",
        f"--config.model.unet_config={small_unet.two_level_config()}",
        "--what=denoise",
        "--batch_size=2",
        "--repeats=2",
        "--warmup=0",
        "--reference=diffusers",
        env=cpu_env(),  # the process's own devices, not the tests' 8
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])
    ref = record["reference"]
    # The same UNet on the diffusers side: its parameter count is ours.
    config = small_unet.use_two_level_unet(pdm_configs.get_config("unet,tiny=1"))
    assert ref["diffusers_unet_params"] == models.count_params(models.abstract_params(config.model))
    assert ref["median_s"] > 0 and ref["peak_memory_bytes"] > 0
    # Its own peak (VmHWM of the fresh process), not the ru_maxrss it inherits from ours.
    assert ref["peak_memory_source"] == "process_vmhwm"
    assert ref["peak_memory_bytes"] != record["peak_memory_bytes"]
    assert record["time_ratio"] == pytest.approx(record["median_s"] / ref["median_s"])
    # Its calls alternate with ours: one timed call of its per one of ours.
    assert len(ref["times_s"]) == len(record["times_s"]) == 2
    assert ref["median_s"] == pytest.approx(statistics.median(ref["times_s"]))
    assert record["paired_time_ratio"] == pytest.approx(
        statistics.median(a / b for a, b in zip(record["times_s"], ref["times_s"], strict=True))
    )
    assert 0 < ref["run_peak_memory_bytes"] <= ref["peak_memory_bytes"]
    assert record["memory_ratio"] == pytest.approx(
        record["run_peak_memory_bytes"] / ref["run_peak_memory_bytes"]
    )
    assert record["process_memory_ratio"] == pytest.approx(
        record["peak_memory_bytes"] / ref["peak_memory_bytes"]
    )
    with pytest.raises(ValueError, match="compares the plain SD UNet"):
        reference.diffusers_reference(pdm_configs.get_config("unet_one_stream,tiny=1"), 2)
    with pytest.raises(ValueError, match="compares the plain SD UNet"):
        reference.DiffusersReference(pdm_configs.get_config("unet_one_stream,tiny=1"), 2)


@pytest.mark.torch
def test_diffusers_reference_times_one_call_per_command_and_reports_failures():
    pytest.importorskip("diffusers")
    config = small_unet.use_two_level_unet(pdm_configs.get_config("unet,tiny=1"))
    with reference.DiffusersReference(config, batch_size=1, warmup=0) as ref:
        seconds = [ref.time_call() for _ in range(3)]
        record = ref.finish()
    assert record["times_s"] == pytest.approx(seconds)
    assert record["median_s"] == pytest.approx(statistics.median(seconds))
    # The back-to-back form times `repeats` calls without commands.
    assert len(reference.diffusers_reference(config, 1, repeats=2, warmup=0)["times_s"]) == 2
    # A process that dies says why (here: a config diffusers cannot build).
    broken = reference.DiffusersReference(config, batch_size=1, warmup=0)
    broken._request["unet_config"] = {**broken._request["unet_config"], "block_out_channels": [7]}
    with pytest.raises(RuntimeError, match="diffusers reference failed"), broken:
        pass
