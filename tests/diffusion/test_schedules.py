"""Tests for the discrete SD schedule and its continuous VP view (closed forms, float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdm_jax.diffusion import schedules

N = 1000


def _sd_alphas_cumprod() -> np.ndarray:
    betas = np.linspace(0.00085**0.5, 0.012**0.5, N) ** 2
    return np.cumprod(1.0 - betas)


def test_knots_match_discrete_schedule():
    with jax.enable_x64(True):
        sch = schedules.discrete_sd_schedule()
        abar = _sd_alphas_cumprod()
        n = np.arange(1, N + 1)
        t = n / N  # the knot of training step n
        assert sch.num_timesteps == N
        assert sch.dtype == jnp.float64
        np.testing.assert_allclose(sch.alphas_cumprod, abar, rtol=1e-13)
        np.testing.assert_allclose(sch.discrete_alphas_cumprod(n), abar, rtol=1e-13)
        np.testing.assert_allclose(sch.discrete_alphas_cumprod(jnp.array([1, N])), abar[[0, -1]])
        np.testing.assert_allclose(sch.marginal_alpha(t) ** 2, abar, rtol=1e-12)
        np.testing.assert_allclose(sch.marginal_log_mean_coeff(t), 0.5 * np.log(abar), rtol=1e-12)
        np.testing.assert_allclose(sch.marginal_std(t) ** 2, 1.0 - abar, rtol=1e-10)
        lam = 0.5 * np.log(abar / (1.0 - abar))
        np.testing.assert_allclose(sch.marginal_lambda(t), lam, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(sch.model_time(t), n, rtol=1e-12)
        # Endpoints of the SD schedule: β_1 = 0.00085, and λ(1) ≈ −2.68 (no clipping).
        np.testing.assert_allclose(sch.alphas_cumprod[0], 1.0 - 0.00085, rtol=1e-14)
        assert float(sch.marginal_lambda(1.0)) == pytest.approx(-2.682, abs=1e-3)


def test_log_alpha_is_piecewise_linear_and_extrapolated():
    with jax.enable_x64(True):
        sch = schedules.discrete_sd_schedule()
        log_abar = 0.5 * np.log(_sd_alphas_cumprod())
        n = np.array([1, 17, 500, 998])
        for w in (0.25, 0.5, 0.9):
            t = (n + w) / N  # between knots n and n + 1
            want = (1 - w) * log_abar[n - 1] + w * log_abar[n]
            np.testing.assert_allclose(sch.marginal_log_mean_coeff(t), want, rtol=1e-12)
        # Below the first knot the first segment is extended (as DPM-Solver's interpolate_fn).
        slope = (log_abar[1] - log_abar[0]) * N
        np.testing.assert_allclose(
            sch.marginal_log_mean_coeff(0.5 / N), log_abar[0] - 0.5 * slope / N, rtol=1e-12
        )


def test_inverse_lambda_round_trip():
    with jax.enable_x64(True):
        sch = schedules.discrete_sd_schedule()
        t = np.concatenate([np.linspace(1.0 / N, 1.0, 257), np.arange(1, N + 1) / N])
        np.testing.assert_allclose(sch.inverse_lambda(sch.marginal_lambda(t)), t, atol=1e-12)
        lam = np.linspace(-2.6, 3.5, 101)
        np.testing.assert_allclose(sch.marginal_lambda(sch.inverse_lambda(lam)), lam, atol=1e-10)
    sch32 = schedules.discrete_sd_schedule()  # float32 (x64 off)
    assert sch32.dtype == jnp.float32
    t32 = np.linspace(1.0 / N, 1.0, 101)
    np.testing.assert_allclose(
        sch32.inverse_lambda(sch32.marginal_lambda(t32)), t32, atol=2e-6, rtol=1e-5
    )


def test_float32_close_to_float64():
    t = np.linspace(1.0 / N, 1.0, 333)
    lam32 = schedules.discrete_sd_schedule().marginal_lambda(t)
    with jax.enable_x64(True):
        lam64 = schedules.discrete_sd_schedule().marginal_lambda(t)
    assert lam32.dtype == jnp.float32
    np.testing.assert_allclose(lam32, lam64, atol=3e-6, rtol=1e-5)


def test_schedule_is_a_jittable_pytree():
    sch = schedules.discrete_sd_schedule(num_timesteps=50)
    assert len(jax.tree.leaves(sch)) == 3
    t = jnp.linspace(0.02, 1.0, 7)
    lam = jax.jit(lambda s, t: s.marginal_lambda(t))(sch, t)
    np.testing.assert_allclose(lam, sch.marginal_lambda(t), rtol=1e-6)
    rebuilt = jax.tree.map(lambda a: a, sch)
    assert isinstance(rebuilt, schedules.VPSchedule)
    assert rebuilt.num_timesteps == 50


def test_host_view_computes_the_same_in_numpy():
    with jax.enable_x64(True):
        sch = schedules.discrete_sd_schedule()
        host = sch.on_host()
        t = np.linspace(0.5 / N, 1.0, 77)
        assert host.xnp is np and sch.xnp is jnp
        for name in (
            "marginal_log_mean_coeff",
            "marginal_alpha",
            "marginal_std",
            "marginal_lambda",
        ):
            got = getattr(host, name)(t)
            assert isinstance(got, np.ndarray)
            np.testing.assert_allclose(got, getattr(sch, name)(t), rtol=1e-13, atol=1e-15)
        alpha, sigma, lam = host.marginal_coeffs(t)
        np.testing.assert_allclose(alpha, sch.marginal_alpha(t), rtol=1e-13)
        np.testing.assert_allclose(sigma, sch.marginal_std(t), rtol=1e-13)
        np.testing.assert_allclose(lam, sch.marginal_lambda(t), rtol=1e-13, atol=1e-15)
        lams = np.linspace(-3.0, 4.0, 50)
        np.testing.assert_allclose(host.inverse_lambda(lams), sch.inverse_lambda(lams), rtol=1e-13)
    with pytest.raises(jax.errors.TracerArrayConversionError):
        jax.jit(lambda s: s.on_host().t_array[0])(schedules.discrete_sd_schedule())


def test_schedule_from_betas_clips_low_log_snr_like_dpm_solver():
    with jax.enable_x64(True):
        # A cosine-like tail: the last betas are large, so λ drops below −5.1 near t = 1.
        betas = np.concatenate([np.full(90, 0.01), np.linspace(0.05, 0.999, 10)])
        sch = schedules.schedule_from_betas(betas)
        log_alpha = 0.5 * np.cumsum(np.log(1.0 - betas))
        lam = log_alpha - 0.5 * np.log(1.0 - np.exp(2.0 * log_alpha))
        kept = int(np.sum(lam >= -5.1))
        assert kept < 100
        assert sch.num_timesteps == kept
        np.testing.assert_allclose(sch.log_alpha_array, log_alpha[:kept], rtol=1e-13)
        np.testing.assert_allclose(sch.t_array, np.arange(1, kept + 1) / kept, rtol=1e-14)
        assert sch.alphas_cumprod.shape == (100,)  # the training schedule stays whole
        unclipped = schedules.schedule_from_betas(betas, clipped_lambda=None)
        assert unclipped.num_timesteps == 100


@pytest.mark.parametrize("betas", [np.array([0.1]), np.array([0.1, 1.0]), np.zeros((2, 2))])
def test_schedule_from_betas_rejects_bad_betas(betas):
    with pytest.raises(ValueError, match="beta"):
        schedules.schedule_from_betas(betas)
