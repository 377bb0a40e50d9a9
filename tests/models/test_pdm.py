"""One- and two-stream PDMs: shapes, official counts, init equivalence, given-map mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from configs.pdm import get_config
from pdm_jax import models
from pdm_jax.models.pdm import fuse_tokens
from pdm_jax.models.uvit import UViTSpec

PDMS = ("one_stream", "two_stream")


def _cfg(name, **overrides):
    cfg = get_config(f"{name},tiny=1").model
    cfg.update(overrides)
    return cfg


def _random_params(cfg, seed=0):
    """Random parameters of the right shapes without compiling an initialiser."""
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(models.abstract_params(cfg))
    return traverse_util.unflatten_dict(
        {
            p: (float(p[-1] == "scale") + 0.1 * rng.standard_normal(v.shape)).astype(v.dtype)
            for p, v in flat.items()
        }
    )


def _inputs(cfg, batch=2, seed=0):
    x, m, t, ctx = models.example_inputs(cfg, batch)
    k = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(k[0], x.shape)
    m = jnp.sign(jax.random.normal(k[1], m.shape)) + 2.0 * jax.random.normal(k[2], m.shape)
    t = jnp.array([7.0, 640.0][:batch])
    return x, m, t, jax.random.normal(k[3], ctx.shape)


@pytest.mark.parametrize("given", [False, True])
@pytest.mark.parametrize("factor", [1, 2, 4])
@pytest.mark.parametrize("name", PDMS)
def test_output_shapes(name, factor, given):
    cfg = _cfg(name, map_patch_factor=factor, use_given_map=given)
    params = models.abstract_params(cfg)
    out = jax.eval_shape(models.build(cfg).apply, {"params": params}, *_inputs(cfg, 2))
    side = 8 * factor
    assert [o.shape for o in out] == [(2, 8, 8, 4), (2, side, side, 8)]
    assert [o.dtype for o in out] == [jnp.float32, jnp.float32]
    fp = 2 * factor
    assert params["mask_embed"]["proj"]["kernel"].shape == (fp, fp, 8, 32)
    assert params["decoder_pred_mask"]["kernel"].shape == (32, fp * fp * 8)
    # Given-map mode keeps the official parameter set.
    other = models.abstract_params(_cfg(name, map_patch_factor=factor, use_given_map=not given))
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(other)


@pytest.mark.parametrize(
    ("name", "count"), [("one_stream", 44_874_508), ("two_stream", 95_813_388)]
)
def test_param_count_uvit_s(name, count):
    cfg = get_config(name).model
    cfg.map_patch_factor = 1
    params = models.abstract_params(cfg)
    assert models.count_params(params) == count
    if name == "two_stream":
        zero_convs = {k for k in params if k.startswith("zero_convs_")}
        assert zero_convs == {f"zero_convs_{j}" for j in range(26)}
        assert params["pos_embed"].shape == (1, 78 + 256, 512)
        assert params["pos_embed_mask"].shape == (1, 256, 512)
        image = {k: v for k, v in params.items() if models.is_image_stream(k)}
        assert models.count_params(image) == 44_692_644
    else:
        assert params["pos_embed"].shape == (1, 78 + 2 * 256, 512)


@pytest.fixture(scope="module")
def two_stream():
    cfg = _cfg("two_stream")
    return cfg, models.init_params(cfg, jax.random.key(0)), jax.jit(models.build(cfg).apply)


def test_two_stream_at_init_equals_plain_uvit(two_stream):
    cfg, params, apply = two_stream
    for j in range(6):
        np.testing.assert_array_equal(params[f"zero_convs_{j}"]["conv"]["kernel"], 0.0)
        np.testing.assert_array_equal(params[f"zero_convs_{j}"]["conv"]["bias"], 0.0)
    assert abs(float(params["pos_embed_mask"].std()) - 0.02) < 0.003
    ucfg = _cfg("uvit")
    uvit_params = _random_params(ucfg, seed=42)
    merged = models.merge_image_stream(params, uvit_params)
    x, m, t, ctx = _inputs(cfg)
    eps, map0 = apply({"params": merged}, x, m, t, ctx)
    want = jax.jit(models.build(ucfg).apply)({"params": uvit_params}, x, None, t, ctx)
    np.testing.assert_allclose(eps, want, rtol=0, atol=1e-6)
    assert bool(jnp.all(jnp.abs(map0) < 1.0))
    # Zero convs at init: the map cannot move the image output.
    eps_other_map, _ = apply({"params": merged}, x, -m, t, ctx)
    np.testing.assert_array_equal(eps_other_map, eps)


def _perturb(params, keys):
    """Adds noise to the top-level entries ``keys``."""
    out = dict(params)
    for i, k in enumerate(keys):
        leaves, tree = jax.tree_util.tree_flatten(params[k])
        rng = jax.random.split(jax.random.key(i), len(leaves))
        out[k] = jax.tree_util.tree_unflatten(
            tree, [a + jax.random.normal(r, a.shape) for a, r in zip(leaves, rng, strict=True)]
        )
    return out


def test_two_stream_zero_convs_and_unused_parameters(two_stream):
    cfg, params, apply = two_stream
    x, m, t, ctx = _inputs(cfg)
    used = [f"zero_convs_{j}" for j in (1, 3, 5)]
    live = _perturb(params, used)
    eps, map0 = apply({"params": live}, x, m, t, ctx)
    eps_other_map, _ = apply({"params": live}, x, -m, t, ctx)
    assert not np.allclose(eps, eps_other_map)  # map → image path is live
    unused = ["mask_embed_0", "zero_convs_0", "zero_convs_2", "zero_convs_4"]
    assert set(unused) < set(params)
    eps2, map2 = apply({"params": _perturb(live, unused)}, x, m, t, ctx)
    np.testing.assert_array_equal(eps2, eps)
    np.testing.assert_array_equal(map2, map0)


@pytest.mark.parametrize("name", PDMS)
def test_given_map_returns_input_map_and_uses_it(name):
    cfg = _cfg(name, use_given_map=True)
    params = _random_params(cfg)
    apply = jax.jit(models.build(cfg).apply)
    x, m, t, ctx = _inputs(cfg)
    eps, map0 = apply({"params": params}, x, m, t, ctx)
    np.testing.assert_array_equal(map0, m)
    eps_other, map_other = apply({"params": params}, x, -m, t, ctx)
    np.testing.assert_array_equal(map_other, -m)
    assert not np.allclose(eps, eps_other)


def test_one_stream_forward():
    cfg = _cfg("one_stream", map_patch_factor=2)
    params = _random_params(cfg)
    x, m, t, ctx = _inputs(cfg)
    eps, map0 = jax.jit(models.build(cfg).apply)({"params": params}, x, m, t, ctx)
    assert eps.shape == x.shape and map0.shape == m.shape
    assert bool(jnp.all(jnp.isfinite(eps))) and bool(jnp.all(jnp.abs(map0) < 1.0))
    with pytest.raises(ValueError, match="needs a map"):
        models.build(cfg).apply({"params": params}, x, None, t, ctx)
    with pytest.raises(ValueError, match="m_t has shape"):
        models.build(cfg).apply({"params": params}, x, m[:, :8, :8], t, ctx)


def test_image_stream_mask_and_merge_errors():
    cfg = _cfg("two_stream")
    params = models.abstract_params(cfg)
    mask = models.image_stream_mask(params)
    flat_mask = traverse_util.flatten_dict(mask)
    flat = traverse_util.flatten_dict(params)
    frozen = {p: v for p, v in flat.items() if flat_mask[p]}
    uvit = traverse_util.flatten_dict(models.abstract_params(_cfg("uvit")))
    assert {p: v.shape for p, v in frozen.items()} == {p: v.shape for p, v in uvit.items()}
    assert not any(flat_mask[p] for p in flat if p[0].endswith("_mask") or "zero_convs" in p[0])
    with pytest.raises(ValueError, match="pos_embed: shape"):
        models.merge_image_stream(params, models.abstract_params(_cfg("uvit", img_size=16)))
    with pytest.raises(ValueError, match="missing from uvit_params: out_blocks_0"):
        models.merge_image_stream(
            params, {k: v for k, v in models.abstract_params(_cfg("uvit")).items() if k[0] != "o"}
        )


def test_token_fusion_starts_as_the_papers_one_stream():
    fused_cfg = _cfg("one_stream", token_fusion=True, map_patch_factor=2)
    plain_cfg = _cfg("one_stream", map_patch_factor=2)
    x, m, t, ctx = _inputs(fused_cfg)
    fused = jax.jit(models.build(fused_cfg).init)(jax.random.key(3), x, m, t, ctx)["params"]
    fused = nn.meta.unbox(fused)
    extra = set(fused) - set(models.abstract_params(plain_cfg))
    assert extra == {"map_to_image", "image_to_map"}
    for name in extra:  # D×D kernels and D biases, all zero at initialisation
        assert fused[name]["kernel"].shape == (32, 32) and fused[name]["bias"].shape == (32,)
        assert not np.any(fused[name]["kernel"]) and not np.any(fused[name]["bias"])
    plain = {k: v for k, v in fused.items() if k not in extra}
    got = jax.jit(models.build(fused_cfg).apply)({"params": fused}, x, m, t, ctx)
    want = jax.jit(models.build(plain_cfg).apply)({"params": plain}, x, m, t, ctx)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    axes = traverse_util.flatten_dict(models.param_logical_axes(fused_cfg))
    assert tuple(axes[("map_to_image", "kernel")]) == (None, "embed")


def test_token_fusion_adds_each_patchs_other_token():
    """``fuse_tokens`` against its closed form: img + mp·W₁ + b₁, mp + img·W₂ + b₂."""
    spec = UViTSpec.from_config(_cfg("one_stream", token_fusion=True))

    class Fuse(nn.Module):
        @nn.compact
        def __call__(self, img, mp):
            return fuse_tokens(spec, img, mp, {"dtype": jnp.float32, "param_dtype": jnp.float32})

    rng = np.random.default_rng(0)
    img, mp = (rng.standard_normal((2, 16, 32)).astype(np.float32) for _ in range(2))
    params = _random_like(nn.meta.unbox(Fuse().init(jax.random.key(0), img, mp)["params"]), rng)
    got_img, got_map = Fuse().apply({"params": params}, img, mp)
    w1, b1 = params["map_to_image"]["kernel"], params["map_to_image"]["bias"]
    w2, b2 = params["image_to_map"]["kernel"], params["image_to_map"]["bias"]
    np.testing.assert_allclose(got_img, img + mp @ w1 + b1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_map, mp + img @ w2 + b2, rtol=1e-5, atol=1e-5)


def _random_like(tree, rng):
    return jax.tree_util.tree_map(
        lambda v: rng.standard_normal(v.shape).astype(np.float32) * 0.3, tree
    )


def test_token_fusion_learns_to_pass_the_map_to_the_image():
    """Non-zero fusion weights make the image output read the map through them."""
    cfg = _cfg("one_stream", token_fusion=True)
    params = _random_params(cfg)
    x, m, t, ctx = _inputs(cfg)
    apply = jax.jit(models.build(cfg).apply)
    eps, _ = apply({"params": params}, x, m, t, ctx)
    silent = dict(
        params, map_to_image=jax.tree_util.tree_map(jnp.zeros_like, params["map_to_image"])
    )
    eps_silent, _ = apply({"params": silent}, x, m, t, ctx)
    assert not np.allclose(eps, eps_silent)


@pytest.mark.parametrize("name", ["uvit", "two_stream", "unet_one_stream"])
def test_token_fusion_outside_one_stream_is_refused(name):
    with pytest.raises(ValueError, match="token_fusion=True is a one_stream option"):
        models.build(_cfg(name, token_fusion=True))
