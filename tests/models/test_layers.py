"""Layers against closed forms and an independent numpy transformer block."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from pdm_jax.models import layers


def test_timestep_embedding_closed_form():
    t = np.array([0.0, 1.0, 17.5, 999.0], np.float32)
    dim = 8
    got = np.asarray(layers.timestep_embedding(jnp.asarray(t), dim))
    k = np.arange(dim // 2, dtype=np.float64)
    args = t[:, None].astype(np.float64) * 10000.0 ** (-k / (dim // 2))
    want = np.concatenate([np.cos(args), np.sin(args)], axis=-1)  # cos half first
    assert got.shape == (4, dim) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_array_equal(got[0], [1, 1, 1, 1, 0, 0, 0, 0])


def test_timestep_embedding_odd_dim_appends_zero():
    got = np.asarray(layers.timestep_embedding(jnp.array([3.0, 500.0]), 7))
    assert got.shape == (2, 7)
    np.testing.assert_array_equal(got[:, -1], 0.0)
    np.testing.assert_allclose(got[:, :6], layers.timestep_embedding(jnp.array([3.0, 500.0]), 6))


def test_unpatchify_channel_order():
    b, side, p, c = 2, 3, 2, 5
    rng = np.random.default_rng(0)
    img = rng.standard_normal((b, side * p, side * p, c)).astype(np.float32)
    # Patchify by hand: token (h, w) row-major, features ordered (p1, p2, C).
    tokens = np.stack(
        [
            img[:, h * p : (h + 1) * p, w * p : (w + 1) * p, :].reshape(b, -1)
            for h in range(side)
            for w in range(side)
        ],
        axis=1,
    )
    np.testing.assert_array_equal(layers.unpatchify(jnp.asarray(tokens), p, c), img)
    with pytest.raises(ValueError, match="unpatchify"):
        layers.unpatchify(jnp.zeros((1, 8, p * p * c)), p, c)


def test_patch_embed_is_row_major_linear_map():
    p, c, d = 2, 3, 4
    x = jax.random.normal(jax.random.key(0), (2, 6, 4, c))
    module = layers.PatchEmbed(p, d)
    params = jax.jit(module.init)(jax.random.key(1), x)["params"]
    kernel = np.asarray(nn.meta.unbox(params["proj"]["kernel"]))  # [p, p, C, D]
    bias = np.asarray(nn.meta.unbox(params["proj"]["bias"]))
    got = np.asarray(jax.jit(module.apply)({"params": params}, x))
    assert got.shape == (2, 3 * 2, d)
    xn = np.asarray(x)
    for idx, (h, w) in enumerate((h, w) for h in range(3) for w in range(2)):
        patch = xn[:, h * p : (h + 1) * p, w * p : (w + 1) * p, :]  # [B, p, p, C]
        want = np.einsum("bijc,ijcd->bd", patch, kernel) + bias
        np.testing.assert_allclose(got[:, idx], want, atol=1e-5)
    with pytest.raises(ValueError, match="not divisible"):
        module.apply({"params": params}, jnp.zeros((1, 5, 4, c)))


def _np_layer_norm(x, p):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def _np_block(x, p, heads, skip=None):
    """Independent float64 U-ViT block: official einops split 'B L (K H D)'."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p)
    if skip is not None:
        x = np.concatenate([x, skip], -1) @ p["skip_linear"]["kernel"] + p["skip_linear"]["bias"]
    b, length, d = x.shape
    dh = d // heads
    qkv = _np_layer_norm(x, p["norm1"]) @ p["attn"]["qkv"]["kernel"].reshape(d, 3 * d)
    qkv = qkv.reshape(b, length, 3, heads, dh).transpose(2, 0, 3, 1, 4)  # K B H L D
    logits = qkv[0] @ qkv[1].swapaxes(-1, -2) / math.sqrt(dh)
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    y = (attn @ qkv[2]).transpose(0, 2, 1, 3).reshape(b, length, d)
    x = x + y @ p["attn"]["proj"]["kernel"].reshape(d, d) + p["attn"]["proj"]["bias"]
    h = _np_layer_norm(x, p["norm2"]) @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"]
    h = 0.5 * h * (1.0 + np.vectorize(math.erf)(h / math.sqrt(2.0)))  # exact GELU
    return x + h @ p["mlp"]["fc2"]["kernel"] + p["mlp"]["fc2"]["bias"]


