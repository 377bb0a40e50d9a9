"""The SD UNet (``pdm_jax.models.unet``): parameter counts, parity with diffusers, errors.

Golden fixtures (``data/unet_tiny_sd{1,2}.npz``, made by ``make_unet_fixtures.py`` with
diffusers' PyTorch ``UNet2DConditionModel``, every tensor randomised) pin the parity for
torch-free runs; the ``torch`` test recomputes it live.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from configs.pdm import get_config
from pdm_jax import models
from pdm_jax.convert import diffusers_unet
from pdm_jax.models.unet import UNetSpec, load_packaged_config
from pdm_jax.sharding import LOGICAL_AXIS_RULES

DATA = pathlib.Path(__file__).parent / "data"
TOL = 1e-4


def _fixture(name):
    f = np.load(DATA / f"unet_{name}.npz")
    cfg = diffusers_unet.model_config_from_diffusers(json.loads(str(f["config"])))
    state = {k[3:]: f[k].astype(np.float32) for k in f.files if k.startswith("sd/")}
    return f, cfg, state


def _eps(cfg, params, f):
    model = models.build(cfg)
    t = jnp.asarray(f["t"])
    apply = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, None, t, c))
    return np.asarray(apply(params, f["x"], t, f["context"]))


@pytest.mark.parametrize(("arg", "count"), [("unet,sd=1", 859_520_964), ("unet,sd=2", 865_910_724)])
def test_parameter_counts_equal_diffusers(arg, count):
    assert models.count_params(models.abstract_params(get_config(arg).model)) == count


@pytest.mark.parametrize("name", ["tiny_sd1", "tiny_sd2"])
def test_matches_diffusers_golden_fixture(name):
    f, cfg, state = _fixture(name)
    eps = _eps(cfg, diffusers_unet.diffusers_to_params(state, cfg), f)
    assert eps.shape == f["eps"].shape == (2, 8, 8, 4)
    assert np.abs(f["eps"]).max() > 0.5  # a real signal, not a trivial output
    np.testing.assert_allclose(eps, f["eps"], atol=TOL, rtol=0)


def test_remat_and_xla_attention_give_the_same_eps():
    f, cfg, state = _fixture("tiny_sd2")
    params = diffusers_unet.diffusers_to_params(state, cfg)
    cfg.update(remat_policy="full", attention="xla")
    np.testing.assert_allclose(_eps(cfg, params, f), f["eps"], atol=TOL, rtol=0)


def test_logical_axes_have_rules_and_conv_kernels_are_annotated():
    cfg = get_config("unet,tiny=1").model
    axes = traverse_util.flatten_dict(models.param_logical_axes(cfg))
    ruled = {name for name, _ in LOGICAL_AXIS_RULES}
    used = {a for spec in axes.values() for a in spec if a is not None}
    assert used <= ruled, used - ruled
    conv_in = axes[("down_blocks_0", "resnets_0", "conv1", "kernel")]
    assert tuple(conv_in) == (None, None, "conv_in", "conv_out")
    assert tuple(
        axes[("mid_block", "attentions_0", "transformer_blocks_0", "ff", "net_2", "kernel")]
    ) == ("mlp", "embed")
    assert tuple(
        axes[("up_blocks_1", "attentions_0", "transformer_blocks_0", "attn1", "to_q", "kernel")]
    ) == ("embed", "heads")
    with nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        assert all(isinstance(s, jax.sharding.PartitionSpec) for s in axes.values())


def test_config_errors_name_the_problem():
    sd1 = load_packaged_config("sd1")
    with pytest.raises(ValueError, match=r"class_embed_type='timestep'"):
        UNetSpec.from_diffusers({**sd1, "class_embed_type": "timestep"})
    with pytest.raises(ValueError, match=r"unknown keys \['fancy_option'\]"):
        UNetSpec.from_diffusers({**sd1, "fancy_option": 1})
    with pytest.raises(ValueError, match="one entry per block"):
        UNetSpec.from_diffusers({**sd1, "attention_head_dim": [8, 8]})
    with pytest.raises(ValueError, match="Unsupported UNet block types"):
        UNetSpec.from_diffusers({**sd1, "down_block_types": ["SimpleDownBlock2D"] * 4})
    bad = get_config("unet,tiny=1").model
    bad.clip_dim = 16
    with pytest.raises(ValueError, match="clip_dim=16 but the UNet's cross_attention_dim is 24"):
        models.build(bad)
    cfg = get_config("unet,tiny=1").model
    model, params = models.build(cfg), models.abstract_params(cfg)
    x, _, t, ctx = models.example_inputs(cfg, 2)
    with pytest.raises(ValueError, match="multiples of 4"):
        jax.eval_shape(model.apply, {"params": params}, x[:, :6, :6], None, t, ctx)
    with pytest.raises(ValueError, match="m_t=None"):
        jax.eval_shape(model.apply, {"params": params}, x, x, t, ctx)


@pytest.mark.torch
def test_matches_diffusers_live(name="tiny_sd2"):
    """The SD-2-style fixture recomputed with the installed torch + diffusers (the golden
    files pin both layouts; this checks they still hold for the installed diffusers)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from tests.models.make_unet_fixtures import fixture

    f = fixture(load_packaged_config(name), torch, diffusers.UNet2DConditionModel)
    cfg = diffusers_unet.model_config_from_diffusers(json.loads(str(f["config"])))
    state = {k[3:]: v.astype(np.float32) for k, v in f.items() if k.startswith("sd/")}
    np.testing.assert_allclose(
        _eps(cfg, diffusers_unet.diffusers_to_params(state, cfg), f), f["eps"], atol=TOL, rtol=0
    )


