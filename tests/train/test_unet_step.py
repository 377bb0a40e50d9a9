"""Training steps of the tiny UNet PDMs: mesh independence, the frozen SD UNet."""

import jax
import numpy as np
import pytest
from flax import traverse_util

from pdm_jax import models
from tests.train import meshes


@pytest.mark.slow
def test_unet_one_stream_step_is_the_same_on_fsdp_and_tensor_meshes():
    name, ref_shape = "unet_one_stream", meshes.MESHES[0]  # (8, 1, 1): data only
    ref_state, ref = meshes.first_step(name, ref_shape)
    ref_params = jax.device_get(ref_state.params)
    for shape in ((1, 4, 2),):  # fsdp 4 × tensor 2 (also (2, 2, 2) passed; one compile less)
        state, metrics = meshes.first_step(name, shape)
        for key in ("loss", "image_loss", "map_loss", "grad_norm"):
            np.testing.assert_allclose(metrics[key], ref[key], rtol=2e-5, err_msg=f"{shape} {key}")
        # The meshes sum the gradients in other orders. Adam's first step is ±lr·g/(|g| + eps)
        # per element (lr = 1e-3), so where g is near eps (zero-initialised map_conv_in) a
        # rounding difference moves an element by up to ~lr/4 (2.3e-4 seen). A sharding bug
        # moves many elements (and grad_norm above would differ): allow 1 in 10,000.
        flat = lambda t: jax.tree.leaves(jax.device_get(t))
        off = sum(
            int(np.sum(np.abs(a - b) > 1e-5 + 1e-5 * np.abs(b)))
            for a, b in zip(flat(state.params), flat(ref_params), strict=True)
        )
        total = sum(a.size for a in flat(ref_params))
        assert off <= total // 10_000, (shape, off, total)
    # The conv kernels are split: fsdp over their input channels, tensor over the output.
    _, shardings, _ = meshes.program(name, (1, 4, 2))
    conv = shardings.params["down_blocks_1"]["resnets_0"]["conv1"]["kernel"]
    assert tuple(conv.spec) != () and not conv.is_fully_replicated


@pytest.mark.slow
def test_unet_two_stream_step_leaves_the_sd_unet_untouched():
    name = "unet_two_stream"
    before = traverse_util.flatten_dict(jax.device_get(meshes.initial(name).params), sep="/")
    state, metrics = meshes.first_step(name, (2, 2, 2))
    assert np.isfinite(metrics["loss"])
    after = traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
    frozen = traverse_util.flatten_dict(
        models.image_stream_mask(meshes.initial(name).params), sep="/"
    )
    image = [k for k in after if frozen[k]]
    other = [k for k in after if not frozen[k]]
    assert image and other and all(k.startswith(("map_", "zero_convs_")) for k in other)
    assert [k for k in image if not np.array_equal(before[k], after[k])] == []
    moved = [k for k in other if not np.array_equal(before[k], after[k])]
    assert len(moved) > 0.9 * len(other), sorted(set(other) - set(moved))
