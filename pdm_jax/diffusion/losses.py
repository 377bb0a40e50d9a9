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
SNR + 1 and x_0 by 1, so the latter two put more weight on the noisy steps.
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


def _bcast(v: Array, like: Array) -> Array:
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


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
    x_n = _bcast(jnp.sqrt(abar), x_0) * x_0 + _bcast(jnp.sqrt(1 - abar), x_0) * eps
    m_n = None
    if m_0 is not None:
        eps_m = map_noise_std * jax.random.normal(k_map, m_0.shape, m_0.dtype)
        m_n = _bcast(jnp.sqrt(abar), m_0) * m_0 + _bcast(jnp.sqrt(1 - abar), m_0) * eps_m
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


def image_target(noised: NoisedBatch, x_0: Array, image_prediction: str = "eps") -> Array:
    """The image head's regression target: ε, x_0, or v = √ᾱ ε − √(1−ᾱ) x_0.

    Args:
      noised: the noised batch (its ε and ᾱ).
      x_0: ``[B, S, S, C]`` clean latents.
      image_prediction: ``"eps"`` (the paper), ``"v"`` or ``"x0"``.

    Returns:
      ``[B, S, S, C]`` targets.
    """
    if image_prediction == "eps":
        return noised.eps
    if image_prediction == "x0":
        return x_0
    if image_prediction == "v":
        a = _bcast(jnp.sqrt(noised.abar), x_0)
        s = _bcast(jnp.sqrt(1 - noised.abar), x_0)
        return a * noised.eps - s * x_0
    raise ValueError(
        f"Unknown image_prediction {image_prediction!r}; choose one of {IMAGE_PREDICTIONS}."
    )


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
        img_hat, m0_hat = denoise_fn(params, noised.x_n, noised.m_n, t_in, ctx)
        image_loss = _per_example_mse(target, img_hat)
        map_loss = _per_example_mse(m_0, m0_hat)
    return {
        "loss": image_loss + map_loss_weight * map_loss,
        "image_loss": image_loss,
        "map_loss": map_loss,
    }
