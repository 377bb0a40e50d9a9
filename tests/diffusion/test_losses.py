"""Forward noising, context dropout and the joint loss terms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdm_jax.diffusion import analog_bits, losses
from pdm_jax.diffusion.schedules import discrete_sd_schedule

SCHED = discrete_sd_schedule()


def _data(batch=512):
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.standard_normal((batch, 4, 4, 3)), jnp.float32)
    ids = rng.integers(0, 201, (batch, 8, 8)).astype(np.int32)
    return x0, analog_bits.ids_to_bits(ids)


def test_noise_inputs_follow_the_discrete_forward_process():
    x0, m0 = _data()
    out = losses.noise_inputs(jax.random.key(0), x0, m0, SCHED, map_noise_std=2.0)
    n = np.asarray(out.n)
    assert n.min() >= 1 and n.max() <= 1000 and len(np.unique(n)) > 300
    abar = np.asarray(SCHED.alphas_cumprod)[n - 1][:, None, None, None]
    # x_n = √ᾱ x0 + √(1−ᾱ) ε exactly, with the returned ε.
    np.testing.assert_allclose(
        out.x_n, np.sqrt(abar) * x0 + np.sqrt(1 - abar) * out.eps, rtol=1e-5, atol=1e-5
    )
    # The map noise is N(0, 2²): recover it and check its moments.
    eps_m = (np.asarray(out.m_n) - np.sqrt(abar) * np.asarray(m0)) / np.sqrt(1 - abar)
    assert abs(eps_m.std() - 2.0) < 0.02 and abs(eps_m.mean()) < 0.02
    assert abs(np.asarray(out.eps).std() - 1.0) < 0.02


def test_drop_context_uses_the_empty_context_with_probability_p():
    ctx = jnp.ones((4000, 3, 2))
    empty = jnp.full((3, 2), -5.0)
    out = np.asarray(losses.drop_context(jax.random.key(1), ctx, empty, 0.1))
    dropped = (out == -5.0).all(axis=(1, 2))
    kept = (out == 1.0).all(axis=(1, 2))
    assert (dropped | kept).all()
    assert abs(dropped.mean() - 0.1) < 0.015
    none = losses.drop_context(jax.random.key(1), ctx, empty, 0.0)
    np.testing.assert_array_equal(none, ctx)


def test_loss_terms_closed_form_for_a_zero_network():
    x0, m0 = _data(64)
    ctx = jnp.zeros((64, 3, 2))

    def zero_net(params, x, m, t, c):
        return jnp.zeros_like(x), jnp.zeros_like(m)

    terms = losses.pdm_loss_terms(
        zero_net, None, jax.random.key(2), x0, m0, ctx, ctx[0], SCHED, map_loss_weight=0.5
    )
    noised = losses.noise_inputs(jax.random.split(jax.random.key(2))[0], x0, m0, SCHED)
    expected_image = np.mean(np.square(noised.eps), axis=(1, 2, 3))
    np.testing.assert_allclose(terms["image_loss"], expected_image, rtol=1e-6)
    np.testing.assert_allclose(terms["map_loss"], np.ones(64), rtol=1e-6)  # bits are ±1
    np.testing.assert_allclose(terms["loss"], expected_image + 0.5, rtol=1e-6)
    assert terms["loss"].shape == (64,)


def test_given_map_mode_feeds_the_clean_map_and_drops_the_map_loss():
    x0, m0 = _data(8)
    ctx = jnp.zeros((8, 3, 2))
    seen = {}

    def net(params, x, m, t, c):
        seen["m"] = m
        return jnp.zeros_like(x), jnp.zeros_like(m)

    terms = losses.pdm_loss_terms(
        net, None, jax.random.key(3), x0, m0, ctx, ctx[0], SCHED, use_given_map=True
    )
    np.testing.assert_array_equal(seen["m"], m0)
    np.testing.assert_array_equal(terms["map_loss"], np.zeros(8))


def test_image_only_model():
    x0, _ = _data(8)
    ctx = jnp.zeros((8, 3, 2))
    terms = losses.pdm_loss_terms(
        lambda p, x, m, t, c: x * 0, None, jax.random.key(4), x0, None, ctx, ctx[0], SCHED
    )
    assert terms["image_loss"].shape == (8,)
    np.testing.assert_array_equal(terms["map_loss"], np.zeros(8))


def test_image_targets_closed_form():
    x0, m0 = _data(64)
    noised = losses.noise_inputs(jax.random.key(3), x0, m0, SCHED)
    a = np.sqrt(np.asarray(noised.abar))[:, None, None, None]
    s = np.sqrt(1 - np.asarray(noised.abar))[:, None, None, None]
    np.testing.assert_array_equal(losses.image_target(noised, x0, "eps"), noised.eps)
    np.testing.assert_array_equal(losses.image_target(noised, x0, "x0"), x0)
    v = np.asarray(losses.image_target(noised, x0, "v"))
    np.testing.assert_allclose(v, a * np.asarray(noised.eps) - s * np.asarray(x0), atol=1e-6)
    # v carries the same information: x_0 = √ᾱ x_n − √(1−ᾱ) v.
    np.testing.assert_allclose(a * np.asarray(noised.x_n) - s * v, x0, atol=1e-5)
    with pytest.raises(ValueError, match="image_prediction"):
        losses.image_target(noised, x0, "score")


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_loss_terms_regress_the_chosen_image_target(prediction):
    x0, m0 = _data(64)
    ctx = jnp.zeros((64, 3, 2))

    def zero_net(params, x, m, t, c):
        return jnp.zeros_like(x), jnp.zeros_like(m)

    terms = losses.pdm_loss_terms(
        zero_net, None, jax.random.key(2), x0, m0, ctx, ctx[0], SCHED, image_prediction=prediction
    )
    noised = losses.noise_inputs(jax.random.split(jax.random.key(2))[0], x0, m0, SCHED)
    target = np.asarray(losses.image_target(noised, x0, prediction))
    np.testing.assert_allclose(
        terms["image_loss"], np.mean(np.square(target), axis=(1, 2, 3)), rtol=1e-5
    )
