"""Scaled dot-product attention with a platform-chosen implementation.

On TPU ``jax.nn.dot_product_attention`` lets XLA fuse it; on GPU with a bfloat16/float16
compute dtype ``auto`` takes cuDNN's fused flash attention (float32 there: XLA's path).
XLA:CPU has no fused attention: it writes the ``[B, H, T, T]`` logits to memory, reads
them back for the softmax and again for the second matmul, and its batched matmuls run at
a quarter of its plain-matmul speed. ``chunked_attention`` is the CPU path: a
``lax.map`` over small groups of (batch, head) pairs, each group's logits small enough to
stay in cache, with a custom VJP in the style of FlashAttention (Dao et al., 2022): the
forward keeps only the output and the row log-sum-exp, the backward recomputes each
group's probabilities from them. On a 2-core CPU it runs the two-stream map-stream
attention (T = 590) forward + backward about 2× faster than the XLA path and keeps no
``T × T`` residuals. Its forward avoids XLA:CPU's slow long row reductions: the row max is
an elementwise maximum of 128-key slices and the softmax denominators come out of the
``p v`` matmul through a column of ones appended to ``v``. That took SD-1's 64×64
self-attention ([2, 4096, 8, 40]) from about 530 to 390 ms (PyTorch's SDPA: 320 ms) and
its whole denoiser forward from 10.6 to 9.5 s (2 cores, same process, alternating).

Arrays are ``[B, T, H, Dh]`` (the layout ``jax.nn.dot_product_attention`` takes).
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "chunked")
# Logits per group: about 3 MiB keeps a group's [n, T, T] block in a CPU's L2/L3 cache.
CHUNK_BYTES = 3 * 2**20
# Logits per query block when one group's [n, T, T] exceeds that: at T = 4096 (SD's 64×64
# latents) 512-row blocks (8 MiB) ran one SD-1 attention 1.7-1.9× faster than whole rows
# (2 cores; 128-2,048 rows were within noise of each other).
ROW_BLOCK_BYTES = 8 * 2**20
# Column slices whose elementwise maximum gives the row max of the logits (`_row_max`).
ROW_MAX_SLICE = 128


def largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of ``n`` not above ``at_most`` (at least 1)."""
    return max(d for d in range(1, max(1, min(at_most, n)) + 1) if n % d == 0)


