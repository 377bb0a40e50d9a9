"""Mesh construction, the logical-axis rules and batch sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from configs import pdm as pdm_configs
from pdm_jax import models, sharding
from pdm_jax.models import layers


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


def test_state_bytes_per_device_counts_one_shard():
    mesh = sharding.create_mesh()
    x = jnp.ones((64, 4), jnp.float32)
    tree = {
        "sharded": jax.device_put(x, sharding.batch_sharding(mesh)),
        "replicated": jax.device_put(x, sharding.replicated(mesh)),
        "key": jax.device_put(jax.random.key(0), sharding.replicated(mesh)),
    }
    expected = 64 * 4 * 4 // 8 + 64 * 4 * 4 + 8
    assert sharding.bytes_per_device(tree) == expected
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree
    )
    assert sharding.bytes_per_device(abstract) == expected
    with pytest.raises(ValueError, match="no sharding"):
        sharding.bytes_per_device(jax.ShapeDtypeStruct((2,), jnp.float32))


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
