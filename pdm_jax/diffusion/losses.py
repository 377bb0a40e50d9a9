"""Forward noising of (image latent, map) and the joint PDM loss (paper §3.2–3.4, Alg. 1).

For each example a step n ~ U{1..N} is drawn and shared by both streams:

    x_n = √ᾱ_n x_0 + √(1−ᾱ_n) ε,         ε   ~ N(0, I)
    M_n = √ᾱ_n M_0 + √(1−ᾱ_n) ε_M,       ε_M ~ N(0, map_noise_std² I)

The network predicts ε for the image and M_0 directly for the map; the loss is
``mean‖ε − ε̂‖² + λ·mean‖M_0 − M̂_0‖²`` per example. With probability ``p_uncond`` an
example's text context is replaced by the empty-caption context (classifier-free guidance
training); the map input is never dropped.

Option (not in the paper; its checkpoints use ε): ``image_prediction`` ``"x0"`` regresses
the clean latent, as the map head does, and ``"v"`` regresses ``v = √ᾱ_n ε − √(1−ᾱ_n) x_0``
(Salimans & Ho 2022). Per unit of x_0 error, the ε loss weighs a step by its SNR, v by
SNR + 1 and x_0 by 1, so the latter two put more weight on the noisy steps. ``min_snr_gamma``
caps that weight at γ in any parametrisation (min-SNR-γ, Hang et al. 2023).

Option (not in the paper): ``given_map_prob`` / ``given_image_prob`` train one model for
the conditional tasks too. That share of the examples feeds the clean map (or the clean
image) instead of its noised copy and keeps only the other stream's loss; the time input
stays n, the noise level of the stream being denoised. These are the inputs the sampler's
``given_map`` and ``given_image`` tasks give the network, and they make it learn to read one
stream from the other.
"""

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from pdm_jax.diffusion.schedules import VPSchedule

Array = jax.Array
# (params, x_n, m_n, n, context) -> img_hat or (img_hat, map0_hat)
DenoiseFn = Callable[[Any, Array, Array | None, Array, Array], Any]


@flax.struct.dataclass
class NoisedBatch:
    """Inputs and targets of one denoising step; every field has a leading batch axis."""

    n: Array  # [B] int32 in 1..N (the model's time input)
    x_n: Array  # [B, S, S, C]
    abar: Array  # [B] ᾱ_n
    eps: Array  # [B, S, S, C]
    m_n: Array | None  # [B, fS, fS, bits]
    m_0: Array | None  # [B, fS, fS, bits]


def bcast_like(v: Array, like: Array) -> Array:
    """``v`` [B] (or a scalar) with trailing unit axes to broadcast against ``like``."""
    return jnp.reshape(v, jnp.shape(v) + (1,) * (like.ndim - jnp.ndim(v)))


def noise_inputs(
    rng: Array,
    x_0: Array,
    m_0: Array | None,
    schedule: VPSchedule,
    map_noise_std: float = 2.0,
) -> NoisedBatch:
    """Draws n and the noises and forms (x_n, M_n) with the discrete schedule.

    Args:
      rng: PRNG key.
      x_0: clean image latents ``[B, S, S, C]``.
      m_0: clean maps as analog bits ``[B, fS, fS, bits]``, or None (image only).
      schedule: the discrete schedule (``alphas_cumprod`` for n = 1..N).
      map_noise_std: std of the map noise ε_M (must exceed 1 to flip bits).

    Returns:
      A ``NoisedBatch``.
    """
    k_n, k_eps, k_map = jax.random.split(rng, 3)
    batch = x_0.shape[0]
    num_steps = schedule.alphas_cumprod.shape[0]
    n = jax.random.randint(k_n, (batch,), 1, num_steps + 1)
    abar = schedule.alphas_cumprod[n - 1].astype(x_0.dtype)
    eps = jax.random.normal(k_eps, x_0.shape, x_0.dtype)
    x_n = bcast_like(jnp.sqrt(abar), x_0) * x_0 + bcast_like(jnp.sqrt(1 - abar), x_0) * eps
    m_n = None
    if m_0 is not None:
        eps_m = map_noise_std * jax.random.normal(k_map, m_0.shape, m_0.dtype)
        m_n = bcast_like(jnp.sqrt(abar), m_0) * m_0 + bcast_like(jnp.sqrt(1 - abar), m_0) * eps_m
    return NoisedBatch(n=n, x_n=x_n, abar=abar, eps=eps, m_n=m_n, m_0=m_0)


