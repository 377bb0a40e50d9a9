"""Tests of ``pdm_jax.benchmark`` on the tiny demo model (CPU)."""

import json
import statistics
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from configs import pdm as pdm_configs
from pdm_jax import benchmark, models, sharding, specs
from tests.cli import REPO, cpu_env
from tests.models import small_unet


@pytest.mark.parametrize("what", ["train_step", "denoise", "sample"])
def test_benchmark_record(what):
    config = pdm_configs.get_config("demo,tiny=1")
    # The batch is sharded over the 8 fake CPU devices of the test session.
    record = benchmark.run_benchmark(config, what, batch_size=8, steps=2, repeats=2, warmup=0)
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


def _compile_denoise(config, devices=None):
    spec = specs.as_run_spec(config)
    fn, args_fn, _ = benchmark._program(spec, "denoise", 8, None, devices)
    return fn.lower(*args_fn()).compile()


def test_forward_programs_compile_with_the_cpu_inference_options(monkeypatch):
    config = small_unet.use_two_level_unet(pdm_configs.get_config("unet,tiny=1"))
    ours = _compile_denoise(config)
    monkeypatch.setattr(sharding, "inference_compiler_options", lambda mesh: None)
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
    monkeypatch.setattr(sharding, "inference_compiler_options", lambda mesh: bad)
    demo = pdm_configs.get_config("demo,tiny=1")  # compiles in seconds
    for what in ("denoise", "sample"):
        with pytest.raises(Exception, match="not a valid enum value"):
            benchmark.run_benchmark(demo, what, batch_size=8, steps=3, repeats=1, warmup=0)


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


def test_state_bytes_per_device_counts_one_shard():
    mesh = sharding.create_mesh()
    x = jnp.ones((64, 4), jnp.float32)
    tree = {
        "sharded": jax.device_put(x, sharding.batch_sharding(mesh)),
        "replicated": jax.device_put(x, sharding.replicated(mesh)),
        "key": jax.device_put(jax.random.key(0), sharding.replicated(mesh)),
    }
    expected = 64 * 4 * 4 // 8 + 64 * 4 * 4 + 8
    assert benchmark.state_bytes_per_device(tree) == expected
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree
    )
    assert benchmark.state_bytes_per_device(abstract) == expected
    with pytest.raises(ValueError, match="no sharding"):
        benchmark.state_bytes_per_device(jax.ShapeDtypeStruct((2,), jnp.float32))


def test_count_collectives_of_a_compiled_program():
    mesh = sharding.create_mesh()
    x = jax.device_put(jnp.ones((64, 256)), sharding.batch_sharding(mesh))
    # The kernel sharded by columns is gathered for the row-sharded matmul; the sum of a
    # row-sharded result is reduced across devices.
    w = jax.device_put(jnp.ones((256, 256)), NamedSharding(mesh, PartitionSpec(None, "data")))
    compiled = jax.jit(lambda x, w: jnp.sum(x @ w)).lower(x, w).compile()
    counts = benchmark.count_collectives(compiled.as_text())
    assert counts["all-gather"] >= 1 and counts["all-reduce"] >= 1
    assert counts["all-to-all"] == counts["reduce-scatter"] == 0
    text = "%a = f32[8] all-gather-start(%p)\n%b = f32[1] reduce-scatter(%q), to_apply=%add"
    assert benchmark.count_collectives(text) == {
        "all-gather": 1,
        "reduce-scatter": 1,
        "all-reduce": 0,
        "all-to-all": 0,
        "collective-permute": 0,
    }


