"""Host CPU device splitting (``sharding.cpu_devices``) and mesh construction."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from configs import pdm as pdm_configs
from pdm_jax import models, sharding
from pdm_jax.models import layers


@pytest.mark.parametrize(
    ("requested", "batch", "cores", "want"),
    [
        (0, 16, 2, 0),  # keep JAX's one device
        (-1, 16, 2, 2),  # one per core
        (-1, 16, 3, 2),  # reduced to a divisor of the batch
        (-1, 12, 5, 4),
        (-1, 7, 4, 1),
        (4, 16, 2, 4),  # explicit counts are taken as given
    ],
)
def test_host_cpu_devices(requested, batch, cores, want):
    assert sharding.host_cpu_devices(requested, batch, cores=cores) == want


@pytest.mark.parametrize(("requested", "match"), [(3, "divide the batch"), (-2, "use 0, -1")])
def test_host_cpu_devices_rejects_bad_counts(requested, match):
    with pytest.raises(ValueError, match=match):
        sharding.host_cpu_devices(requested, 16, cores=2)


def test_cpu_devices_are_not_changed_once_backends_exist(caplog):
    jax.devices()  # initialises the backends (8 fake devices, see conftest)
    assert not sharding.use_cpu_devices(2)
    config = pdm_configs.get_config("demo")
    config.sharding.cpu_devices = 2
    assert sharding.setup_cpu_devices(config, 16) == 2
    assert "sharding.cpu_devices=2 not applied" in caplog.text
    assert jax.device_count() == 8


@pytest.mark.parametrize(("mode", "want"), [("train", 8), ("evaluate", 6), ("sample", 4)])
def test_mode_batch_size_is_the_batch_the_mode_shards(mode, want):
    config = pdm_configs.get_config("demo")
    config.train.batch_size, config.eval.batch_size, config.sample.batch_size = 8, 6, 4
    assert sharding.mode_batch_size(config, mode) == want


def test_mode_batch_size_rejects_unknown_modes():
    with pytest.raises(ValueError, match="Unknown mode 'serve'"):
        sharding.mode_batch_size(pdm_configs.get_config("demo"), "serve")


def test_no_batch_means_no_split(caplog):
    config = pdm_configs.get_config("demo")
    config.sharding.cpu_devices = 3  # would not divide any of the demo's batches
    assert sharding.setup_cpu_devices(config, None) == 0
    assert "not applied" not in caplog.text


_PROBE = """
import os, sys, jax
from pdm_jax import sharding
if "--devices-first" in sys.argv:
    jax.devices()  # initialises the backends before the split is asked for