def _randomized(params, key):
    leaves, tree = jax.tree_util.tree_flatten(nn.meta.unbox(params))
    keys = jax.random.split(key, len(leaves))
    new = [
        leaf + 0.3 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree_util.tree_unflatten(tree, new)


@pytest.mark.parametrize("skip", [False, True])
def test_block_matches_numpy_reference(skip):
    d, heads = 12, 3
    x = jax.random.normal(jax.random.key(0), (2, 7, d))
    s = jax.random.normal(jax.random.key(1), (2, 7, d)) if skip else None
    block = layers.Block(num_heads=heads, mlp_ratio=2.0, skip=skip)
    params = jax.jit(block.init)(jax.random.key(2), x, s)["params"]
    params = _randomized(params, jax.random.key(3))
    assert set(params) == {"norm1", "attn", "norm2", "mlp"} | ({"skip_linear"} if skip else set())
    assert "bias" not in params["attn"]["qkv"]  # official qkv_bias=False
    got = jax.jit(block.apply)({"params": params}, x, s)
    want = _np_block(np.asarray(x, np.float64), params, heads, None if s is None else np.asarray(s))
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_block_skip_mismatch_raises():
    x = jnp.zeros((1, 3, 8))
    with pytest.raises(ValueError, match="skip"):
        layers.Block(num_heads=2, skip=True).init(jax.random.key(0), x)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_block_same_values_and_grads(policy):
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    plain = layers.Block(num_heads=2)
    params = jax.jit(plain.init)(jax.random.key(1), x)["params"]
    remat = layers.block_class(policy)(num_heads=2)

    def value_and_grad(module):
        loss = lambda p: jnp.sum(module.apply({"params": p}, x) ** 2)
        return jax.jit(jax.value_and_grad(loss))(params)

    (v_plain, g_plain), (v_remat, g_remat) = value_and_grad(plain), value_and_grad(remat)
    np.testing.assert_allclose(v_remat, v_plain, rtol=1e-6)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g_plain, g_remat
    )
    with pytest.raises(ValueError, match="remat_policy"):
        layers.block_class("sometimes")


def test_initialisers_follow_official():
    d = 64
    x = jnp.zeros((1, 4, d))
    params = nn.meta.unbox(jax.jit(layers.Block(num_heads=4).init)(jax.random.key(0), x))
    params = params["params"]
    fc1 = np.asarray(params["mlp"]["fc1"]["kernel"])
    assert fc1.shape == (d, 4 * d)
    # timm trunc_normal_(std=.02, a=-2, b=2): cut-offs are absolute, so std stays .02.
    assert abs(fc1.std() - 0.02) < 0.001 and np.abs(fc1).max() > 0.06
    np.testing.assert_array_equal(params["mlp"]["fc1"]["bias"], 0.0)
    np.testing.assert_array_equal(params["norm1"]["scale"], 1.0)
    np.testing.assert_array_equal(params["norm1"]["bias"], 0.0)
    zc = nn.meta.unbox(layers.ZeroConv().init(jax.random.key(0), x)["params"])
    np.testing.assert_array_equal(zc["conv"]["kernel"], 0.0)
    np.testing.assert_array_equal(zc["conv"]["bias"], 0.0)
    # PyTorch Conv2d default: U(±1/√fan_in) for kernel and bias.
    pe = nn.meta.unbox(layers.PatchEmbed(2, d).init(jax.random.key(0), jnp.zeros((1, 4, 4, 8))))
    bound = 1 / math.sqrt(2 * 2 * 8)
    assert np.abs(pe["params"]["proj"]["kernel"]).max() <= bound
    assert np.abs(pe["params"]["proj"]["bias"]).max() <= bound
    assert np.asarray(pe["params"]["proj"]["kernel"]).std() > bound / 3


def test_logical_partitioning_annotations():
    x = jnp.zeros((1, 4, 8))
    boxed = layers.Block(num_heads=2, skip=True).init(jax.random.key(0), x, x)["params"]
    specs = nn.get_partition_spec(boxed)
    assert tuple(specs["attn"]["qkv"]["kernel"]) == ("embed", None, "heads", "kv")
    assert tuple(specs["attn"]["proj"]["kernel"]) == ("heads", "kv", "embed")
    assert tuple(specs["mlp"]["fc1"]["kernel"]) == ("embed", "mlp")
    assert tuple(specs["mlp"]["fc2"]["kernel"]) == ("mlp", "embed")
    assert tuple(specs["norm2"]["scale"]) == ("embed",)
    assert tuple(specs["skip_linear"]["kernel"]) == (None, "embed")
