"""``DiffusionSpec``: the noise schedule and the joint loss's options, as a frozen value."""

import dataclasses

from pdm_jax.diffusion.schedules import VPSchedule, discrete_sd_schedule
from pdm_jax.fields import option


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiffusionSpec:
    """The ``config.diffusion`` group: the noise schedule and the joint loss."""

    beta_start: float = option(0.00085, "First β of the discrete SD schedule.")
    beta_end: float = option(0.012, "Last β of the discrete SD schedule.")
    num_timesteps: int = option(1000, "Steps of the discrete SD schedule.")
    map_noise_std: float = option(
        2.0, "Std of the map's noise (the bits are ±1, so 2 lets them flip)."
    )
    map_loss_weight: float = option(1.0, "λ on the map loss.")
    p_uncond: float = option(
        0.1, "Probability of dropping the caption in training (classifier-free guidance)."
    )
    map_pooling: str = option(
        "min", "How label maps larger than the model's map are pooled: min | min_nonvoid | mode."
    )
    image_prediction: str = option(
        "eps", "What the image head predicts: eps (the paper, official checkpoints) | v | x0."
    )
    # The paper trains joint examples only (0, 0).
    given_map_prob: float = option(
        0.0, "Share of examples trained as the given-map task (clean map in, image loss only)."
    )
    given_image_prob: float = option(
        0.0, "Share of examples trained as the given-image task (clean image in, map loss only)."
    )
    min_snr_gamma: float = option(
        0.0, "> 0: min-SNR-γ weighting of the image loss (0: the paper's plain mean)."
    )

    def schedule(self) -> VPSchedule:
        """The discrete SD schedule of these betas."""
        return discrete_sd_schedule(
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            num_timesteps=self.num_timesteps,
        )
