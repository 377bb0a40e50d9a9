"""PDMs on the SD UNet: at initialisation ε equals the plain UNet's; map in/out shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs.pdm import get_config
from pdm_jax import models
from pdm_jax.models.unet_pdm import depth_to_space, is_image_stream, space_to_depth
from tests.models.small_unet import ZERO_INIT, random_params


def test_space_to_depth_round_trip():
    m = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
    s = space_to_depth(m, 2)
    assert s.shape == (2, 4, 4, 12)
    np.testing.assert_array_equal(s[0, 1, 2, :3], m[0, 2, 4])  # (f1, f2, C) channel order
    np.testing.assert_array_equal(s[0, 1, 2, 9:], m[0, 3, 5])
    np.testing.assert_array_equal(depth_to_space(s, 2), m)


@pytest.mark.parametrize("name", ["unet_one_stream", "unet_two_stream"])
def test_at_init_eps_equals_the_plain_unet(name):
    plain_cfg = get_config("unet,sd=2,tiny=1").model
    cfg = get_config(f"{name},sd=2,tiny=1,map_patch_factor=2").model
    plain = random_params(plain_cfg, 0)
    params = models.merge_image_stream(random_params(cfg, 1), plain)
    assert {k for k in params if is_image_stream(k)} == set(plain)
    x, m, t, ctx = models.example_inputs(cfg, 2)
    rng = np.random.default_rng(2)
    x, m, ctx = (rng.standard_normal(a.shape).astype(np.float32) for a in (x, m, ctx))
    t = jnp.array([3.0, 700.0])
    # Eager (op by op): the two programs run the image stream's ops on the same values.
    eps, map0 = models.denoise_fn(cfg)(params, x, m, t, ctx)
    eps_plain = models.denoise_fn(plain_cfg)(plain, x, None, t, ctx)
    np.testing.assert_array_equal(np.asarray(eps), np.asarray(eps_plain))
    assert map0.shape == m.shape and float(jnp.abs(map0).max()) < 1.0
    assert float(jnp.std(map0)) > 1e-3  # the map head reads the features
    # The map reaches ε once the couplings are non-zero.
    flat = traverse_util.flatten_dict(params)
    moved = traverse_util.unflatten_dict(
        {p: (v + 0.05 if p[0].startswith(ZERO_INIT) else v) for p, v in flat.items()}
    )
    eps_moved, _ = models.denoise_fn(cfg)(moved, x, m, t, ctx)
    assert float(jnp.abs(eps_moved - eps).max()) > 1e-3


def test_two_stream_width_multiplier_and_errors():
    cfg = get_config("unet_two_stream,tiny=1,map_patch_factor=1").model
    full = models.count_params(models.abstract_params(cfg))
    cfg.map_width_multiplier = 0.5
    half = traverse_util.flatten_dict(models.abstract_params(cfg))
    assert half[("map_conv_in", "kernel")].shape == (3, 3, 8, 8)  # 16 channels × 0.5
    assert models.count_params(half) < full
    cfg.map_width_multiplier = 0.3
    with pytest.raises(ValueError, match=r"map_width_multiplier=0\.3 gives 5 channels"):
        models.abstract_params(cfg)
    cfg = get_config("unet_one_stream,tiny=1,map_patch_factor=2").model
    model, params = models.build(cfg), models.abstract_params(cfg)
    x, m, t, ctx = models.example_inputs(cfg, 1)
    with pytest.raises(ValueError, match="m_t has shape"):
        jax.eval_shape(model.apply, {"params": params}, x, m[:, :8, :8], t, ctx)
    with pytest.raises(ValueError, match="needs a map input"):
        jax.eval_shape(model.apply, {"params": params}, x, None, t, ctx)


def test_two_stream_freezes_exactly_the_sd_unet_and_init_from_merges_it():
    from pdm_jax import specs
    from pdm_jax.train import init as init_lib
    from pdm_jax.train import state as state_lib

    run = specs.from_config(get_config("unet_two_stream,tiny=1,map_patch_factor=1"))
    assert run.ckpt.freeze_image_stream
    abstract = models.abstract_params(run.model)
    labels = traverse_util.flatten_dict(state_lib.trainable_labels(run, abstract))
    plain = models.abstract_params(get_config("unet,tiny=1").model)
    frozen = {p for p, label in labels.items() if label == "frozen"}
    assert frozen == set(traverse_util.flatten_dict(plain))
    assert any(p[0].startswith("map_") for p in labels) and any(
        p[0].startswith("zero_convs_") for p in labels
    )
    # ckpt.init_from = a converted plain UNet fills the image stream of both PDMs.
    for name in ("unet_two_stream", "unet_one_stream"):
        run = specs.from_config(get_config(f"{name},tiny=1,map_patch_factor=1"))
        merge = init_lib.initial_params_fn(run, plain, "sd-unet")
        merged = jax.eval_shape(merge, jax.random.key(0), plain)
        assert jax.tree.map(lambda a: a.shape, merged) == jax.tree.map(
            lambda a: a.shape, models.abstract_params(run.model)
        )
