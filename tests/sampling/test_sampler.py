"""``sampler_lib.clipped_denoiser`` in every image parametrisation."""

import jax.numpy as jnp
import numpy as np
import pytest

from pdm_jax.diffusion.schedules import discrete_sd_schedule
from pdm_jax.sampling import sampler as sampler_lib

SCHED = discrete_sd_schedule()


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_clipped_denoiser_bounds_the_implied_data_prediction(prediction):
    rng = np.random.default_rng(0)
    x_t = jnp.asarray(rng.standard_normal((3, 4, 4, 3)), jnp.float32)
    t_model = jnp.asarray([100.0, 500.0, 900.0])
    x0 = jnp.asarray(rng.uniform(-4, 4, (3, 4, 4, 3)), jnp.float32)  # half outside ±2
    tc = (t_model / SCHED.num_timesteps)[:, None, None, None]
    alpha, sigma = SCHED.marginal_alpha(tc), SCHED.marginal_std(tc)
    eps = (x_t - alpha * x0) / sigma
    head = {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}[prediction]
    m0 = jnp.ones((3, 4, 4, 8))

    def net(params, x, m, t, c):
        return head, m0

    out, map0 = sampler_lib.clipped_denoiser(net, SCHED, 2.0, True, prediction)(
        None, x_t, m0, t_model, None
    )
    implied = {
        "eps": lambda o: (x_t - sigma * o) / alpha,
        "x0": lambda o: o,
        "v": lambda o: alpha * x_t - sigma * o,
    }[prediction](out)
    np.testing.assert_allclose(implied, np.clip(x0, -2.0, 2.0), atol=2e-4)
    np.testing.assert_array_equal(map0, m0)
