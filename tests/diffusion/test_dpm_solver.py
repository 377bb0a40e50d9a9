"""DPM-Solver++ tests against the closed-form Gaussian probability-flow ODE (float64).

For data N(μ, s²I) noised as `x_t = α_t x_0 + c σ_t ε` (c = 1 for the image leaf, c = 2 for
the map leaf), the exact data prediction is `E[x_0|x_t] = (s² α x + c² σ² μ)/(s² α² + c² σ²)`
and the flow keeps `(x_t − α_t μ)/√(s² α_t² + c² σ_t²)` constant, so its solution is known.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdm_jax.diffusion import dpm_solver, schedules

MU = {"x": 0.5, "m": -0.3}
STD = {"x": 0.8, "m": 0.6}
NOISE = {"x": 1.0, "m": 2.0}  # the map leaf is noised with std 2, as in PDM
N = 1000
T_0 = 1.0 / N


def _gaussian_pred(sch, state, t):
    alpha, sigma = sch.marginal_alpha(t), sch.marginal_std(t)
    return {
        k: (STD[k] ** 2 * alpha * x + NOISE[k] ** 2 * sigma**2 * MU[k])
        / (STD[k] ** 2 * alpha**2 + NOISE[k] ** 2 * sigma**2)
        for k, x in state.items()
    }


def _exact_flow(sch, state, t_from, t_to):
    def marginal(k, t):
        alpha = sch.marginal_alpha(t)
        return alpha, jnp.sqrt(STD[k] ** 2 * alpha**2 + NOISE[k] ** 2 * sch.marginal_std(t) ** 2)

    out = {}
    for k, x in state.items():
        (a_from, sd_from), (a_to, sd_to) = marginal(k, t_from), marginal(k, t_to)
        out[k] = a_to * MU[k] + sd_to * (x - a_from * MU[k]) / sd_from
    return out


def _x_T():
    return {
        "x": jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4)),  # image leaf
        "m": NOISE["m"] * jax.random.normal(jax.random.PRNGKey(1), (2, 5)),  # map leaf
    }


def _max_err(a, b):
    return max(float(jnp.abs(a[k] - b[k]).max()) for k in a)


def _rms_err(a, b):
    return max(float(jnp.sqrt(jnp.mean((a[k] - b[k]) ** 2))) for k in a)


def _solve_gaussian(sch, x_T, **kwargs):
    pred = functools.partial(_gaussian_pred, sch)
    return jax.jit(lambda x: dpm_solver.sample(pred, x, sch, **kwargs))(x_T)


# (method, order, NFE pair, expected global order). Order 3 is checked at larger NFE where
# the error is asymptotic; the mixed singlestep methods use NFE ≡ 2 (mod 3), whose last
# step has order 2 (a final order-1 step would cap the global order at 2). Multistep order 3
# is globally second order: its warm-up starts with a first-order step (as in the reference).
CONVERGENCE = [
    ("multistep", 1, (24, 48), 1),
    ("multistep", 2, (24, 48), 2),
    ("multistep", 3, (48, 96), 2),
    ("singlestep", 1, (24, 48), 1),
    ("singlestep", 2, (24, 48), 2),
    ("singlestep", 3, (95, 191), 3),
    ("singlestep_fixed", 1, (24, 48), 1),
    ("singlestep_fixed", 2, (24, 48), 2),
    ("singlestep_fixed", 3, (96, 192), 3),
    ("fast", 1, (24, 48), 1),
    ("fast", 2, (24, 48), 2),
    ("fast", 3, (95, 191), 3),
]


@pytest.mark.parametrize(("method", "order", "nfes", "rate"), CONVERGENCE)
def test_converges_to_exact_flow_at_the_solver_order(method, order, nfes, rate):
    with jax.enable_x64(True):
        sch = schedules.discrete_sd_schedule()
        x_T = _x_T()
        exact = _exact_flow(sch, x_T, 1.0, T_0)
        errs = [
            _rms_err(
                _solve_gaussian(
                    sch, x_T, steps=steps, order=order, method=method, skip_type="logSNR"
                ),
                exact,
            )
            for steps in nfes
        ]
        observed = np.log(errs[0] / errs[1]) / np.log(nfes[1] / nfes[0])
        assert rate - 0.3 < observed < rate + 0.3 + 1.2 * (order == 3), (errs, observed)
        assert errs[1] < {1: 0.05, 2: 3e-3, 3: 1e-4}[order], errs
        if method == "multistep" and order == 3:
            second = _solve_gaussian(
                sch, x_T, steps=nfes[1], order=2, method=method, skip_type="logSNR"
            )
            assert errs[1] < 0.5 * _rms_err(second, exact)


def test_traced_once_per_shape_and_model_traced_once():
    with jax.enable_x64(True):
        sch = schedules.discrete_sd_schedule()
        traces = []

        def pred(state, t, shift):
            traces.append(t.shape)
            return jax.tree.map(lambda v: v + shift, _gaussian_pred(sch, state, t))

        @jax.jit
        @chex.assert_max_traces(n=1)
        def run(x_T, shift):
            return dpm_solver.sample(
                lambda x, t: pred(x, t, shift), x_T, sch, steps=8, order=3, method="singlestep"
            )

        a = run(_x_T(), 0.0)
        b = run(jax.tree.map(lambda v: v + 1.0, _x_T()), 0.5)
        assert traces == [()]  # one trace of the model for 8 evaluations, scalar time
        assert not np.allclose(a["x"], b["x"])

        traces.clear()
        sampler = dpm_solver.make_sampler(pred, sch, steps=6, order=2, method="multistep")
        want = dpm_solver.sample(
            lambda x, t: pred(x, t, 0.25), _x_T(), sch, steps=6, order=2, method="multistep"
        )
        chex.assert_trees_all_close(sampler(_x_T(), 0.25), want, rtol=1e-12)
        sampler(_x_T(), 0.5)
        assert len(traces) == 2  # the eager reference run above, then one compile


@pytest.mark.parametrize("method", dpm_solver.METHODS)
def test_step_callback_clamps_a_leaf_and_sees_outer_times(method):
    with jax.enable_x64(True):
        sch = schedules.discrete_sd_schedule()
        x_T = _x_T()
        exact_map = lambda t: _exact_flow(sch, x_T, 1.0, t)["m"]
        seen = []

        def clamp_map(x, t):
            jax.debug.callback(lambda tt: seen.append(float(tt)), t)
            return {"x": x["x"], "m": exact_map(t)}

        kwargs = dict(steps=7, order=3, method=method, skip_type="time_uniform")
        if method in dpm_solver.STOCHASTIC_METHODS:
            kwargs.update(order=2, rng=jax.random.key(3))
        pred = functools.partial(_gaussian_pred, sch)
        out = jax.jit(lambda x: dpm_solver.sample(pred, x, sch, step_callback=clamp_map, **kwargs))(
            x_T
        )
        free = jax.jit(lambda x: dpm_solver.sample(pred, x, sch, **kwargs))(x_T)
        exact = _exact_flow(sch, x_T, 1.0, T_0)
        np.testing.assert_allclose(out["m"], exact["m"], rtol=1e-12)
        assert _max_err({"m": free["m"]}, {"m": exact["m"]}) > 1e-6
        np.testing.assert_allclose(out["x"], free["x"], rtol=1e-13)  # leaves independent here
        # One call per outer step, at the times reached (never at intermediate points). The
        # host copy of t may arrive as float32: enable_x64 is thread-local, and the callback
        # can run on a runtime thread.
        grid = np.linspace(1.0, T_0, 8)
        outer = {
            "multistep": grid[1:],
            "singlestep": grid[[3, 6, 7]],  # orders [3, 3, 1]
            "singlestep_fixed": np.linspace(1.0, T_0, 3)[1:],  # orders [3, 3]
            "fast": grid[[3, 6, 7]],
            "sde_multistep": grid[1:],
        }[method]
        np.testing.assert_allclose(sorted(seen, reverse=True), outer, rtol=1e-6)


def test_sde_first_order_step_is_the_ddpm_posterior():
    # q(x_t | x_s, x_0) = N(α_{s|t} σ_t²/σ_s² · x_s + α_t σ_{s|t}²/σ_s² · x_0, σ_{s|t}² σ_t²/σ_s²)
    # with α_{s|t} = α_s/α_t and σ_{s|t}² = σ_s² − α_{s|t}² σ_t² (Ho et al. 2020, eq. 7).
    with jax.enable_x64(True):
        sch = schedules.discrete_sd_schedule().on_host()
        grid = np.array([0.9, 0.6, 0.3, 0.1])
        table = dpm_solver._sde_multistep_table(sch, grid, 1, 3, False)
        alpha, sigma = np.asarray(sch.marginal_alpha(grid)), np.asarray(sch.marginal_std(grid))
        a_s, s_s, a_t, s_t = alpha[:-1], sigma[:-1], alpha[1:], sigma[1:]
        a_st = a_s / a_t
        v_st = s_s**2 - a_st**2 * s_t**2
        np.testing.assert_allclose(table.coef[:, 0], a_st * s_t**2 / s_s**2, rtol=1e-10)
        np.testing.assert_allclose(table.coef[:, 3], a_t * v_st / s_s**2, rtol=1e-10)
        np.testing.assert_allclose(table.coef[:, 1:3], 0.0)
        std = np.sqrt(v_st * s_t**2 / s_s**2)
        np.testing.assert_allclose(table.noise[:-1], std[:-1], rtol=1e-10)
        assert table.noise[-1] == 0.0  # the last step returns the sample, not a noised one


@pytest.mark.parametrize(("order", "coarse_steps", "fine_steps"), [(1, 20, 500), (2, 10, 100)])
def test_sde_sampler_draws_from_the_data_distribution(order, coarse_steps, fine_steps):
    # With the exact data prediction, the reverse SDE from the t = 1 marginal ends at the
    # data distribution N(μ, s²): per-leaf noise scales (the map leaf's 2) included.
    with jax.enable_x64(True):
        sch = schedules.discrete_sd_schedule()
        n = 20_000
        alpha, sigma = sch.marginal_alpha(1.0), sch.marginal_std(1.0)
        keys = jax.random.split(jax.random.key(0), 2)
        x_T = {
            k: alpha * MU[k]
            + jnp.sqrt(STD[k] ** 2 * alpha**2 + NOISE[k] ** 2 * sigma**2)
            * jax.random.normal(key, (n,), jnp.float64)
            for k, key in zip(("x", "m"), keys, strict=True)
        }

        def solve(steps, **kwargs):
            return _solve_gaussian(
                sch,
                x_T,
                steps=steps,
                order=order,
                method="sde_multistep",
                skip_type="logSNR",
                rng=jax.random.key(1),
                **kwargs,
            )

        def moments_error(steps):
            out = solve(steps, noise_scale=NOISE)
            return max(
                max(abs(float(out[k].mean()) - MU[k]), abs(float(out[k].std()) / STD[k] - 1))
                for k in out
            )

        coarse, fine = moments_error(coarse_steps), moments_error(fine_steps)
        assert fine < 0.02, fine  # sampling error of 20,000 draws is ~0.006
        assert coarse > fine
        # Without the map's noise scale the map leaf's spread comes out wrong.
        wrong = solve(fine_steps)
        assert abs(float(wrong["m"].std()) / STD["m"] - 1) > 0.1


def test_sde_needs_a_key_and_is_reproducible():
    sch = schedules.discrete_sd_schedule()
    pred = functools.partial(_gaussian_pred, sch)
    with pytest.raises(ValueError, match="pass rng"):
        dpm_solver.sample(pred, _x_T(), sch, steps=5, order=2, method="sde_multistep")
    sampler = dpm_solver.make_sampler(pred, sch, steps=5, order=2, method="sde_multistep")
    a = sampler(_x_T(), rng=jax.random.key(0))
    chex.assert_trees_all_close(a, sampler(_x_T(), rng=jax.random.key(0)))
    assert not np.allclose(a["x"], sampler(_x_T(), rng=jax.random.key(1))["x"])


def test_time_steps_skip_types():
    with jax.enable_x64(True):
        sch = schedules.discrete_sd_schedule()
        for skip in dpm_solver.SKIP_TYPES:
            ts = dpm_solver.time_steps(sch, skip, 1.0, T_0, 6)
            assert ts.shape == (7,)
            np.testing.assert_allclose(np.asarray(ts)[[0, -1]], [1.0, T_0], rtol=1e-10)
        lam = sch.marginal_lambda(dpm_solver.time_steps(sch, "logSNR", 1.0, T_0, 6))
        np.testing.assert_allclose(np.diff(lam), np.full(6, (lam[-1] - lam[0]) / 6), rtol=1e-9)
        quad = dpm_solver.time_steps(sch, "time_quadratic", 1.0, T_0, 6)
        np.testing.assert_allclose(np.diff(np.sqrt(quad)), np.diff(np.sqrt(quad))[0], rtol=1e-9)
        uniform = dpm_solver.time_steps(sch, "time_uniform", 1.0, T_0, 6)
        np.testing.assert_allclose(uniform, np.linspace(1.0, T_0, 7), rtol=1e-14)


def test_float32_state_stays_float32_and_close_to_float64():
    sch32 = schedules.discrete_sd_schedule()
    x_T = _x_T()
    out32 = _solve_gaussian(sch32, x_T, steps=20)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(out32))
    with jax.enable_x64(True):
        sch64 = schedules.discrete_sd_schedule()
        x64 = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), x_T)
        out64 = _solve_gaussian(sch64, x64, steps=20)
    chex.assert_trees_all_close(out32, jax.tree.map(np.asarray, out64), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "adaptive"}, "unknown method"),
        ({"skip_type": "karras"}, "unknown skip_type"),
        ({"order": 0}, "order must be 1, 2 or 3"),
        ({"order": 4}, "order must be 1, 2 or 3"),
        ({"method": "sde_multistep", "order": 3}, "orders 1 and 2"),
        ({"method": "fast", "order": 3, "steps": 2}, "steps"),
        ({"method": "multistep", "order": 2, "steps": 1}, "steps"),
        ({"t_T": 0.5, "t_0": 0.5}, "distinct times"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    sch = schedules.discrete_sd_schedule(num_timesteps=20)
    pred = functools.partial(_gaussian_pred, sch)
    with pytest.raises(ValueError, match=match):
        dpm_solver.sample(pred, _x_T(), sch, **kwargs)
    with pytest.raises(ValueError, match=match):
        dpm_solver.make_sampler(pred, sch, **kwargs)


def test_check_settings_refuses_what_sample_refuses_and_passes_the_rest():
    """The start-up check (``preflight``) and the solver agree on every setting."""
    sch = schedules.discrete_sd_schedule(num_timesteps=20)
    pred = functools.partial(_gaussian_pred, sch)
    for method in dpm_solver.METHODS:
        for order in (0, 1, 2, 3, 4):
            for steps in (1, 2, 3):
                args = dict(method=method, order=order, skip_type="logSNR", steps=steps)
                try:
                    dpm_solver.check_settings(**args)
                    checked = None
                except ValueError as e:
                    checked = str(e)
                try:
                    dpm_solver.make_sampler(pred, sch, **args)
                    solver = None
                except ValueError as e:
                    solver = str(e)
                assert checked == solver, args
    with pytest.raises(ValueError, match="unknown skip_type 'karras'"):
        dpm_solver.check_settings("fast", 3, "karras", 10)


def test_make_sampler_rejects_unknown_option():
    sch = schedules.discrete_sd_schedule(num_timesteps=20)
    with pytest.raises(ValueError, match="unknown sampler options"):
        dpm_solver.make_sampler(lambda x, t: x, sch, denoise_to_zero=True)
