"""The joint PDM sampler: tasks keep their known parts exact; one trace per shape."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdm_jax.diffusion import reverse as sampling
from pdm_jax.diffusion.schedules import discrete_sd_schedule

SCHED = discrete_sd_schedule()
OPTS = sampling.SamplerOptions(steps=6, order=2, method="multistep", cfg_scale=1.5)
B, S, F = 2, 4, 2
IMG, MAP = (S, S, 3), (F * S, F * S, 8)


def toy_net(params, x, m, t, c):
    """A small nonlinear 'network' touching every input."""
    cond = jnp.tanh(c.mean(axis=(1, 2)))[:, None, None, None]
    tt = (t / 1000.0)[:, None, None, None]
    m_mean = m.mean(axis=(1, 2, 3), keepdims=True)  # couples all map pixels and the image
    eps = params["a"] * jnp.tanh(x) + cond * tt + 0.1 * m_mean
    pooled = jax.image.resize(
        jnp.mean(x, -1, keepdims=True), (x.shape[0], F * S, F * S, 1), "nearest"
    )
    map0 = jnp.tanh(params["b"] * m + pooled + cond + m_mean)
    return eps, map0


PARAMS = {"a": jnp.float32(0.7), "b": jnp.float32(1.3)}
RNG = np.random.default_rng(0)
CTX = jnp.asarray(RNG.standard_normal((B, 3, 5)), jnp.float32)
EMPTY = jnp.zeros((3, 5), jnp.float32)
KNOWN_X = jnp.asarray(RNG.standard_normal((B, *IMG)), jnp.float32)
KNOWN_M = jnp.asarray(np.sign(RNG.standard_normal((B, *MAP))), jnp.float32)


def run(net=toy_net, **kw):
    fn = functools.partial(
        sampling.sample_pdm, net, image_shape=IMG, map_shape=MAP, options=OPTS, schedule=SCHED
    )
    return jax.jit(functools.partial(fn, **kw))(PARAMS, jax.random.key(0), CTX, EMPTY)


def test_cogenerate_shapes_and_finite():
    out = run()
    assert out["x"].shape == (B, *IMG) and out["m"].shape == (B, *MAP)
    assert np.isfinite(np.asarray(out["x"])).all() and np.isfinite(np.asarray(out["m"])).all()


def test_given_map_feeds_the_clean_map_and_returns_it():
    seen = []

    def net(params, x, m, t, c):
        jax.debug.callback(lambda v: seen.append(np.asarray(v)), m)
        return toy_net(params, x, m, t, c)

    fn = functools.partial(
        sampling.sample_pdm,
        net,
        image_shape=IMG,
        map_shape=MAP,
        options=OPTS,
        schedule=SCHED,
        task="given_map",
    )
    out = fn(PARAMS, jax.random.key(0), CTX, EMPTY, known_m=KNOWN_M)
    np.testing.assert_array_equal(out["m"], KNOWN_M)
    assert len(seen) == OPTS.steps
    for m in seen:  # CFG doubles the batch; both halves see the clean map
        np.testing.assert_array_equal(m, jnp.concatenate([KNOWN_M, KNOWN_M]))


def test_given_image_keeps_the_image_exact_and_generates_a_map():
    out = run(task="given_image", known_x=KNOWN_X)
    np.testing.assert_array_equal(out["x"], KNOWN_X)
    base = run()
    assert not np.allclose(out["m"], base["m"])  # the map depends on the given image


@pytest.mark.parametrize("which", ["x", "m", "both"])
def test_inpainting_keeps_known_regions_exact(which):
    mask_x = jnp.zeros((B, S, S, 1)).at[:, :, : S // 2].set(1.0)
    mask_m = jnp.zeros((B, F * S, F * S, 1)).at[:, : F * S // 2].set(1.0)
    kw = {}
    if which in ("x", "both"):
        kw.update(known_x=KNOWN_X, mask_x=mask_x)
    if which in ("m", "both"):
        kw.update(known_m=KNOWN_M, mask_m=mask_m)
    out = run(task="inpaint", **kw)
    free = run()
    if "known_x" in kw:
        np.testing.assert_array_equal(out["x"][:, :, : S // 2], KNOWN_X[:, :, : S // 2])
        assert not np.allclose(out["x"][:, :, S // 2 :], KNOWN_X[:, :, S // 2 :])
    if "known_m" in kw:
        np.testing.assert_array_equal(out["m"][:, : F * S // 2], KNOWN_M[:, : F * S // 2])
    # The unknown region is influenced by the known one (it is not free generation).
    assert not np.allclose(out["m"][:, F * S // 2 :], free["m"][:, F * S // 2 :])


def test_one_trace_per_shape():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def sampler(params, rng, ctx, empty):
        return sampling.sample_pdm(
            toy_net, params, rng, ctx, empty, SCHED, image_shape=IMG, map_shape=MAP, options=OPTS
        )

    a = sampler(PARAMS, jax.random.key(0), CTX, EMPTY)
    b = sampler({"a": jnp.float32(0.1), "b": jnp.float32(2.0)}, jax.random.key(1), CTX * 2, EMPTY)
    assert not np.allclose(a["x"], b["x"])


def test_bad_task_arguments_raise():
    with pytest.raises(ValueError, match="is not a sampling task"):
        run(task="segment")
    with pytest.raises(ValueError, match="needs known_m"):
        run(task="given_map")
    with pytest.raises(ValueError, match="at least one known region"):
        run(task="inpaint")
    with pytest.raises(ValueError, match="mask_x"):
        run(task="inpaint", known_x=KNOWN_X)


def _reparametrised(prediction):
    """toy_net's image output re-expressed as v or x̂_0 (the same model, another head)."""

    def net(params, x, m, t, c):
        eps, map0 = toy_net(params, x, m, t, c)
        tc = (t / SCHED.num_timesteps)[:, None, None, None]
        alpha, sigma = SCHED.marginal_alpha(tc), SCHED.marginal_std(tc)
        x0 = (x - sigma * eps) / alpha
        return (x0 if prediction == "x0" else alpha * eps - sigma * x0), map0

    return net