def _lax_conv(x, w, stride=1, padding=((1, 1), (1, 1))):
    return jax.lax.conv_general_dilated(
        x, w, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@pytest.mark.parametrize(
    ("shape", "kernel", "padding", "matmuls"),
    [
        ((2, 8, 8, 256), 3, ((1, 1), (1, 1)), True),  # SD's 8×8 × 1,280 level, scaled down
        ((1, 16, 16, 256), 3, ((1, 1), (1, 1)), True),
        ((1, 4, 6, 320), 3, ((0, 2), (1, 0)), True),  # uneven padding, non-square map
        ((1, 32, 32, 256), 3, ((1, 1), (1, 1)), False),  # too many pixels: XLA's conv
        ((1, 8, 8, 64), 3, ((1, 1), (1, 1)), False),  # too few channels
        ((1, 8, 8, 256), 1, ((0, 0), (0, 0)), False),  # 1×1: a matmul already
    ],
)
def test_conv_tap_matmul_path_equals_xla_convolution_with_gradients(
    shape, kernel, padding, matmuls
):
    from pdm_jax.models import unet_blocks

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((kernel, kernel, shape[-1], 24)).astype(np.float32))
    dims = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    assert unet_blocks._use_tap_matmuls(x, w, (1, 1), None, None, dims, 1) is matmuls

    def ours(x, w):
        return unet_blocks.conv_general_dilated(
            x, w, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    want = _lax_conv(x, w, padding=padding)
    np.testing.assert_allclose(ours(x, w), want, rtol=1e-4, atol=1e-3)
    cot = jnp.asarray(rng.standard_normal(want.shape).astype(np.float32))
    got_grads = jax.grad(lambda x, w: jnp.sum(ours(x, w) * cot), argnums=(0, 1))(x, w)
    want_grads = jax.grad(
        lambda x, w: jnp.sum(_lax_conv(x, w, padding=padding) * cot), argnums=(0, 1)
    )(x, w)
    for got, ref in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=2e-2)


def test_strided_conv_takes_xla_path():
    from pdm_jax.models import unet_blocks

    x, w = jnp.ones((1, 8, 8, 256)), jnp.ones((3, 3, 256, 8))
    dims = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    assert not unet_blocks._use_tap_matmuls(x, w, (2, 2), None, None, dims, 1)
    got = unet_blocks.conv_general_dilated(
        x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    np.testing.assert_array_equal(got, _lax_conv(x, w, stride=2))


def test_tap_matmul_conv_holds_one_shifted_view_at_a_time():
    # One matmul per kernel tap, summed in a scan: less memory than the nine views side by
    # side (im2col), whose column matrix alone is 16·16·9·256·4 B = 2.4 MB here.
    from pdm_jax.models import unet_blocks

    x, w = jnp.ones((1, 16, 16, 256)), jnp.ones((3, 3, 256, 64))
    conv = lambda x, w: unet_blocks.conv_general_dilated(
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    temp = jax.jit(conv).lower(x, w).compile().memory_analysis().temp_size_in_bytes
    assert temp < 16 * 16 * 9 * 256 * 4 / 2


def test_feed_forward_rows_fit_the_budget_on_cpu_only():
    from pdm_jax.models import unet_blocks

    # SD-1's 64×64 level at batch 2: the GEGLU hidden is [2, 4096, 2560] float32 (84 MB).
    assert unet_blocks.feed_forward_rows(2, 4096, 2560, 4, "cpu") == 512  # 10.5 MB
    assert unet_blocks.feed_forward_rows(2, 4096, 2560, 4, "gpu") == 4096
    assert unet_blocks.feed_forward_rows(2, 256, 10240, 4, "cpu") == 128  # 16×16 × 1,280: 21 MB
    assert unet_blocks.feed_forward_rows(1, 64, 64, 4, "cpu") == 64  # fits: one block
    assert unet_blocks.feed_forward_rows(1, 15, 64, 4, "cpu", block_bytes=4 * 64 * 4) == 3


def test_feed_forward_in_token_blocks_equals_one_block(monkeypatch):
    from pdm_jax.models import unet_blocks

    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 24, 16)).astype(np.float32))
    ff = unet_blocks.FeedForward()
    params = ff.init(jax.random.key(0), x)

    def loss(p, x):
        return jnp.sum(ff.apply(p, x) ** 2)

    whole = ff.apply(params, x), jax.grad(loss, argnums=(0, 1))(params, x)
    jaxpr = str(jax.make_jaxpr(ff.apply)(params, x))
    assert jaxpr.count("dot_general") == 2  # one block: GEGLU's proj and net_2
    # A budget of 6 tokens' hidden: blocks of 6 rows, four of them.
    monkeypatch.setattr(unet_blocks, "FF_BLOCK_BYTES", 2 * 6 * 128 * 4)
    jaxpr = str(jax.make_jaxpr(ff.apply)(params, x))
    assert jaxpr.count("dot_general") == 2 * 4
    blocked = ff.apply(params, x), jax.grad(loss, argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(blocked), jax.tree.leaves(whole), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
