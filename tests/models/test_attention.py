"""Tests of the attention kernels against a float64 NumPy softmax attention."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pdm as pdm_configs
from pdm_jax import models
from pdm_jax.models import attention


def _reference(q, k, v):
    """softmax(q kᵀ/√d) v in float64, [B, T, H, D] layout."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)


def _reference_grads(q, k, v, w):
    """Gradients of sum(attention · w) by the closed-form softmax backward, float64."""
    q, k, v, w = (np.asarray(a, np.float64) for a in (q, k, v, w))
    scale = 1.0 / np.sqrt(q.shape[-1])
    s = np.einsum("bthd,bshd->bhts", q, k) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    dv = np.einsum("bhts,bthd->bshd", p, w)
    dp = np.einsum("bthd,bshd->bhts", w, v)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) * scale
    dq = np.einsum("bhts,bshd->bthd", ds, k)
    dk = np.einsum("bhts,bthd->bshd", ds, q)
    return dq, dk, dv


def _inputs(shape=(2, 37, 3, 8), seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(shape).astype(np.float32) * 2) for _ in range(4)]


@pytest.mark.parametrize("impl", ["xla", "chunked", "auto"])
@pytest.mark.parametrize("group", [None, 1, 2, 3, 6])
def test_forward_matches_reference(impl, group):
    q, k, v, _ = _inputs()
    if impl == "chunked" and group is not None:
        out = attention.chunked_attention(q, k, v, heads_per_group=group)
    else:
        out = attention.dot_product_attention(q, k, v, impl)
    np.testing.assert_allclose(np.asarray(out), _reference(q, k, v), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("group", [1, 2, 6])
def test_chunked_gradients_match_closed_form(group):
    q, k, v, w = _inputs()

    def loss(q, k, v):
        return jnp.sum(attention.chunked_attention(q, k, v, heads_per_group=group) * w)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    for got, want in zip(grads, _reference_grads(q, k, v, w), strict=True):
        np.testing.assert_allclose(np.asarray(got), want, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize(("group", "rows"), [(1, 1), (1, 4), (2, 12), (6, 36)])
def test_query_blocks_match_reference_with_gradients(group, rows):
    # T = 36: blocks of 1, 4 and 12 query rows (dk, dv summed over the blocks), and 36 (one).
    q, k, v, w = _inputs((2, 36, 3, 8), seed=2)

    def attend(q, k, v):
        return attention.chunked_attention(q, k, v, heads_per_group=group, rows_per_block=rows)

    np.testing.assert_allclose(
        np.asarray(attend(q, k, v)), _reference(q, k, v), atol=2e-5, rtol=1e-5
    )
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(attend(*a) * w), argnums=(0, 1, 2)))(q, k, v)
    for got, want in zip(grads, _reference_grads(q, k, v, w), strict=True):
        np.testing.assert_allclose(np.asarray(got), want, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("length", [37, 256, 300, 4096])
def test_row_max_equals_the_max_over_each_row(length):
    # 37: one reduction; 256: two whole slices; 300: two slices and a 44-key remainder.
    s = jax.random.normal(jax.random.key(length), (2, 3, length)) * 50
    s = s.at[1, 2, length - 1].set(1e4)  # a row whose max is its last key (the remainder)
    got = attention._row_max(s)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.max(s, -1, keepdims=True)))


@pytest.mark.parametrize("rows", [None, 100])
def test_long_rows_match_reference_with_gradients(rows):
    # T = 300 takes the sliced row max (two 128-key slices and a remainder); inputs × 4 give
    # logits spread over ±100, where a softmax without the max would overflow.
    q, k, v, w = (a * 2 for a in _inputs((1, 300, 2, 8), seed=3))

    def attend(q, k, v):
        return attention.chunked_attention(q, k, v, rows_per_block=rows)

    np.testing.assert_allclose(
        np.asarray(attend(q, k, v)), _reference(q, k, v), atol=2e-5, rtol=1e-4
    )
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(attend(*a) * w), argnums=(0, 1, 2)))(q, k, v)
    for got, want in zip(grads, _reference_grads(q, k, v, w), strict=True):
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-4, rtol=1e-3)


def test_forward_reduces_no_row_of_keys():
    # The forward's row max reduces 128-wide slices and its denominators come out of the
    # p·v matmul: no reduce over all 512 keys (XLA:CPU runs those as scalar reduce-windows).
    q = jnp.zeros((1, 512, 2, 8))
    jaxpr = jax.make_jaxpr(attention.chunked_attention)(q, q, q)

    def reduces(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("reduce_max", "reduce_sum"):
                yield eqn.params["axes"], eqn.invars[0].aval.shape
            for p in eqn.params.values():  # the bodies of lax.map and the custom VJP
                inner = getattr(p, "jaxpr", None)
                if inner is not None:
                    yield from reduces(getattr(inner, "jaxpr", inner))

    found = list(reduces(jaxpr.jaxpr))
    assert found, "no reductions traced: the walk missed the lax.map bodies"
    for axes, shape in found:
        assert all(shape[a] <= attention.ROW_MAX_SLICE for a in axes), (axes, shape)


def test_queries_per_block_fits_budget_and_divides():
    assert attention.queries_per_block(590) == 590  # 590² × 4 B ≈ 1.3 MiB: one block
    assert attention.queries_per_block(4096) == 512  # 512 × 4096 × 4 B = 8 MiB
    assert attention.queries_per_block(1024, heads=2) == 1024  # 8 MiB: one block
    assert attention.queries_per_block(4096, heads=2) == 256
    assert attention.queries_per_block(4096, chunk_bytes=4 * 4096 * 100) == 64
    assert attention.queries_per_block(4097, chunk_bytes=4 * 4097 * 100) == 17  # 4097 = 17·241
    with pytest.raises(ValueError, match="rows_per_block=5 does not divide"):
        q = jnp.zeros((1, 12, 1, 4))
        attention.chunked_attention(q, q, q, rows_per_block=5)


def test_chunked_equals_xla_path_with_gradients():
    q, k, v, w = _inputs((4, 16, 2, 4), seed=1)

    def loss(impl):
        return lambda q, k, v: jnp.sum(attention.dot_product_attention(q, k, v, impl) * w)

    a = jax.grad(loss("chunked"), argnums=(0, 1, 2))(q, k, v)
    b = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=1e-5)


