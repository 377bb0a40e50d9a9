"""Plain U-ViT: shapes, official parameter count, input checks, dtypes, sharding axes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from configs.pdm import get_config
from pdm_jax import models
from pdm_jax.models import uvit


def _cfg(arg="uvit,tiny=1", **overrides):
    cfg = get_config(arg).model
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


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_output_shape(factor):
    cfg = _cfg(map_patch_factor=factor)
    model = models.build(cfg)
    params = models.abstract_params(cfg)
    eps = jax.eval_shape(model.apply, {"params": params}, *models.example_inputs(cfg, 3))
    assert eps.shape == (3, 8, 8, 4) and eps.dtype == jnp.float32
    # The map patch factor does not concern the plain U-ViT.
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
        models.abstract_params(_cfg(map_patch_factor=1))
    )


def test_forward_runs_and_depends_on_inputs():
    cfg = _cfg()
    model = models.build(cfg)
    params = _random_params(cfg)
    apply = jax.jit(model.apply)
    x, _, t, ctx = models.example_inputs(cfg, 2)
    x = jax.random.normal(jax.random.key(1), x.shape)
    eps = apply({"params": params}, x, None, t, ctx)
    assert eps.shape == x.shape and bool(jnp.all(jnp.isfinite(eps)))
    assert not np.allclose(eps, apply({"params": params}, x, None, t + 100.0, ctx))
    assert not np.allclose(eps, apply({"params": params}, x, None, t, ctx + 1.0))


def _uvit_param_count(d, depth, *, patch=2, chans=4, clip_dim=768, tokens=77, latent=32):
    """U-ViT's parameters, counted by hand from its layers (no qkv bias, MLP 4×D)."""
    block = 2 * d + 3 * d * d + (d * d + d) + 2 * d + (4 * d * d + 4 * d) + (4 * d * d + d)
    skip = 2 * d * d + d
    out = patch * patch * chans
    return (
        (depth + 1) * block  # depth // 2 in, the middle one, depth // 2 out
        + depth // 2 * skip
        + (out * d + d)  # patch_embed
        + (clip_dim * d + d)  # context_embed
        + (1 + tokens + (latent // patch) ** 2) * d  # pos_embed
        + 2 * d  # norm
        + (d * out + out)  # decoder_pred
        + (9 * chans * chans + chans)  # final_layer, 3×3 conv
    )


# The paper's counts (Bao et al. 2023, Table 1, class-conditional): text conditioning and
# the latent patching move them by under 1%.
@pytest.mark.parametrize(
    ("size", "paper"),
    [("S", 44e6), ("S-Deep", 58e6), ("M", 131e6), ("L", 287e6), ("H", 501e6)],
)
def test_param_count_per_size(size, paper):
    cfg = get_config(f"uvit,size={size}").model
    count = models.count_params(models.abstract_params(cfg))  # eval_shape: nothing allocated
    assert count == _uvit_param_count(cfg.embed_dim, cfg.depth)
    assert count == pytest.approx(paper, rel=0.02)
    if size == "S":
        assert count == 44_692_644  # the official checkpoint's
        assert cfg == get_config("uvit").model  # S is the default


@pytest.mark.parametrize(
    ("arg", "message"),
    [("uvit,size=XL", "Unknown config option size='XL'"), ("uvit,size=M,tiny=1", "give one")],
)
def test_bad_size_is_named(arg, message):
    with pytest.raises(ValueError, match=message):
        get_config(arg)


def test_param_count_uvit_s_and_names():
    cfg = get_config("uvit").model
    params = models.abstract_params(cfg)
    assert models.count_params(params) == 44_692_644
    assert set(params) == (
        {"patch_embed", "context_embed", "pos_embed", "mid_block", "norm", "decoder_pred"}
        | {"final_layer"}
        | {f"in_blocks_{i}" for i in range(6)}
        | {f"out_blocks_{i}" for i in range(6)}
    )
    assert params["pos_embed"].shape == (1, 1 + 77 + 256, 512)
    assert "skip_linear" in params["out_blocks_0"] and "skip_linear" not in params["in_blocks_0"]


def test_mlp_time_embed_adds_official_layers():
    params = models.abstract_params(_cfg(mlp_time_embed=True))
    assert params["time_embed_0"]["kernel"].shape == (32, 128)
    assert params["time_embed_2"]["kernel"].shape == (128, 32)


def test_input_errors():
    cfg = _cfg()
    model = models.build(cfg)
    params = models.abstract_params(cfg)
    x, _, t, ctx = models.example_inputs(cfg, 2)
    with pytest.raises(ValueError, match="m_t=None"):
        jax.eval_shape(model.apply, {"params": params}, x, jnp.zeros((2, 8, 8, 8)), t, ctx)
    with pytest.raises(ValueError, match="x_t has shape"):
        jax.eval_shape(model.apply, {"params": params}, x[:, :4], None, t, ctx)
    with pytest.raises(ValueError, match="context has shape"):
        jax.eval_shape(model.apply, {"params": params}, x, None, t, ctx[:, :2])
    with pytest.raises(ValueError, match="t has shape"):
        jax.eval_shape(model.apply, {"params": params}, x, None, t[:1], ctx)
    with pytest.raises(ValueError, match="Unknown model name"):
        models.build(_cfg(name="vqgan"))
    with pytest.raises(ValueError, match="multiple of num_heads"):
        models.build(_cfg(num_heads=5))
    with pytest.raises(ValueError, match="remat_policy"):
        models.build(_cfg(remat_policy="sometimes"))


def test_dtypes():
    cfg = _cfg(dtype="bfloat16", param_dtype="bfloat16")
    params = models.abstract_params(cfg)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {jnp.dtype("bfloat16")}
    eps = jax.eval_shape(models.build(cfg).apply, {"params": params}, *models.example_inputs(cfg))
    assert eps.dtype == jnp.float32


def test_bfloat16_compute_close_to_float32():
    cfg32, cfg16 = _cfg(), _cfg(dtype="bfloat16")
    params = _random_params(cfg32)
    x, _, t, ctx = models.example_inputs(cfg32, 2)
    x = jax.random.normal(jax.random.key(1), x.shape)
    ctx = jax.random.normal(jax.random.key(2), ctx.shape)
    e32 = jax.jit(models.build(cfg32).apply)({"params": params}, x, None, t, ctx)
    e16 = jax.jit(models.build(cfg16).apply)({"params": params}, x, None, t, ctx)
    assert e16.dtype == jnp.float32
    np.testing.assert_allclose(e16, e32, atol=0.05 * float(jnp.abs(e32).max()))


def test_remat_keeps_parameter_names():
    a = models.abstract_params(_cfg())
    for policy in ("full", "dots"):
        b = models.abstract_params(_cfg(remat_policy=policy))
        assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)


def test_param_logical_axes_cover_every_parameter():
    cfg = _cfg()
    shapes = traverse_util.flatten_dict(models.abstract_params(cfg))
    axes = traverse_util.flatten_dict(models.param_logical_axes(cfg))
    assert axes.keys() == shapes.keys()
    for path, spec in axes.items():
        assert isinstance(spec, jax.sharding.PartitionSpec)
        assert len(spec) == shapes[path].ndim, path
    assert tuple(axes[("in_blocks_0", "attn", "qkv", "kernel")]) == ("embed", None, "heads", "kv")
    assert tuple(axes[("in_blocks_0", "attn", "proj", "kernel")]) == ("heads", "kv", "embed")
    assert tuple(axes[("pos_embed",)]) == (None, None, "embed")
    assert tuple(axes[("patch_embed", "proj", "kernel")]) == (None, None, "conv_in", "conv_out")
    assert tuple(axes[("final_layer", "kernel")]) == (None, None, "conv_in", "conv_out")


def test_sincos_table_matches_the_closed_form():
    table = uvit.sincos_2d(grid=3, dim=8)  # two frequencies per axis: 1 and 1/100
    assert table.shape == (9, 8)
    r, c = 2, 1  # token 2·3 + 1
    expected = [np.sin(r), np.sin(r / 100), np.cos(r), np.cos(r / 100)]
    expected += [np.sin(c), np.sin(c / 100), np.cos(c), np.cos(c / 100)]
    np.testing.assert_allclose(table[7], expected, rtol=1e-6)


class _Positions(nn.Module):
    """Just the position embedding of a model with ``spec`` (no forward pass to trace)."""

    spec: uvit.UViTSpec
    length: int
    extras: int | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self):
        return uvit.position_embedding(self, "pos_embed", self.length, self.spec, self.extras)


