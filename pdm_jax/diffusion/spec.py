"""``DiffusionSpec``: the noise schedule and the joint loss's options, as a frozen value."""

import dataclasses

from pdm_jax.diffusion.schedules import VPSchedule, discrete_sd_schedule


@dataclasses.dataclass(frozen=True)
class DiffusionSpec:
    """The ``config.diffusion`` group, typed.

    Attributes:
      beta_start, beta_end, num_timesteps: the discrete SD schedule.
      map_noise_std: std of the map's noise (bits are ±1, so 2 lets them flip).
      map_loss_weight: λ on the map loss.
      p_uncond: probability of dropping the caption (classifier-free guidance).
      map_pooling: how larger label maps are pooled to the model's map side.
      image_prediction: ``eps`` (the paper), ``v`` or ``x0``.
      given_map_prob, given_image_prob: shares of examples trained as the conditional tasks.
      min_snr_gamma: > 0 weighs the image loss by min-SNR-γ.
    """

    beta_start: float
    beta_end: float
    num_timesteps: int
    map_noise_std: float
    map_loss_weight: float
    p_uncond: float
    map_pooling: str
    image_prediction: str
    given_map_prob: float
    given_image_prob: float
    min_snr_gamma: float

    def schedule(self) -> VPSchedule:
        """The discrete SD schedule of these betas."""
        return discrete_sd_schedule(
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            num_timesteps=self.num_timesteps,
        )