def drop_context(rng: Array, context: Array, empty_context: Array, p_uncond: float) -> Array:
    """Replaces each example's context by the empty-caption context with prob. ``p_uncond``.

    Args:
      rng: PRNG key.
      context: ``[B, T, D]`` text contexts.
      empty_context: ``[T, D]`` context of the empty caption (never zeros).
      p_uncond: drop probability per example.

    Returns:
      ``[B, T, D]`` contexts.
    """
    drop = jax.random.bernoulli(rng, p_uncond, (context.shape[0],))
    return jnp.where(drop[:, None, None], empty_context[None].astype(context.dtype), context)


def _per_example_mse(a: Array, b: Array) -> Array:
    return jnp.mean(
        jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)), axis=range(1, a.ndim)
    )


IMAGE_PREDICTIONS = ("eps", "v", "x0")


def check_image_prediction(image_prediction: str) -> None:
    """Raises ValueError unless ``image_prediction`` is one of ``IMAGE_PREDICTIONS``."""
    if image_prediction not in IMAGE_PREDICTIONS:
        raise ValueError(
            f"Unknown image_prediction {image_prediction!r}; choose one of {IMAGE_PREDICTIONS}."
        )


def image_target(noised: NoisedBatch, x_0: Array, image_prediction: str = "eps") -> Array:
    """The image head's regression target: ε, x_0, or v = √ᾱ ε − √(1−ᾱ) x_0.

    Args:
      noised: the noised batch (its ε and ᾱ).
      x_0: ``[B, S, S, C]`` clean latents.
      image_prediction: ``"eps"`` (the paper), ``"v"`` or ``"x0"``.

    Returns:
      ``[B, S, S, C]`` targets.
    """
    check_image_prediction(image_prediction)
    if image_prediction == "eps":
        return noised.eps
    if image_prediction == "x0":
        return x_0
    a = bcast_like(jnp.sqrt(noised.abar), x_0)  # v
    s = bcast_like(jnp.sqrt(1 - noised.abar), x_0)
    return a * noised.eps - s * x_0


def snr_loss_weight(abar: Array, gamma: float, image_prediction: str = "eps") -> Array:
    """Min-SNR-γ loss weight (Hang et al. 2023) of the image loss at ᾱ_n.

    Per unit of x_0 error the ε loss weighs a step by its SNR = ᾱ/(1−ᾱ); min-SNR-γ caps that
    at γ, so the nearly clean steps (SNR in the hundreds, where only fine detail is left to
    predict) stop dominating the gradient. As a factor on the chosen target's loss:
    ``min(SNR, γ)/SNR`` for ε, ``min(SNR, γ)/(SNR + 1)`` for v, ``min(SNR, γ)`` for x_0.

    Args:
      abar: ``[B]`` ᾱ_n.
      gamma: the cap γ (Hang et al. use 5).
      image_prediction: ``"eps"``, ``"v"`` or ``"x0"``.

    Returns:
      ``[B]`` weights.
    """
    check_image_prediction(image_prediction)
    snr = abar / (1.0 - abar)
    per_target = {"eps": snr, "v": snr + 1.0, "x0": jnp.ones_like(snr)}
    return jnp.minimum(snr, gamma) / per_target[image_prediction]


