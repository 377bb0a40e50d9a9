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


def test_mixed_tasks_feed_clean_inputs_and_drop_their_losses():
    # given_map_prob / given_image_prob: per example, the map (or the image) is fed clean
    # and only the other stream's loss counts; the rest are joint examples as in the paper.
    batch = 4000
    x0, m0 = _data(batch)
    ctx = jnp.zeros((batch, 3, 2))
    seen = {}

    def zero_net(params, x, m, t, c):
        seen.update(x=np.asarray(x), m=np.asarray(m))
        return jnp.zeros_like(x), jnp.zeros_like(m)

    key = jax.random.key(5)
    terms = losses.pdm_loss_terms(
        zero_net, None, key, x0, m0, ctx, ctx[0], SCHED, given_map_prob=0.2, given_image_prob=0.3
    )
    clean_m = (seen["m"] == np.asarray(m0)).all(axis=(1, 2, 3))
    clean_x = (seen["x"] == np.asarray(x0)).all(axis=(1, 2, 3))
    assert not (clean_m & clean_x).any()
    assert abs(clean_m.mean() - 0.2) < 0.03 and abs(clean_x.mean() - 0.3) < 0.03
    image_loss, map_loss = np.asarray(terms["image_loss"]), np.asarray(terms["map_loss"])
    np.testing.assert_array_equal(image_loss[clean_x], 0.0)
    np.testing.assert_array_equal(map_loss[clean_m], 0.0)
    joint = ~clean_m & ~clean_x
    assert (image_loss[joint] > 0).all() and (image_loss[clean_m] > 0).all()
    np.testing.assert_allclose(map_loss[joint | clean_x], 1.0, rtol=1e-6)  # zero net, ±1 bits
    # The joint examples are noised exactly as without the option.
    plain = losses.noise_inputs(jax.random.split(key)[0], x0, m0, SCHED)
    np.testing.assert_array_equal(seen["x"][joint], np.asarray(plain.x_n)[joint])
    np.testing.assert_array_equal(seen["m"][joint], np.asarray(plain.m_n)[joint])
    with pytest.raises(ValueError, match="sum ≤ 1"):
        losses.pdm_loss_terms(
            *(zero_net, None, key, x0, m0, ctx, ctx[0], SCHED),
            given_map_prob=0.7,
            given_image_prob=0.4,
        )


@pytest.mark.parametrize("prediction", losses.IMAGE_PREDICTIONS)
def test_min_snr_weight_caps_the_x0_weight_at_gamma(prediction):
    # In units of x_0 error, ε-loss weighs a step by SNR, v by SNR + 1, x_0 by 1; times the
    # min-SNR factor, every parametrisation weighs it by min(SNR, γ).
    abar = jnp.asarray(np.asarray(SCHED.alphas_cumprod)[[0, 100, 300, 600, 999]])
    snr = np.asarray(abar / (1 - abar), np.float64)
    x0_weight = {"eps": snr, "v": snr + 1, "x0": np.ones_like(snr)}[prediction]
    w = np.asarray(losses.snr_loss_weight(abar, 5.0, prediction))
    np.testing.assert_allclose(w * x0_weight, np.minimum(snr, 5.0), rtol=1e-4)
    with pytest.raises(ValueError, match="image_prediction"):
        losses.snr_loss_weight(abar, 5.0, "score")


def test_min_snr_gamma_scales_the_image_loss_only():
    x0, m0 = _data(64)
    ctx = jnp.zeros((64, 3, 2))
    zero_net = lambda p, x, m, t, c: (jnp.zeros_like(x), jnp.zeros_like(m))
    args = (zero_net, None, jax.random.key(6), x0, m0, ctx, ctx[0], SCHED)
    plain = losses.pdm_loss_terms(*args)
    weighted = losses.pdm_loss_terms(*args, min_snr_gamma=5.0)
    noised = losses.noise_inputs(jax.random.split(jax.random.key(6))[0], x0, m0, SCHED)
    w = losses.snr_loss_weight(noised.abar, 5.0)
    np.testing.assert_allclose(weighted["image_loss"], w * plain["image_loss"], rtol=1e-6)
    np.testing.assert_array_equal(weighted["map_loss"], plain["map_loss"])
    assert float(w.min()) < 0.5 and float(w.max()) == 1.0  # some steps have SNR > γ
