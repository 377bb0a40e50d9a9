"""Discrete diffusion schedules and their continuous-time VP view.

Training uses the discrete Stable Diffusion schedule: integer steps n ∈ {1..N},
`ᾱ_n = Π_{k≤n}(1 − β_k)`, `x_n = √ᾱ_n x_0 + √(1 − ᾱ_n) ε`, and the network's time input is n.

Sampling sees the same schedule as a continuous-time variance-preserving process, defined
exactly as DPM-Solver's `NoiseScheduleVP('discrete')`: the knots are `t_n = n / N` with
`log α(t_n) = ½ log ᾱ_n`, `log α(t)` is piecewise linear in t between (and linearly
extrapolated beyond) the knots, `σ(t) = √(1 − α(t)²)` and `λ(t) = log α(t) − log σ(t)` (the
half log-SNR). The network's time input at continuous t is `t · N`, which equals n on the knots.

`VPSchedule` is a frozen pytree, so it can be closed over or passed through `jax.jit`; all its
methods are elementwise over arrays of times and work in float32 and float64 (the arrays take
JAX's default float dtype unless one is given). `schedule.on_host()` is the same schedule
over float64 numpy arrays, whose methods then compute with numpy: the sampler uses it to
precompute its static tables outside the compiled program.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

# DPM-Solver's NoiseScheduleVP('discrete') drops the noisiest steps whose half log-SNR falls
# below this value (cosine-like schedules); the SD schedule never gets there (λ(1) ≈ −2.7).
DEFAULT_CLIPPED_LAMBDA = -5.1


def _namespace(a: Any) -> Any:
    """numpy for host (numpy) arrays, jax.numpy otherwise (jax arrays and tracers)."""
    return np if isinstance(a, np.ndarray) else jnp


def _interp_extrapolate(x: Any, xp: Any, fp: Any) -> Any:
    """Piecewise-linear interpolation through (xp, fp), extrapolating the end segments.

    Unlike `jnp.interp` (which clamps), points beyond the knots follow the outermost
    segments, as DPM-Solver's `interpolate_fn` does.

    Args:
      x: query points, any shape.
      xp: increasing knot positions, [K] with K ≥ 2 (numpy or jax, like `fp`).
      fp: knot values, [K].

    Returns:
      The interpolated values, shaped like `x`.
    """
    if isinstance(fp, np.ndarray):
        pos = np.searchsorted(xp, x, side="left")
    else:
        # compare_all: a few fused ops per call; the default scan method compiles slower.
        pos = jnp.searchsorted(xp, x, side="left", method="compare_all")
    idx = _namespace(fp).clip(pos - 1, 0, xp.shape[0] - 2)
    x_lo, x_hi = xp[idx], xp[idx + 1]
    f_lo, f_hi = fp[idx], fp[idx + 1]
    return f_lo + (x - x_lo) * (f_hi - f_lo) / (x_hi - x_lo)


@struct.dataclass
class VPSchedule:
    """A discrete-time diffusion schedule with its continuous VP interpolation.

    Attributes:
      t_array: continuous knot times `n / N` for n = 1..N, [N], increasing.
      log_alpha_array: `log α` at the knots, `½ log ᾱ_n`, [N], decreasing.
      alphas_cumprod: the training schedule `ᾱ_n` for n = 1..N_train, [N_train]. Equals
        `exp(2 · log_alpha_array)` and N_train = N unless the noisiest steps were clipped.
    """

    t_array: jax.Array
    log_alpha_array: jax.Array
    alphas_cumprod: jax.Array

    @property
    def num_timesteps(self) -> int:
        """N, the number of knots of the continuous schedule (static)."""
        return self.t_array.shape[0]

    @property
    def dtype(self) -> jnp.dtype:
        """Float dtype of the schedule arrays (and of the times the sampler uses)."""
        return self.t_array.dtype

    @property
    def xnp(self) -> Any:
        """The array namespace the methods compute with: numpy after `on_host()`, else jnp."""
        return _namespace(self.t_array)

    def on_host(self) -> VPSchedule:
        """This schedule over float64 numpy arrays (methods then run in numpy).

        Raises:
          jax.errors.TracerArrayConversionError: the schedule is traced (e.g. a jit argument).
        """
        return jax.tree.map(lambda a: np.asarray(a, np.float64), self)

    def marginal_log_mean_coeff(self, t: jax.Array) -> jax.Array:
        """Returns `log α(t)` for continuous times `t` (any shape)."""
        t = self.xnp.asarray(t, self.dtype)
        return _interp_extrapolate(t, self.t_array, self.log_alpha_array)

    def marginal_alpha(self, t: jax.Array) -> jax.Array:
        """Returns `α(t)`, the signal coefficient, for continuous times `t`."""
        return self.xnp.exp(self.marginal_log_mean_coeff(t))

    def marginal_std(self, t: jax.Array) -> jax.Array:
        """Returns `σ(t) = √(1 − α(t)²)`, the noise standard deviation, for times `t`."""
        # -expm1 keeps 1 − α² accurate near t = 0 where α² ≈ 1 (float32 loses ~4 digits there).
        return self.xnp.sqrt(-self.xnp.expm1(2.0 * self.marginal_log_mean_coeff(t)))

    def marginal_lambda(self, t: jax.Array) -> jax.Array:
        """Returns the half log-SNR `λ(t) = log α(t) − log σ(t)` for times `t`."""
        log_alpha = self.marginal_log_mean_coeff(t)
        log_std = 0.5 * self.xnp.log(-self.xnp.expm1(2.0 * log_alpha))
        return log_alpha - log_std

    def marginal_coeffs(self, t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Returns `(α(t), σ(t), λ(t))` from one interpolation (cheaper to compile)."""
        log_alpha = self.marginal_log_mean_coeff(t)
        log_std = 0.5 * self.xnp.log(-self.xnp.expm1(2.0 * log_alpha))
        return self.xnp.exp(log_alpha), self.xnp.exp(log_std), log_alpha - log_std

    def inverse_lambda(self, lam: jax.Array) -> jax.Array:
        """Returns the continuous time t with `λ(t) = lam` (piecewise-linear inverse).

        Args:
          lam: half log-SNR values, any shape.

        Returns:
          Times t, shaped like `lam`.
        """
        lam = self.xnp.asarray(lam, self.dtype)
        log_alpha = -0.5 * self.xnp.logaddexp(0.0, -2.0 * lam)
        # log α decreases with t, so interpolate over the reversed (increasing) knots.
        return _interp_extrapolate(log_alpha, self.log_alpha_array[::-1], self.t_array[::-1])

    def model_time(self, t: jax.Array) -> jax.Array:
        """Maps continuous time t to the network's time input `t · N` (= n on the knots)."""
        return self.xnp.asarray(t, self.dtype) * self.num_timesteps

    def discrete_alphas_cumprod(self, n: jax.Array) -> jax.Array:
        """Returns `ᾱ_n` for integer training steps n ∈ {1..N_train} (any shape).

        Training draws n uniformly from 1..N_train, noises with
        `√ᾱ_n x_0 + √(1 − ᾱ_n) ε`, and feeds n itself as the network's time input.
        """
        return self.alphas_cumprod[self.xnp.asarray(n) - 1]


