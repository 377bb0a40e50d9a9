"""DPM-Solver++ (data prediction) over any pytree state, as one jitted `lax.scan`.

Matches LuChengTHU/dpm-solver's `DPM_Solver(algorithm_type="dpmsolver++")` with
`solver_type="dpmsolver"` for the methods `multistep`, `singlestep` and `singlestep_fixed`,
and U-ViT's `dpm_solver_pp.py` `method="fast"` (the official PDM sampler: singlestep updates
whose intermediate points are points of the `steps`-point time grid). Denoise-to-zero is off.

How it runs: every DPM-Solver++ update (first, second or third order, singlestep or
multistep) is linear in the state at the start of the step (the *anchor*) and in the last
three data predictions. So the sampler is one scan over the function evaluations: each
iteration calls `data_pred_fn` once, pushes the result into a three-slot history buffer, and
forms the next point as `A·anchor + Σ_k B_k·buffer_k` from a precomputed row of coefficients.
The order schedule is static (Python, from `steps`/`order`/`method`). The times and
coefficients are computed at trace time in float64 numpy when the schedule is concrete (closed
over), and in the program when it is traced (a jit argument); `data_pred_fn` is traced exactly
once per compilation, whatever the method.

The same coefficients advance every leaf: only α, σ ratios and h = λ_t − λ_s enter, so the
update does not depend on a leaf's noise scale (e.g. a map noised with std 2).

Jitting: `make_sampler(fn, schedule, steps=..., ...)` returns a jitted `sampler(x_T, *args)`;
equivalently `jax.jit(lambda x_T: sample(fn, x_T, schedule, steps=...))`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pdm_jax.diffusion.schedules import VPSchedule

PyTree = Any
DataPredFn = Callable[[PyTree, jax.Array], PyTree]
StepCallback = Callable[[PyTree, jax.Array], PyTree]

METHODS = ("multistep", "singlestep", "singlestep_fixed", "fast", "sde_multistep")
STOCHASTIC_METHODS = ("sde_multistep",)
_OPTIONS = ("steps", "order", "method", "skip_type", "lower_order_final", "t_T", "t_0")
SKIP_TYPES = ("time_uniform", "logSNR", "time_quadratic")


class _Table(NamedTuple):
    """Per-evaluation plan: where to evaluate and how to form the next point."""

    t_eval: Any  # [NFE] time at which data_pred_fn is called (numpy or jax)
    t_next: Any  # [NFE] time of the point formed after the call
    coef: Any  # [NFE, 4] (anchor, buffer slot 0 = oldest, slot 1, slot 2 = newest)
    is_end: np.ndarray  # [NFE] bool, static: the formed point ends an outer step
    noise: Any = None  # [NFE] std of the fresh noise added to the formed point (SDE only)


def time_steps(
    schedule: VPSchedule,
    skip_type: str,
    t_T: float | jax.Array,
    t_0: float | jax.Array,
    n: int,
) -> jax.Array:
    """The n + 1 solver times from t_T down to t_0, as DPM-Solver's `get_time_steps`.

    Args:
      schedule: the noise schedule (used by `logSNR`); a host schedule (`on_host()`) gives
        numpy times.
      skip_type: `time_uniform` (uniform in t), `logSNR` (uniform in λ) or
        `time_quadratic` (uniform in √t).
      t_T: start time, a float or an array of starts [...].
      t_0: end time, shaped like `t_T`.
      n: number of intervals.

    Returns:
      Times [n + 1, ...] in the schedule's dtype, first t_T, last t_0.
    """
    if skip_type not in SKIP_TYPES:
        raise ValueError(f"unknown skip_type {skip_type!r}; use one of {SKIP_TYPES}.")
    xnp = schedule.xnp
    t_T = xnp.asarray(t_T, schedule.dtype)
    t_0 = xnp.asarray(t_0, schedule.dtype)
    if skip_type == "logSNR":
        lam_T, lam_0 = schedule.marginal_lambda(xnp.stack([t_T, t_0]))
        return schedule.inverse_lambda(xnp.linspace(lam_T, lam_0, n + 1))
    if skip_type == "time_uniform":
        return xnp.linspace(t_T, t_0, n + 1)
    return xnp.linspace(xnp.sqrt(t_T), xnp.sqrt(t_0), n + 1) ** 2


def check_settings(method: str, order: int, skip_type: str, steps: int) -> None:
    """Checks a solver setting as ``sample`` will; callers run it before any work starts.

    Args:
      method: one of ``METHODS``.
      order: 1, 2 or 3 (1 or 2 for the stochastic methods).
      skip_type: one of ``SKIP_TYPES``.
      steps: the number of model evaluations, an int ≥ ``order``.

    Raises:
      ValueError: naming the bad argument and the accepted values.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {METHODS}.")
    if skip_type not in SKIP_TYPES:
        raise ValueError(f"unknown skip_type {skip_type!r}; use one of {SKIP_TYPES}.")
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}.")
    if method in STOCHASTIC_METHODS and order > 2:
        raise ValueError(f"method {method!r} has orders 1 and 2, got {order!r}.")
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < order:
        raise ValueError(
            f"steps (the number of model evaluations) must be an int ≥ order = {order} for "
            f"method {method!r}, got {steps!r}; raise steps or lower order."
        )