def test_heads_per_chunk_fits_budget_and_divides():
    assert attention.heads_per_chunk(64, 590) == 2  # 2 × 590² × 4 B ≈ 2.8 MiB
    assert attention.heads_per_chunk(64, 334) == 4  # largest divisor of 64 under 7
    assert attention.heads_per_chunk(63, 334) == 7
    assert attention.heads_per_chunk(62, 334) == 2
    assert attention.heads_per_chunk(8, 4096) == 1  # one head's logits exceed the budget
    assert attention.heads_per_chunk(6, 4, chunk_bytes=10**9) == 6


@pytest.mark.parametrize(
    ("backend", "dtype", "head_dim", "expected"),
    [
        ("gpu", "bfloat16", 64, "cudnn"),
        ("gpu", "float16", 72, "cudnn"),  # U-ViT-H: 1152 / 16
        ("gpu", "float32", 64, "xla"),  # cuDNN's flash attention is half precision only
        ("gpu", "bfloat16", 12, "xla"),  # head dim not a multiple of 8
        ("gpu", "bfloat16", 160, "xla"),  # over 128
        ("tpu", "bfloat16", 64, "xla"),
        ("tpu", "float32", 64, "xla"),
        ("cpu", "bfloat16", 64, "chunked"),
        ("cpu", "float32", None, "chunked"),
    ],
)
def test_auto_resolves_per_backend_and_dtype(backend, dtype, head_dim, expected):
    assert attention.resolve_implementation("auto", dtype, backend, head_dim) == expected


def test_auto_resolves_per_backend_and_rejects_unknown():
    assert attention.resolve_implementation("auto") == "chunked"  # the tests run on CPU
    assert attention.resolve_implementation("xla") == "xla"
    assert attention.resolve_implementation("cudnn", "float32", "gpu") == "cudnn"  # as given
    with pytest.raises(ValueError, match="Unknown attention implementation 'flash'"):
        attention.resolve_implementation("flash")


def test_chunked_rejects_bad_shapes_and_groups():
    q, k, _, _ = _inputs()
    with pytest.raises(ValueError, match="one \\[B, T, H, Dh\\] shape"):
        attention.chunked_attention(q, k[:, :5], k)
    with pytest.raises(ValueError, match="does not divide"):
        attention.chunked_attention(q, q, q, heads_per_group=4)


_DTYPE_FIX = "set --config.model.dtype=bfloat16"
_BACKEND_FIX = "set --config.model.attention=xla"
_HEAD_FIX = "change model.num_heads"


@pytest.mark.parametrize(
    ("dtype", "backend", "fixes"),
    [
        ("float32", None, (_DTYPE_FIX, _BACKEND_FIX)),  # the tests' backend is the CPU
        ("bfloat16", None, (_BACKEND_FIX,)),
        ("float32", "gpu", (_DTYPE_FIX,)),
        ("bfloat16", "gpu", (_HEAD_FIX,)),
    ],
)
def test_cudnn_names_what_to_set(dtype, backend, fixes):
    head_dim = 20 if _HEAD_FIX in fixes else 64
    with pytest.raises(ValueError, match=r"model\.attention=cudnn") as info:
        attention.check_implementation("cudnn", dtype, backend, head_dim)
    for fix in (_DTYPE_FIX, _BACKEND_FIX, _HEAD_FIX):
        assert (fix in str(info.value)) == (fix in fixes)


@pytest.mark.parametrize(
    ("impl", "dtype", "backend"),
    [
        ("cudnn", "bfloat16", "gpu"),
        ("cudnn", "float16", "gpu"),
        ("xla", "float32", None),
        ("auto", "float32", None),
        ("chunked", "float32", None),
    ],
)
def test_runnable_choices_pass_the_check(impl, dtype, backend):
    attention.check_implementation(impl, dtype, backend)


def test_cudnn_is_rejected_when_the_model_is_built():
    # Before the check, on CPU: "RuntimeError: cuDNN is not detected" from inside the first
    # trace (on a GPU with float32, JAX's source raises "Q must be fp16/bf16/...").
    config = pdm_configs.get_config("demo,tiny=1")
    config.model.attention = "cudnn"
    with pytest.raises(ValueError, match=re.escape(_DTYPE_FIX)):
        models.build(config.model)
    config.model.dtype = "bfloat16"
    with pytest.raises(ValueError, match=re.escape(_BACKEND_FIX)):
        models.build(config.model)
