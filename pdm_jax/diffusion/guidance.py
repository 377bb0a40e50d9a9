"""Classifier-free guidance as one wrapper that doubles the batch (DESIGN §4).

The conditional and unconditional predictions come from *one* network call on the batch
``[cond; uncond]`` (same image and map inputs, the empty-caption context for the second
half); both outputs, ε̂ and M̂_0, are combined as ``cond + s·(cond − uncond)``. With
``s = 0`` the unconditional half is skipped entirely.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
# (x_t, m_t, t_model, context) -> eps or (eps, map0)
NetFn = Callable[[Array, Array | None, Array, Array], Any]


def _double(x: Array | None) -> Array | None:
    return None if x is None else jnp.concatenate([x, x], axis=0)


def guided(net_fn: NetFn, context: Array, empty_context: Array, scale: float) -> NetFn:
    """Wraps a network so that it returns guided predictions.

    Args:
      net_fn: ``(x_t, m_t, t_model, context)`` → ε̂ or ``(ε̂, M̂_0)``; batch-leading arrays.
      context: ``[B, T, D]`` conditional contexts.
      empty_context: ``[T, D]`` empty-caption context.
      scale: guidance scale s (official default 1; 0 = plain conditional model).

    Returns:
      ``fn(x_t, m_t, t_model)`` with the same output structure as ``net_fn``.
    """

    def fn(x_t: Array, m_t: Array | None, t_model: Array):
        if scale == 0:
            return net_fn(x_t, m_t, t_model, context)
        batch = x_t.shape[0]
        uncond = jnp.broadcast_to(empty_context.astype(context.dtype), context.shape)
        out = net_fn(
            _double(x_t),
            _double(m_t),
            _double(jnp.broadcast_to(t_model, (batch,))),
            jnp.concatenate([context, uncond], axis=0),
        )
        return jax.tree.map(lambda o: o[:batch] + scale * (o[:batch] - o[batch:]), out)

    return fn