@pytest.mark.parametrize("prediction", ["x0", "v"])
@pytest.mark.parametrize("task", ["cogenerate", "given_map"])
def test_image_predictions_of_one_model_give_one_sample(prediction, task):
    kw = {"known_m": KNOWN_M} if task == "given_map" else {}
    want = run(task=task, **kw)
    got = run(_reparametrised(prediction), task=task, image_prediction=prediction, **kw)
    np.testing.assert_allclose(got["x"], want["x"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["m"], want["m"], rtol=1e-4, atol=1e-4)


def test_unknown_image_prediction_raises():
    with pytest.raises(ValueError, match="image_prediction"):
        run(image_prediction="score")


def test_sde_method_noises_each_stream_at_its_own_scale():
    # A network whose data predictions are 0 leaves only the noise: the map, noised with
    # std map_noise_std in training, must get fresh noise at that scale too.
    def zero_net(params, x, m, t, c):
        tc = (t / SCHED.num_timesteps)[:, None, None, None]
        return x / SCHED.marginal_std(tc), jnp.zeros_like(m)

    fn = functools.partial(
        sampling.sample_pdm,
        zero_net,
        schedule=SCHED,
        image_shape=(16, 16, 3),
        map_shape=(32, 32, 8),
        options=sampling.SamplerOptions(steps=8, order=2, method="sde_multistep"),
        map_noise_std=2.0,
    )
    out = jax.jit(fn)(PARAMS, jax.random.key(0), CTX, EMPTY)
    ratio = float(jnp.std(out["m"]) / jnp.std(out["x"]))
    assert 1.8 < ratio < 2.2, ratio
    again = jax.jit(fn)(PARAMS, jax.random.key(0), CTX, EMPTY)
    chex.assert_trees_all_close(out, again)  # the seed fixes the fresh noise too
    other = jax.jit(fn)(PARAMS, jax.random.key(1), CTX, EMPTY)
    assert not np.allclose(out["x"], other["x"])


def test_sde_method_keeps_given_parts_exact():
    opts = sampling.SamplerOptions(steps=6, order=2, method="sde_multistep")
    fn = functools.partial(
        sampling.sample_pdm, toy_net, image_shape=IMG, map_shape=MAP, options=opts, schedule=SCHED
    )
    given = fn(PARAMS, jax.random.key(0), CTX, EMPTY, task="given_map", known_m=KNOWN_M)
    np.testing.assert_array_equal(given["m"], KNOWN_M)
    seg = fn(PARAMS, jax.random.key(0), CTX, EMPTY, task="given_image", known_x=KNOWN_X)
    np.testing.assert_array_equal(seg["x"], KNOWN_X)
