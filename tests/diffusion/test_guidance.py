"""Classifier-free guidance: one doubled call equals two separate calls combined."""

import jax.numpy as jnp
import numpy as np

from pdm_jax.diffusion.guidance import guided


def _net(x, m, t, c):
    # Depends nonlinearly on every input so that cond and uncond differ.
    s = jnp.tanh(c.sum(axis=(1, 2)))[:, None, None, None]
    tt = t[:, None, None, None] / 1000
    return jnp.sin(x) * s + tt, jnp.cos(m) * s - tt


def test_guided_matches_two_calls():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 4, 4, 2)), jnp.float32)
    m = jnp.asarray(rng.standard_normal((3, 8, 8, 8)), jnp.float32)
    c = jnp.asarray(rng.standard_normal((3, 5, 6)), jnp.float32)
    empty = jnp.asarray(rng.standard_normal((5, 6)), jnp.float32)
    t = jnp.asarray([10.0, 500.0, 990.0])
    calls = []

    def counting(*args):
        calls.append(args[0].shape[0])
        return _net(*args)

    for s in (1.0, 3.5):
        eps, map0 = guided(counting, c, empty, s)(x, m, t)
        ce, cm = _net(x, m, t, c)
        ue, um = _net(x, m, t, jnp.broadcast_to(empty, c.shape))
        np.testing.assert_allclose(eps, ce + s * (ce - ue), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(map0, cm + s * (cm - um), rtol=1e-5, atol=1e-6)
    assert calls == [6, 6]  # one batched [cond, uncond] call per guided call


def test_scale_zero_is_the_conditional_model_with_one_call():
    x = jnp.ones((2, 4, 4, 2))
    m = jnp.ones((2, 8, 8, 8))
    c = jnp.ones((2, 5, 6))
    calls = []

    def counting(*args):
        calls.append(args[0].shape[0])
        return _net(*args)

    eps, _ = guided(counting, c, jnp.zeros((5, 6)), 0.0)(x, m, jnp.ones(2))
    np.testing.assert_allclose(eps, _net(x, m, jnp.ones(2), c)[0])
    assert calls == [2]