def schedule_from_betas(
    betas: np.ndarray | jax.Array,
    *,
    clipped_lambda: float | None = DEFAULT_CLIPPED_LAMBDA,
    dtype: jnp.dtype | None = None,
) -> VPSchedule:
    """Builds a `VPSchedule` from a discrete beta sequence, as `NoiseScheduleVP('discrete')`.

    Args:
      betas: β_n for n = 1..N, [N], each in (0, 1). Computed in float64 host-side.
      clipped_lambda: drop the trailing (noisiest) steps whose half log-SNR is below this
        value, as DPM-Solver does for cosine-like schedules; the continuous knots are then
        re-spaced as n / N' over the N' kept steps. None keeps every step.
      dtype: float dtype of the arrays; None takes JAX's default (float64 only with x64).

    Returns:
      The schedule.
    """
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.shape[0] < 2:
        raise ValueError(f"betas must be a 1-D array of length ≥ 2, got shape {betas.shape}.")
    if not np.all((betas > 0.0) & (betas < 1.0)):
        raise ValueError("every beta must lie in (0, 1) so that log α strictly decreases.")
    log_alphas = 0.5 * np.cumsum(np.log1p(-betas))  # [N]
    if clipped_lambda is not None:
        lambdas = log_alphas - 0.5 * np.log(-np.expm1(2.0 * log_alphas))
        num_clipped = int(np.searchsorted(lambdas[::-1], clipped_lambda))
        if num_clipped > 0:
            log_alphas = log_alphas[:-num_clipped]
    num_kept = log_alphas.shape[0]
    t_array = np.linspace(0.0, 1.0, num_kept + 1)[1:]
    return VPSchedule(
        t_array=jnp.asarray(t_array, dtype=dtype),
        log_alpha_array=jnp.asarray(log_alphas, dtype=dtype),
        alphas_cumprod=jnp.asarray(np.cumprod(1.0 - betas), dtype=dtype),
    )


def discrete_sd_schedule(
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    num_timesteps: int = 1000,
    *,
    dtype: jnp.dtype | None = None,
) -> VPSchedule:
    """The Stable Diffusion ("scaled linear") schedule: `β = linspace(√β₀, √β₁, N)²`.

    Args:
      beta_start: β_1.
      beta_end: β_N.
      num_timesteps: N.
      dtype: float dtype of the arrays; None takes JAX's default.

    Returns:
      The schedule (never clipped: its λ stays above −5.1).
    """
    betas = np.linspace(np.sqrt(beta_start), np.sqrt(beta_end), num_timesteps) ** 2
    return schedule_from_betas(betas, dtype=dtype)