def _positions(spec, length, extras=None):
    module = _Positions(spec, length, extras)
    return np.asarray(nn.meta.unbox(module.init(jax.random.key(0))["params"]["pos_embed"]))[0]


def test_sincos_init_starts_each_patch_grid_at_one_table():
    spec = uvit.UViTSpec.from_config(_cfg("one_stream,tiny=1", pos_embed_init="sincos"))
    plain = uvit.UViTSpec.from_config(_cfg("one_stream,tiny=1"))
    table = uvit.sincos_2d(spec.img_size // spec.patch_size, spec.embed_dim)
    e, n = spec.extras, spec.num_patches
    pos = _positions(spec, e + 2 * n)  # the one-stream layout: extras, image, map
    np.testing.assert_array_equal(pos[e : e + n], table)
    np.testing.assert_array_equal(pos[e + n :], table)
    # Time and text rows keep the official initialiser; so does everything by default.
    np.testing.assert_array_equal(pos[:e], _positions(plain, e + 2 * n)[:e])
    assert not np.allclose(_positions(plain, e + 2 * n)[e : e + n], table, atol=0.1)
    np.testing.assert_array_equal(_positions(spec, n, extras=0), table)  # a map stream's
    with pytest.raises(ValueError, match="patch grids"):
        _positions(spec, e + n + 1)


def test_sincos_init_reaches_both_streams_of_the_two_stream_model():
    cfg = _cfg("two_stream,tiny=1", pos_embed_init="sincos")
    params = models.init_params(cfg, jax.random.key(0))
    spec = uvit.UViTSpec.from_config(cfg)
    table = uvit.sincos_2d(spec.img_size // spec.patch_size, spec.embed_dim)
    np.testing.assert_array_equal(np.asarray(params["pos_embed"])[0, spec.extras :], table)
    np.testing.assert_array_equal(np.asarray(params["pos_embed_mask"])[0], table)


def test_unknown_or_unfit_pos_embed_init_is_named():
    with pytest.raises(ValueError, match="pos_embed_init"):
        models.build(_cfg(pos_embed_init="learned"))
    with pytest.raises(ValueError, match="divisible by 4"):
        models.build(_cfg(pos_embed_init="sincos", embed_dim=34, num_heads=2))