@pytest.mark.slow
def test_plan_data_parallel_vs_fsdp():
    def plan(mesh_shape):
        config = pdm_configs.get_config("uvit,tiny=1")
        config.sharding.mesh_shape = mesh_shape
        config.sharding.mesh_axes = ("data", "fsdp", "tensor")
        return benchmark.plan(config, batch_size=8)

    data, fsdp = plan((8, 1, 1)), plan((1, 8, 1))
    for record in (data, fsdp):
        assert record["devices"] == 8 and record["num_params"] == 42_404
        assert record["temp_bytes_per_device"] > 0 and record["flops_per_device"] > 0
        assert record["peak_bytes_per_device"] >= record["state_bytes_per_device"]
        # The state is donated: its outputs reuse the inputs' buffers.
        assert record["alias_bytes_per_device"] == record["state_bytes_per_device"]
    assert data["mesh_shape"] == {"data": 8, "fsdp": 1, "tensor": 1}
    # Params, EMA and Adam moments, float32, replicated over the data axis.
    assert data["state_bytes_per_device"] >= 16 * 42_404
    # Data parallelism averages the gradients across the batch shards.
    assert data["collectives"]["all-reduce"] >= 1
    assert fsdp["state_bytes_per_device"] <= data["state_bytes_per_device"]
    if fsdp["state_bytes_per_device"] < data["state_bytes_per_device"]:
        # Once the logical rules shard the state over fsdp (issue #14's sharding core):
        # every device gathers the parameters it computes with.
        assert fsdp["collectives"]["all-gather"] >= 1
    else:
        # Rules replicating every parameter (before the sharding core): nothing to gather.
        assert fsdp["collectives"]["all-gather"] == 0


def test_plan_names_a_unets_size_by_its_config():
    config = pdm_configs.get_config("unet_two_stream,tiny=1")
    record = benchmark.plan(config, batch_size=8, compile_step=False)
    assert record["unet_config"] == "tiny_sd1" and "embed_dim" not in record
    assert record["num_params"] == models.count_params(models.abstract_params(config.model))
    uvit = benchmark.plan(pdm_configs.get_config("uvit,tiny=1"), batch_size=8, compile_step=False)
    assert (uvit["embed_dim"], uvit["depth"]) == (32, 2) and "unet_config" not in uvit


def test_plan_command_makes_its_own_devices():
    # The test session has 8 devices; --devices=2 must give the plan a 2-device mesh.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pdm_jax.benchmark",
            "--what=plan",
            "--devices=2",
            "--batch_size=4",
            "--nocompile",
            "--config=configs/pdm.py:uvit,tiny=1",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        timeout=600,
    )
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["devices"] == 2 and np.prod(list(record["mesh_shape"].values())) == 2
    assert record["batch_size"] == 4 and record["num_params"] == 42_404
    # Replicated on a data-only mesh: params, EMA and Adam's moments in float32, and more.
    assert record["state_bytes_per_device"] >= 16 * 42_404
    assert "temp_bytes_per_device" not in record  # --nocompile: the state's layout only


def test_fake_devices_after_backends_exist_is_an_error():
    jax.devices()
    with pytest.raises(RuntimeError, match="already initialised"):
        benchmark.use_fake_cpu_devices(4)


@pytest.mark.torch
def test_denoise_against_diffusers_reports_the_ratio(tmp_path):
    pytest.importorskip("diffusers")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pdm_jax.benchmark",
            "--config=configs/pdm.py:unet,tiny=1",
            f"--config.model.unet_config={small_unet.two_level_config()}",
            "--what=denoise",
            "--batch_size=2",
            "--repeats=2",
            "--warmup=0",
            "--reference=diffusers",
        ],
        cwd=REPO,
        env=cpu_env(),  # the process's own devices, not the tests' 8
        capture_output=True,
        text=True,
        timeout=600,
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
        benchmark.diffusers_reference(pdm_configs.get_config("unet_one_stream,tiny=1"), 2)
    with pytest.raises(ValueError, match="compares the plain SD UNet"):
        benchmark.DiffusersReference(pdm_configs.get_config("unet_one_stream,tiny=1"), 2)


@pytest.mark.torch
def test_diffusers_reference_times_one_call_per_command_and_reports_failures():
    pytest.importorskip("diffusers")
    config = small_unet.use_two_level_unet(pdm_configs.get_config("unet,tiny=1"))
    with benchmark.DiffusersReference(config, batch_size=1, warmup=0) as ref:
        seconds = [ref.time_call() for _ in range(3)]
        record = ref.finish()
    assert record["times_s"] == pytest.approx(seconds)
    assert record["median_s"] == pytest.approx(statistics.median(seconds))
    # The back-to-back form times `repeats` calls without commands.
    assert len(benchmark.diffusers_reference(config, 1, repeats=2, warmup=0)["times_s"]) == 2
    # A process that dies says why (here: a config diffusers cannot build).
    broken = benchmark.DiffusersReference(config, batch_size=1, warmup=0)
    broken._request["unet_config"] = {**broken._request["unet_config"], "block_out_channels": [7]}
    with pytest.raises(RuntimeError, match="diffusers reference failed"), broken:
        pass