applied = sharding.use_cpu_devices(2)
mesh = sharding.create_mesh()
print(applied, jax.device_count(), mesh.shape["data"], os.environ.get("XLA_FLAGS", ""))
"""


def _probe(xla_flags: str, *args: str) -> list[str]:
    env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, *args], env=env, capture_output=True, text=True, check=True
    )
    return [*out.stdout.split(maxsplit=3), ""][:4]


def test_a_fresh_process_gets_single_threaded_devices_on_the_data_axis():
    applied, count, data, flags = _probe("")
    assert (applied, count, data) == ("True", "2", "2")
    assert "--xla_cpu_multi_thread_eigen=false" in flags


def test_an_explicit_xla_device_count_wins():
    applied, count, data, _ = _probe("--xla_force_host_platform_device_count=3")
    assert (applied, count, data) == ("False", "3", "3")


def test_a_process_whose_backends_exist_keeps_its_devices_and_flags():
    # No XLA_FLAGS device count here: only JAX's refusal to change jax_num_cpu_devices
    # after initialisation (a RuntimeError) stops the split.
    applied, count, data, flags = _probe("", "--devices-first")
    assert (applied, count, data, flags) == ("False", "1", "1", "")


# The mesh and the logical-axis rules.


def test_create_mesh_fills_the_minus_one_and_checks_the_shape():
    mesh = sharding.create_mesh((2, -1, 2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(sharding.create_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert dict(sharding.create_mesh((1, 4), ("fsdp", "tensor"), jax.devices()[4:]).shape) == {
        "fsdp": 1,
        "tensor": 4,
    }
    with pytest.raises(ValueError, match="needs 12 devices"):
        sharding.create_mesh((3, 2, 2))
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.create_mesh((-1, -1, 1))
    with pytest.raises(ValueError, match="differ in length"):
        sharding.create_mesh((-1, 1), sharding.MESH_AXES)
    with pytest.raises(ValueError, match="each must be one of"):
        sharding.create_mesh((-1, 1), ("data", "model"))
    # Sampling keeps the model axes and fills data with this process's devices.
    assert dict(sharding.local_mesh((1, 2, 2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}


def test_the_batch_splits_over_data_and_fsdp():
    mesh = sharding.create_mesh((2, 2, 2))
    assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))
    assert sharding.batch_shards(mesh) == 4
    x = sharding.shard_batch({"x": np.arange(8.0).reshape(8, 1)}, mesh)["x"]
    assert {s.data.shape for s in x.addressable_shards} == {(2, 1)}
    old = sharding.create_mesh((-1,), ("data",))
    assert sharding.batch_sharding(old).spec == P(("data",))


def test_mesh_spec_follows_the_rules_and_replicates_what_does_not_divide():
    mesh = sharding.create_mesh((1, 4, 2))
    qkv = P("embed", None, "heads", "kv")
    assert sharding.mesh_spec(qkv, (64, 3, 8, 8), mesh) == P("fsdp", None, "tensor")
    assert sharding.mesh_spec(qkv, (64, 3, 3, 8), mesh) == P("fsdp")  # 3 heads on 2: whole
    # fsdp that does not divide its dimension moves to the largest free one it divides.
    assert sharding.mesh_spec(qkv, (6, 3, 8, 8), mesh) == P(None, None, "tensor", "fsdp")
    assert sharding.mesh_spec(qkv, (6, 3, 8, 6), mesh) == P(None, None, "tensor")  # none
    assert sharding.mesh_spec(P("mlp", "embed"), (256, 64), mesh) == P("tensor", "fsdp")
    conv = P(None, None, "conv_in", "conv_out")
    assert sharding.mesh_spec(conv, (3, 3, 8, 6), mesh) == P(None, None, "fsdp")  # 6 on 4
    assert sharding.mesh_spec(conv, (3, 3, 6, 6), mesh) == P()  # nothing divides: whole
    # U-ViT-H on 256 devices: width 1152 does not divide, the MLP's 4608 hidden units do.
    h256 = jax.sharding.AbstractMesh((1, 256, 1), sharding.MESH_AXES)
    assert sharding.mesh_spec(P("embed", "mlp"), (1152, 4608), h256) == P(None, "fsdp")
    assert sharding.mesh_spec(P("embed"), (1152,), h256) == P()
    assert sharding.mesh_spec(conv, (2, 2, 4, 64), mesh) == P(None, None, None, "fsdp")
    # An activation: the batch takes data and fsdp first, so embed stays whole.
    assert nn.logical_to_mesh_axes(("batch", "length", "embed"), sharding.rules_for(mesh)) == P(
        "fsdp", None, None
    )
    # Size-1 axes and axes the mesh lacks are dropped from the rules.
    data_only = sharding.create_mesh((8, 1, 1))
    assert sharding.mesh_spec(qkv, (64, 3, 8, 8), data_only) == P()
    abstract = {"w": jax.ShapeDtypeStruct((64, 256), jnp.float32)}
    shardings = sharding.named_shardings({"w": P("embed", "mlp")}, abstract, mesh)
    assert shardings["w"].spec == P("fsdp", "tensor")
    assert sharding.bytes_per_device(abstract, shardings) == 64 * 256 * 4 // 8


def _logical_names(tree) -> set[str]:
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, P))
    return {name for spec in leaves for name in spec if isinstance(name, str)}


def test_every_logical_name_of_every_model_has_a_rule():
    ruled = {name for name, _ in sharding.LOGICAL_AXIS_RULES}
    assert len(ruled) == len(sharding.LOGICAL_AXIS_RULES)  # one rule per name
    used = set()
    for name in ("uvit", "one_stream", "two_stream"):
        for arg in (name, f"{name},tiny=1"):  # full size: shapes only (eval_shape)
            used |= _logical_names(models.param_logical_axes(pdm_configs.get_config(arg).model))
    activations = (layers.ACT_AXES, layers.HEAD_AXES, layers.MLP_AXES, layers.FEATURE_AXES)
    used |= {a for axes in activations for a in axes if a}
    assert {"embed", "mlp", "heads", "kv", "conv_in", "conv_out", "batch", "length"} <= used
    assert used <= ruled, used - ruled


def test_inference_compiler_options_only_for_cpu_meshes():
    mesh = sharding.create_mesh()  # the tests' 8 CPU devices: YNNPACK stays
    assert sharding.inference_compiler_options(mesh) == sharding.CPU_INFERENCE_OPTIONS
    one = sharding.create_mesh(devices=jax.devices()[:1])
    assert sharding.inference_compiler_options(one) == {
        **sharding.CPU_INFERENCE_OPTIONS,
        "xla_cpu_experimental_ynn_fusion_type": "",
    }

    class Device:
        platform = "tpu"

    class Mesh:
        devices = np.array([Device()])

    assert sharding.inference_compiler_options(Mesh()) is None
