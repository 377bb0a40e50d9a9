"""Tests of ``pdm_jax.benchmark.plan``: compiled sharded train steps, not run (CPU)."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from configs import pdm as pdm_configs
from pdm_jax import models, sharding
from pdm_jax.benchmark import plan as plan_lib


def test_count_collectives_of_a_compiled_program():
    mesh = sharding.create_mesh()
    x = jax.device_put(jnp.ones((64, 256)), sharding.batch_sharding(mesh))
    # The kernel sharded by columns is gathered for the row-sharded matmul; the sum of a
    # row-sharded result is reduced across devices.
    w = jax.device_put(jnp.ones((256, 256)), NamedSharding(mesh, PartitionSpec(None, "data")))
    compiled = jax.jit(lambda x, w: jnp.sum(x @ w)).lower(x, w).compile()
    counts = plan_lib.count_collectives(compiled.as_text())
    assert counts["all-gather"] >= 1 and counts["all-reduce"] >= 1
    assert counts["all-to-all"] == counts["reduce-scatter"] == 0
    text = "%a = f32[8] all-gather-start(%p)\n%b = f32[1] reduce-scatter(%q), to_apply=%add"
    assert plan_lib.count_collectives(text) == {
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
        return plan_lib.plan(config, batch_size=8)

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
        # Logical rules that shard the state over fsdp: every device gathers the
        # parameters it computes with.
        assert fsdp["collectives"]["all-gather"] >= 1
    else:
        # Rules that replicate every parameter: nothing to gather.
        assert fsdp["collectives"]["all-gather"] == 0


def test_plan_names_a_unets_size_by_its_config():
    config = pdm_configs.get_config("unet_two_stream,tiny=1")
    record = plan_lib.plan(config, batch_size=8, compile_step=False)
    assert record["unet_config"] == "tiny_sd1" and "embed_dim" not in record
    assert record["num_params"] == models.count_params(models.abstract_params(config.model))
    uvit = plan_lib.plan(pdm_configs.get_config("uvit,tiny=1"), batch_size=8, compile_step=False)
    assert (uvit["embed_dim"], uvit["depth"]) == (32, 2) and "unet_config" not in uvit


def test_fake_devices_after_backends_exist_is_an_error():
    jax.devices()
    with pytest.raises(RuntimeError, match="already initialised"):
        plan_lib.use_fake_cpu_devices(4)