def _validate(method: str, order: int, skip_type: str, steps: int, t_T: float, t_0: float):
    """Raises ValueError naming the bad argument and the accepted values."""
    check_settings(method, order, skip_type, steps)
    if not (t_T > 0 and t_0 > 0 and t_T != t_0):
        raise ValueError(f"need distinct times t_T, t_0 > 0, got t_T={t_T}, t_0={t_0}.")


def _singlestep_orders(method: str, order: int, steps: int) -> list[int]:
    """Order of each outer step; they sum to the NFE (`steps`, or K·order when fixed)."""
    if method == "singlestep_fixed":
        return [order] * (steps // order)
    if order == 3:
        k = steps // 3 + 1
        tails = {0: [2, 1], 1: [1], 2: [2]}[steps % 3]
        return [3] * (k - 1 - (steps % 3 == 0)) + tails
    if order == 2:
        return [2] * (steps // 2) + [1] * (steps % 2)
    return [1] * steps


def _multistep_orders(order: int, steps: int, lower_order_final: bool) -> np.ndarray:
    """Order of each multistep update: warm-up from 1, and lowered at the end if asked."""
    i = np.arange(steps)
    orders = np.minimum(i + 1, order)
    if lower_order_final and steps < 10:  # the reference lowers the final orders only then
        orders = np.minimum(orders, steps - i)
    return orders


def _multistep_table(
    schedule: VPSchedule, grid: jax.Array, order: int, steps: int, lower_order_final: bool
) -> _Table:
    """Coefficients of multistep DPM-Solver++ (warm-up with lower orders)."""
    i = np.arange(steps)
    orders = _multistep_orders(order, steps, lower_order_final)
    xnp = schedule.xnp
    alpha, sigma, lam = schedule.marginal_coeffs(grid)  # [steps + 1] each
    lam_t, lam_0 = lam[i + 1], lam[i]
    lam_1, lam_2 = lam[np.maximum(i - 1, 0)], lam[np.maximum(i - 2, 0)]
    h = lam_t - lam_0
    # Warm-up rows have no older points; use safe ratios there (their case is not selected).
    r0 = xnp.where(i >= 1, (lam_0 - lam_1) / h, 1.0)
    r1 = xnp.where(i >= 2, (lam_1 - lam_2) / h, 1.0)
    alpha_t = alpha[i + 1]
    ratio = sigma[i + 1] / sigma[i]
    phi_1 = xnp.expm1(-h)
    phi_2 = phi_1 / h + 1.0
    phi_3 = phi_2 / h - 0.5
    zero = xnp.zeros_like(h)
    # Rows are (anchor, m_{i-2}, m_{i-1}, m_i).
    first = xnp.stack([ratio, zero, zero, -alpha_t * phi_1], -1)
    c = 0.5 * alpha_t * phi_1 / r0  # x -= 0.5·α_t·φ1·D1_0, D1_0 = (m_i − m_{i−1}) / r0
    second = xnp.stack([ratio, zero, c, -alpha_t * phi_1 - c], -1)
    # x += α_t·φ2·D1 − α_t·φ3·D2 with D1, D2 combinations of D1_0 and D1_1.
    a = alpha_t * phi_2 * (1.0 + r0 / (r0 + r1)) - alpha_t * phi_3 / (r0 + r1)  # on D1_0
    b = -alpha_t * phi_2 * r0 / (r0 + r1) + alpha_t * phi_3 / (r0 + r1)  # on D1_1
    third = xnp.stack([ratio, -b / r1, b / r1 - a / r0, -alpha_t * phi_1 + a / r0], -1)
    coef = xnp.stack([first, second, third])[orders - 1, i]  # [steps, 4]
    return _Table(grid[:-1], grid[1:], coef, np.ones(steps, bool))


def _sde_multistep_table(
    schedule: VPSchedule, grid: jax.Array, order: int, steps: int, lower_order_final: bool
) -> _Table:
    """Coefficients of SDE-DPM-Solver++ (1 or 2M), the stochastic multistep solver.

    It discretises the reverse SDE in the data prediction (Lu et al. 2022, DPM-Solver++
    §5; the midpoint second-order rule). With h = λ_t − λ_s, one step is

        x_t = (σ_t/σ_s)·e^{−h}·x_s + α_t(1 − e^{−2h})·(D + ½·(D − D_prev)/r) + σ_t√(1 − e^{−2h})·z

    with r = h_prev/h (first order: no D_prev term, which is DDPM's ancestral step). The
    last step adds no noise, so the result is the sample itself.
    """
    i = np.arange(steps)
    orders = _multistep_orders(order, steps, lower_order_final)
    xnp = schedule.xnp
    alpha, sigma, lam = schedule.marginal_coeffs(grid)
    h = lam[i + 1] - lam[i]
    r0 = xnp.where(i >= 1, (lam[i] - lam[np.maximum(i - 1, 0)]) / h, 1.0)
    keep = -xnp.expm1(-2.0 * h)  # 1 − e^{−2h}
    zero = xnp.zeros_like(h)
    ratio = sigma[i + 1] / sigma[i] * xnp.exp(-h)
    d = alpha[i + 1] * keep
    first = xnp.stack([ratio, zero, zero, d], -1)
    c = 0.5 * d / r0
    second = xnp.stack([ratio, zero, -c, d + c], -1)
    coef = xnp.stack([first, second])[orders - 1, i]
    noise = sigma[i + 1] * xnp.sqrt(keep) * (i < steps - 1)
    return _Table(grid[:-1], grid[1:], coef, np.ones(steps, bool), noise)


def _singlestep_outer(
    schedule: VPSchedule, method: str, skip_type: str, orders: list[int], t_T: float, t_0: float
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Outer step ends s, t [K] and intermediate log-SNR fractions r1, r2 [K]."""
    xnp = schedule.xnp
    orders_np = np.asarray(orders)
    starts = np.concatenate([[0], np.cumsum(orders_np)[:-1]])  # grid index of each s
    nfe = int(orders_np.sum())
    if method == "fast":
        # U-ViT: intermediate points are the grid points between s and t.
        grid = time_steps(schedule, skip_type, t_T, t_0, nfe)
        lam = schedule.marginal_lambda(grid)
        idx = np.minimum(starts[:, None] + np.arange(4), nfe)  # [K, 4]
        s, t = grid[starts], grid[starts + orders_np]
        h = lam[starts + orders_np] - lam[starts]
        return s, t, (lam[idx[:, 1]] - lam[starts]) / h, (lam[idx[:, 2]] - lam[starts]) / h
    if method == "singlestep" and skip_type != "logSNR":
        outer = time_steps(schedule, skip_type, t_T, t_0, nfe)[np.append(starts, nfe)]
    else:  # singlestep_fixed, and singlestep with logSNR ("to reproduce the paper")
        outer = time_steps(schedule, skip_type, t_T, t_0, len(orders))
    s, t = outer[:-1], outer[1:]
    # The reference re-spaces each step's interval into `order` parts with the same
    # skip_type to place the intermediate points, and reads their log-SNR fractions. Six
    # parts hold both the halves (order 2) and the thirds (order 3).
    lam = schedule.marginal_lambda(time_steps(schedule, skip_type, s, t, 6))  # [7, K]
    span = lam[6] - lam[0]
    r1 = xnp.where(orders_np == 3, lam[2] - lam[0], lam[3] - lam[0]) / span
    return s, t, r1, (lam[4] - lam[0]) / span


def _singlestep_table(
    schedule: VPSchedule, s: jax.Array, t: jax.Array, r1: jax.Array, r2: jax.Array, orders
) -> _Table:
    """Coefficients of singlestep DPM-Solver++ steps of the given orders."""
    xnp = schedule.xnp
    alpha_st, sigma_st, lam_st = schedule.marginal_coeffs(xnp.stack([s, t]))  # [2, K] each
    sigma_s, lam_s = sigma_st[0], lam_st[0]
    alpha_t, sigma_t, lam_t = alpha_st[1], sigma_st[1], lam_st[1]
    h = lam_t - lam_s
    s1, s2 = schedule.inverse_lambda(xnp.stack([lam_s + r1 * h, lam_s + r2 * h]))
    (alpha_1, alpha_2), (sigma_1, sigma_2), _ = schedule.marginal_coeffs(xnp.stack([s1, s2]))
    ratio_1, ratio_2, ratio_t = sigma_1 / sigma_s, sigma_2 / sigma_s, sigma_t / sigma_s
    phi_11, phi_12, phi_1 = xnp.expm1(-r1 * h), xnp.expm1(-r2 * h), xnp.expm1(-h)
    phi_22 = phi_12 / (r2 * h) + 1.0
    phi_2 = phi_1 / h + 1.0
    zero = xnp.zeros_like(h)
    # Rows are (anchor, m_s, m_s1, m_s2), one per kind of sub-step.
    to_s1 = xnp.stack([ratio_1, -alpha_1 * phi_11, zero, zero], -1)
    c2 = r2 / r1 * alpha_2 * phi_22
    to_s2 = xnp.stack([ratio_2, -alpha_2 * phi_12 - c2, c2, zero], -1)
    end_1 = xnp.stack([ratio_t, -alpha_t * phi_1, zero, zero], -1)
    c = 0.5 / r1 * alpha_t * phi_1
    end_2 = xnp.stack([ratio_t, -alpha_t * phi_1 + c, -c, zero], -1)
    c = alpha_t * phi_2 / r2
    end_3 = xnp.stack([ratio_t, -alpha_t * phi_1 - c, zero, c], -1)
    rows = xnp.stack([to_s1, to_s2, end_1, end_2, end_3])  # [5, K, 4]
    kinds = {1: [2], 2: [0, 3], 3: [0, 1, 4]}  # sub-step kinds of an order-o step
    step = np.concatenate([[k] * o for k, o in enumerate(orders)])  # [NFE] outer index
    sub = np.concatenate([np.arange(o) for o in orders])  # [NFE] j-th evaluation in the step
    kind = np.concatenate([kinds[o] for o in orders])
    role_coef = rows[kind, step]  # [NFE, 4] on (anchor, m_s, m_s1, m_s2)
    # At sub-step j, m_s sits in buffer slot 2 − j (slot 2 is the newest evaluation).
    padded = xnp.concatenate(
        [role_coef[:, :1], xnp.zeros_like(role_coef[:, :2]), role_coef[:, 1:]], 1
    )
    columns = np.stack([np.zeros_like(sub), sub + 1, sub + 2, sub + 3], 1)  # [NFE, 4]
    coef = padded[np.arange(len(sub))[:, None], columns]
    t_eval = xnp.stack([s, s1, s2])[sub, step]
    return _Table(t_eval, t[step], coef, sub == np.asarray(orders)[step] - 1)


def sample(
    data_pred_fn: DataPredFn,
    x_T: PyTree,
    schedule: VPSchedule,
    *,
    steps: int = 50,
    order: int = 3,
    method: str = "fast",
    skip_type: str = "time_uniform",
    lower_order_final: bool = True,
    t_T: float = 1.0,
    t_0: float | None = None,
    step_callback: StepCallback | None = None,
    rng: jax.Array | None = None,
    noise_scale: PyTree | None = None,
) -> PyTree:
    """Solves the probability-flow ODE (or the reverse SDE) from t_T to t_0 with DPM-Solver++.

    Args:
      data_pred_fn: `(x, t) -> x̂_0`, the data (x_0) prediction for state `x` (a pytree of
        arrays) at continuous time `t` (a 0-d array in the schedule's dtype); returns a
        pytree of the same structure and shapes.
      x_T: the initial state at t_T, e.g. `{"x": [B, C, H, W] noise, "m": [B, 8, h, w]
        noise · 2}`.
      schedule: the noise schedule.
      steps: number of model evaluations (NFE); `singlestep_fixed` uses ⌊steps/order⌋·order.
      order: solver order, 1, 2 or 3 (≤ steps).
      method: `multistep`, `singlestep` (mixed orders using all evaluations, the current
        DPM-Solver reference), `singlestep_fixed`, or `fast` (U-ViT/PDM's default; U-ViT
        has no order 1, here it is DDIM on the grid); or the stochastic `sde_multistep`
        (SDE-DPM-Solver++, orders 1 and 2; order 1 is DDPM's ancestral sampler), which
        needs `rng`. Fresh noise corrects a weak model's errors, where the ODE carries them.
      skip_type: time grid, `time_uniform`, `logSNR` or `time_quadratic`.
      lower_order_final: multistep only, and (as in the reference) only when steps < 10:
        lower the order of the last steps.
      t_T: start time.
      t_0: end time; None means 1/N (the first knot).
      step_callback: `(x, t) -> x` applied to the state after every outer step, at the time
        t it reached (e.g. inpainting: re-impose the known region noised to t).
      rng: PRNG key of the stochastic methods' fresh noise.
      noise_scale: the stochastic methods' noise std per leaf (a pytree of floats shaped
        like `x_T`, or None for 1 everywhere), e.g. `{"x": 1.0, "m": 2.0}` for a map whose
        forward noise has std 2.

    Returns:
      The state at t_0, same structure and dtypes as `x_T`.
    """
    t_0 = 1.0 / schedule.num_timesteps if t_0 is None else t_0
    _validate(method, order, skip_type, steps, t_T, t_0)
    try:
        # A concrete schedule: build the tables in float64 numpy, so the compiled program
        # holds them as constants (much faster to compile than the interpolations).
        table_schedule = schedule.on_host()
    except jax.errors.TracerArrayConversionError:
        table_schedule = schedule  # traced (a jit argument): build them in the program
    stochastic = method in STOCHASTIC_METHODS
    if stochastic and rng is None:
        raise ValueError(f"method {method!r} is stochastic: pass rng.")
    if method in ("multistep", "sde_multistep"):
        grid = time_steps(table_schedule, skip_type, t_T, t_0, steps)  # [steps + 1]
        make_table = _sde_multistep_table if stochastic else _multistep_table
        table = make_table(table_schedule, grid, order, steps, lower_order_final)
    else:
        orders = _singlestep_orders(method, order, steps)
        outer = _singlestep_outer(table_schedule, method, skip_type, orders, t_T, t_0)
        table = _singlestep_table(table_schedule, *outer, orders)
    every_end = bool(table.is_end.all())

    def cast_like(tree: PyTree, like: PyTree) -> PyTree:
        return jax.tree.map(lambda v, ref: jnp.asarray(v, ref.dtype), tree, like)

    leaves, treedef = jax.tree.flatten(x_T)
    scales = [1.0] * len(leaves) if noise_scale is None else treedef.flatten_up_to(noise_scale)

    def fresh_noise(index: jax.Array, std: jax.Array) -> PyTree:
        keys = jax.random.split(jax.random.fold_in(rng, index), len(leaves))
        return treedef.unflatten(
            [
                (std * scale * jax.random.normal(k, leaf.shape, jnp.float32)).astype(leaf.dtype)
                for k, leaf, scale in zip(keys, leaves, scales, strict=True)
            ]
        )

    def body(carry, xs):
        anchor, x, buf = carry
        t_eval, t_next, coef, is_end, index, noise_std = xs
        buf = (buf[1], buf[2], cast_like(data_pred_fn(x, t_eval), x))
        x = jax.tree.map(
            lambda a, b0, b1, b2: (
                coef[0].astype(a.dtype) * a
                + coef[1].astype(a.dtype) * b0
                + coef[2].astype(a.dtype) * b1
                + coef[3].astype(a.dtype) * b2
            ),
            anchor,
            *buf,
        )
        if stochastic:
            x = jax.tree.map(jnp.add, x, fresh_noise(index, noise_std))
        if step_callback is not None:
            corrected = lambda y: cast_like(step_callback(y, t_next), y)
            x = corrected(x) if every_end else jax.lax.cond(is_end, corrected, lambda y: y, x)
        if every_end:
            anchor = x
        else:
            anchor = jax.tree.map(lambda new, old: jnp.where(is_end, new, old), x, anchor)
        return (anchor, x, buf), None

    zeros = jax.tree.map(jnp.zeros_like, x_T)
    as_times = lambda a: jnp.asarray(a, schedule.dtype)
    nfe = len(table.is_end)
    noise = table.noise if stochastic else np.zeros(nfe)
    xs = (
        as_times(table.t_eval),
        as_times(table.t_next),
        as_times(table.coef),
        table.is_end,
        jnp.arange(nfe),
        as_times(noise),
    )
    (_, x_0, _), _ = jax.lax.scan(body, (x_T, x_T, (zeros, zeros, zeros)), xs)
    return x_0


def make_sampler(
    data_pred_fn: Callable[..., PyTree],
    schedule: VPSchedule,
    *,
    step_callback: Callable[..., PyTree] | None = None,
    **options: Any,
) -> Callable[..., PyTree]:
    """Returns a jitted `sampler(x_T, *args)` running `sample` with static options.

    Args:
      data_pred_fn: `(x, t, *args) -> x̂_0`; `args` (parameters, text context, ...) are
        traced, so new values reuse the compiled program.
      schedule: the noise schedule (closed over, so the solver tables are host constants).
      step_callback: optional `(x, t, *args) -> x`, see `sample`.
      **options: `steps`, `order`, `method`, `skip_type`, `lower_order_final`, `t_T`, `t_0`.

    Returns:
      The jitted sampler; it compiles once per input shapes/dtypes. Stochastic methods take
      their key as `sampler(x_T, *args, rng=key)`.
    """
    unknown = set(options) - set(_OPTIONS)
    if unknown:
        raise ValueError(f"unknown sampler options {sorted(unknown)}; accepted: {_OPTIONS}.")
    defaults = {"steps": 50, "order": 3, "method": "fast", "skip_type": "time_uniform"}
    opts = {**defaults, **options}
    t_0 = opts.get("t_0")
    t_0 = 1.0 / schedule.num_timesteps if t_0 is None else t_0
    _validate(
        opts["method"], opts["order"], opts["skip_type"], opts["steps"], opts.get("t_T", 1.0), t_0
    )

    @jax.jit
    def sampler(x_T: PyTree, *args: Any, rng: jax.Array | None = None) -> PyTree:
        callback = None
        if step_callback is not None:
            callback = lambda x, t: step_callback(x, t, *args)
        return sample(
            lambda x, t: data_pred_fn(x, t, *args),
            x_T,
            schedule,
            step_callback=callback,
            rng=rng,
            **opts,
        )

    return sampler