def heads_per_chunk(num_groups: int, length: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """How many (batch, head) pairs ``chunked_attention`` handles per step.

    Args:
      num_groups: batch × heads.
      length: sequence length T.
      chunk_bytes: budget for one group's float32 logits ``[n, T, T]``.

    Returns:
      The largest divisor ``n`` of ``num_groups`` with ``n·T²·4 ≤ chunk_bytes`` (at least 1).
    """
    target = max(1, chunk_bytes // (4 * length * length))
    return largest_divisor(num_groups, target)


def queries_per_block(length: int, heads: int = 1, chunk_bytes: int = ROW_BLOCK_BYTES) -> int:
    """How many query rows ``chunked_attention`` takes at once within a group.

    Args:
      length: sequence length T (keys per row).
      heads: (batch, head) pairs in the group.
      chunk_bytes: budget for one block's float32 logits ``[heads, rows, T]``.

    Returns:
      T when the whole group fits the budget; otherwise the largest divisor of T whose
      block fits it (at least 1). At T = 4096 (SD's 64×64 latents) one head's logits are
      64 MiB; blocks of 512 rows are 8 MiB.
    """
    target = max(1, chunk_bytes // (4 * length * heads))
    return largest_divisor(length, target)


def _to_groups(a: Array, n: int) -> Array:
    """``[B, T, H, D] -> [B·H/n, n, T, D]``."""
    b, t, h, d = a.shape
    return a.transpose(0, 2, 1, 3).reshape(b * h // n, n, t, d)


def _from_groups(a: Array, batch: int, heads: int) -> Array:
    """``[B·H/n, n, T, D] -> [B, T, H, D]``."""
    _, _, t, d = a.shape
    return a.reshape(batch, heads, t, d).transpose(0, 2, 1, 3)


def _to_blocks(a: Array, rows: int) -> Array:
    """``[n, T, ...] -> [T/rows, n, rows, ...]``: the query blocks of one group."""
    n, t = a.shape[:2]
    return jnp.moveaxis(a.reshape(n, t // rows, rows, *a.shape[2:]), 1, 0)


def _from_blocks(a: Array) -> Array:
    """``[T/rows, n, rows, ...] -> [n, T, ...]``."""
    a = jnp.moveaxis(a, 0, 1)
    return a.reshape(a.shape[0], a.shape[1] * a.shape[2], *a.shape[3:])


def _row_max(s: Array) -> Array:
    """``max(s, axis=-1, keepdims=True)`` as an elementwise maximum of column slices.

    XLA:CPU rewrites a long row reduction into a tree of ``reduce-window`` ops that run
    scalar: over SD-1's 4,096 keys the row max took as long as the ``q kᵀ`` matmul. The
    maximum of ``ROW_MAX_SLICE``-wide slices is one vectorised loop fusion, leaving a short
    reduction.
    """
    n = s.shape[-1]
    w = ROW_MAX_SLICE
    whole = n // w
    if whole < 2:
        return jnp.max(s, axis=-1, keepdims=True)
    m = functools.reduce(jnp.maximum, (s[..., i * w : (i + 1) * w] for i in range(whole)))
    m = jnp.max(m, axis=-1, keepdims=True)
    if n % w:
        m = jnp.maximum(m, jnp.max(s[..., whole * w :], axis=-1, keepdims=True))
    return m


def _with_ones(v: Array) -> Array:
    """``[..., T, D] -> [..., T, D + 1]``: a column of ones after the values, so that the
    ``p v`` matmul also yields the softmax denominators ``Σ p`` (no separate row sum)."""
    return jnp.concatenate([v, jnp.ones((*v.shape[:-1], 1), v.dtype)], axis=-1)


def _block_forward(q: Array, k: Array, v1: Array, scale: float) -> tuple[Array, Array]:
    """Query rows ``[n, R, D]`` against all keys, with ``v1 = _with_ones(v)``: output
    ``[n, R, D]`` and the rows' log-sum-exp ``[n, R]`` (float32 softmax)."""
    s = jnp.einsum("ntd,nsd->nts", q, k, preferred_element_type=jnp.float32)
    m = _row_max(s)  # of the unscaled logits: scale > 0 keeps the argmax
    p = jnp.exp((s - m) * scale)
    o = jnp.einsum("nts,nsd->ntd", p.astype(v1.dtype), v1, preferred_element_type=jnp.float32)
    denom = o[..., -1:]
    return (o[..., :-1] / denom).astype(q.dtype), (m * scale + jnp.log(denom))[..., 0]


def _group_forward(q: Array, k: Array, v: Array, scale: float, rows: int):
    """One group ``[n, T, D]``, its queries ``rows`` at a time (every row sees all keys,
    so the blocks need no running softmax)."""
    v1 = _with_ones(v)
    if rows == q.shape[1]:
        return _block_forward(q, k, v1, scale)
    o, lse = jax.lax.map(lambda qb: _block_forward(qb, k, v1, scale), _to_blocks(q, rows))
    return _from_blocks(o), _from_blocks(lse)


def _block_backward(qb, ob, lb, dob, k, v, scale):
    """Gradients of one query block: its ``dq`` and its share of ``dk`` and ``dv``."""
    f32 = jnp.float32
    s = jnp.einsum("ntd,nsd->nts", qb, k, preferred_element_type=f32) * scale
    p = jnp.exp(s - lb[..., None])  # the forward's probabilities
    dv = jnp.einsum("nts,ntd->nsd", p, dob, preferred_element_type=f32)
    dp = jnp.einsum("ntd,nsd->nts", dob, v, preferred_element_type=f32)
    delta = jnp.sum(dob.astype(f32) * ob.astype(f32), axis=-1, keepdims=True)
    ds = p * (dp - delta) * scale  # softmax Jacobian applied to dp
    dq = jnp.einsum("nts,nsd->ntd", ds, k, preferred_element_type=f32)
    dk = jnp.einsum("nts,ntd->nsd", ds, qb, preferred_element_type=f32)
    return dq, dk, dv


def _group_backward(q, k, v, o, lse, do, scale: float, rows: int):
    """One group's ``dq, dk, dv``; with query blocks, ``dk``/``dv`` sum over the blocks."""
    if rows == q.shape[1]:
        dq, dk, dv = _block_backward(q, o, lse, do, k, v, scale)
    else:

        def block(carry, g):
            dq, dk, dv = _block_backward(*g, k, v, scale)
            return (carry[0] + dk, carry[1] + dv), dq

        zeros = jnp.zeros(k.shape, jnp.float32)
        blocks = tuple(_to_blocks(a, rows) for a in (q, o, lse, do))
        (dk, dv), dq = jax.lax.scan(block, (zeros, zeros), blocks)
        dq = _from_blocks(dq)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunked(q: Array, k: Array, v: Array, n: int, rows: int) -> Array:
    return _chunked_fwd(q, k, v, n, rows)[0]


def _chunked_fwd(q: Array, k: Array, v: Array, n: int, rows: int):
    b, _, h, d = q.shape
    scale = d**-0.5
    o, lse = jax.lax.map(
        lambda g: _group_forward(*g, scale, rows),
        (_to_groups(q, n), _to_groups(k, n), _to_groups(v, n)),
    )
    return _from_groups(o, b, h), (q, k, v, o, lse)


def _chunked_bwd(n: int, rows: int, residuals, do: Array):
    q, k, v, o, lse = residuals
    b, _, h, d = q.shape
    scale = d**-0.5
    grads = jax.lax.map(
        lambda g: _group_backward(*g, scale, rows),
        (_to_groups(q, n), _to_groups(k, n), _to_groups(v, n), o, lse, _to_groups(do, n)),
    )
    return tuple(_from_groups(g, b, h) for g in grads)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def chunked_attention(
    q: Array,
    k: Array,
    v: Array,
    heads_per_group: int | None = None,
    rows_per_block: int | None = None,
) -> Array:
    """Softmax attention computed group by group, with a memory-lean custom VJP.

    Args:
      q, k, v: ``[B, T, H, Dh]`` (same shapes).
      heads_per_group: (batch, head) pairs per ``lax.map`` step; must divide ``B·H``.
        Default: ``heads_per_chunk(B·H, T)``.
      rows_per_block: query rows per inner step of a group; must divide T. Default:
        ``queries_per_block(T, heads_per_group)`` (all of them unless one group's logits
        exceed the cache budget, as at T = 4096).

    Returns:
      ``softmax(q kᵀ / √Dh) v`` as ``[B, T, H, Dh]``.
    """
    if q.shape != k.shape or q.shape != v.shape or q.ndim != 4:
        raise ValueError(
            f"chunked_attention needs q, k, v of one [B, T, H, Dh] shape; got "
            f"{q.shape}, {k.shape}, {v.shape}."
        )
    b, t, h, _ = q.shape
    n = heads_per_group or heads_per_chunk(b * h, t)
    if (b * h) % n:
        raise ValueError(f"heads_per_group={n} does not divide batch × heads = {b * h}.")
    rows = rows_per_block or queries_per_block(t, n)
    if t % rows:
        raise ValueError(f"rows_per_block={rows} does not divide the sequence length {t}.")
    return _chunked(q, k, v, n, rows)


# cuDNN's flash attention: half-precision inputs, head dim a multiple of 8 and at most
# 128 (256 from Hopper on; 128 is what every GPU JAX supports takes).
CUDNN_DTYPES = ("bfloat16", "float16")
CUDNN_MAX_HEAD_DIM = 128


def resolve_implementation(
    implementation: str,
    dtype: Any = jnp.float32,
    backend: str | None = None,
    head_dim: int | None = None,
) -> str:
    """The concrete kernel for ``implementation`` on ``backend`` at compute ``dtype``.

    ``auto`` is ``chunked`` on CPU, ``xla`` on TPU (XLA fuses it), and on GPU ``cudnn``
    (its fused flash attention) where the dtype is bfloat16/float16 and the head dim fits
    it, else ``xla``. Other names are returned as given.

    Args:
      implementation: one of ``IMPLEMENTATIONS``.
      dtype: the compute dtype of q, k, v.
      backend: JAX's backend name (default: ``jax.default_backend()``).
      head_dim: ``Dh``; None: not checked.

    Returns:
      ``xla``, ``cudnn`` or ``chunked``.

    Raises:
      ValueError: for an unknown implementation.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"Unknown attention implementation {implementation!r}; choose one of {IMPLEMENTATIONS}."
        )
    if implementation != "auto":
        return implementation
    backend = jax.default_backend() if backend is None else backend
    if backend == "cpu":
        return "chunked"
    if backend == "gpu" and not _cudnn_problems(dtype, backend, head_dim):
        return "cudnn"
    return "xla"


def _cudnn_problems(dtype: Any, backend: str, head_dim: int | None) -> list[str]:
    """What keeps cuDNN's flash attention from running, each with its fix."""
    dtype = jnp.dtype(dtype)
    problems = []
    if dtype.name not in CUDNN_DTYPES:
        problems.append(
            f"a bfloat16 or float16 compute dtype, but model.dtype is {dtype.name}: set "
            "--config.model.dtype=bfloat16"
        )
    if backend != "gpu":
        problems.append(
            f"a GPU, but JAX's backend is {backend}: set --config.model.attention=xla (or auto)"
        )
    if head_dim is not None and (head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM):
        problems.append(
            f"a head dim (embed_dim / num_heads) that is a multiple of 8 and at most "
            f"{CUDNN_MAX_HEAD_DIM}, but it is {head_dim}: change model.num_heads, or choose "
            "--config.model.attention=auto"
        )
    return problems


def check_implementation(
    implementation: str, dtype: Any, backend: str | None = None, head_dim: int | None = None
) -> None:
    """Fails early, with the fix, where ``implementation`` cannot run (at model build time).

    ``cudnn`` is cuDNN's flash-attention kernel: it takes bfloat16 or float16 inputs (the
    model's compute ``dtype``) with a head dim that is a multiple of 8 up to 128, on a GPU;
    elsewhere JAX fails only when the model is traced.

    Args:
      implementation: ``config.model.attention``.
      dtype: the model's compute dtype (``config.model.dtype``).
      backend: JAX's backend name (default: ``jax.default_backend()``).
      head_dim: ``embed_dim / num_heads``; None: not checked.

    Raises:
      ValueError: naming each unmet need and the flag that fixes it.
    """
    if implementation != "cudnn":
        return
    backend = jax.default_backend() if backend is None else backend
    problems = _cudnn_problems(dtype, backend, head_dim)
    if problems:
        raise ValueError(
            "model.attention=cudnn (cuDNN flash attention) needs " + "; and ".join(problems) + "."
        )


def dot_product_attention(q: Array, k: Array, v: Array, implementation: str = "auto") -> Array:
    """``softmax(q kᵀ / √Dh) v`` over ``[B, T, H, Dh]`` arrays, no mask.

    Args:
      q, k, v: query, key, value.
      implementation: ``auto`` (per backend and dtype: ``resolve_implementation``), ``xla``
        (``jax.nn.dot_product_attention``, XLA picks), ``cudnn`` (its cuDNN kernel; GPU
        only) or ``chunked``.

    Returns:
      ``[B, T, H, Dh]`` attention output.
    """
    impl = resolve_implementation(implementation, q.dtype, head_dim=q.shape[-1])
    if impl == "chunked":
        return chunked_attention(q, k, v)
    return jax.nn.dot_product_attention(q, k, v, implementation=None if impl == "xla" else impl)