def pdm_loss_terms(
    denoise_fn: DenoiseFn,
    params: Any,
    rng: Array,
    x_0: Array,
    m_0: Array | None,
    context: Array,
    empty_context: Array,
    schedule: VPSchedule,
    *,
    map_noise_std: float = 2.0,
    map_loss_weight: float = 1.0,
    p_uncond: float = 0.1,
    use_given_map: bool = False,
    image_prediction: str = "eps",
    given_map_prob: float = 0.0,
    given_image_prob: float = 0.0,
    min_snr_gamma: float = 0.0,
) -> dict[str, Array]:
    """Per-example terms of the joint loss.

    Args:
      denoise_fn: ``(params, x_n, m_n, n, context)`` → ε̂ (plain U-ViT, ``m_0`` None) or
        ``(ε̂, M̂_0)``.
      params: model parameters.
      rng: PRNG key (split here for noise, step and context dropout).
      x_0: ``[B, S, S, C]`` clean latents.
      m_0: ``[B, fS, fS, bits]`` clean analog-bit maps, or None.
      context: ``[B, T, D]`` text contexts; empty_context: ``[T, D]``.
      schedule: discrete diffusion schedule.
      map_noise_std, map_loss_weight, p_uncond: DESIGN §2 hyperparameters.
      use_given_map: the paper's "PDM given maps": the clean map is the map input and only
        the image loss is used.
      image_prediction: what the image head predicts: ``"eps"`` (the paper), ``"v"`` or
        ``"x0"``.
      given_map_prob, given_image_prob: shares of the examples trained as the given-map
        task (clean map input, image loss only) and the given-image task (clean image input,
        map loss only); the rest are joint. Their losses count as 0 in the other term.
      min_snr_gamma: > 0 weighs each example's image loss by ``snr_loss_weight``.

    Returns:
      Dict of ``[B]`` arrays: ``loss``, ``image_loss``, ``map_loss`` (zeros without a map).
    """
    k_noise, k_drop = jax.random.split(rng)
    noised = noise_inputs(k_noise, x_0, m_0, schedule, map_noise_std)
    target = image_target(noised, x_0, image_prediction)
    ctx = drop_context(k_drop, context, empty_context, p_uncond)
    t_in = noised.n.astype(jnp.float32)
    if m_0 is None:
        img_hat = denoise_fn(params, noised.x_n, None, t_in, ctx)
        image_loss = _per_example_mse(target, img_hat)
        map_loss = jnp.zeros_like(image_loss)
    elif use_given_map:
        img_hat, _ = denoise_fn(params, noised.x_n, m_0, t_in, ctx)
        image_loss = _per_example_mse(target, img_hat)
        map_loss = jnp.zeros_like(image_loss)
    else:
        x_in, m_in = noised.x_n, noised.m_n
        image_weight = map_weight = jnp.ones(x_0.shape[:1], jnp.float32)
        if not (given_map_prob >= 0 and given_image_prob >= 0) or (
            given_map_prob + given_image_prob > 1
        ):
            raise ValueError(
                f"given_map_prob={given_map_prob} and given_image_prob={given_image_prob} must "
                "be ≥ 0 with a sum ≤ 1 (the rest of the examples are joint)."
            )
        if given_map_prob > 0 or given_image_prob > 0:
            u = jax.random.uniform(jax.random.fold_in(rng, 2), x_0.shape[:1])
            given_map = u < given_map_prob
            given_image = (u >= given_map_prob) & (u < given_map_prob + given_image_prob)
            m_in = jnp.where(bcast_like(given_map, m_0), m_0.astype(m_in.dtype), m_in)
            x_in = jnp.where(bcast_like(given_image, x_0), x_0, x_in)
            image_weight = jnp.where(given_image, 0.0, 1.0)
            map_weight = jnp.where(given_map, 0.0, 1.0)
        img_hat, m0_hat = denoise_fn(params, x_in, m_in, t_in, ctx)
        image_loss = image_weight * _per_example_mse(target, img_hat)
        map_loss = map_weight * _per_example_mse(m_0, m0_hat)
    if min_snr_gamma > 0:
        image_loss = image_loss * snr_loss_weight(noised.abar, min_snr_gamma, image_prediction)
    return {
        "loss": image_loss + map_loss_weight * map_loss,
        "image_loss": image_loss,
        "map_loss": map_loss,
    }
