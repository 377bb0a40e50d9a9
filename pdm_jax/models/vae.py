"""Stable Diffusion KL-f8 autoencoder (``AutoencoderKL``) in Flax Linen, NHWC.

Same network as CompVis ``ldm``'s ``AutoencoderKL``, U-ViT's ``FrozenAutoencoderKL`` and
diffusers' ``AutoencoderKL``: an encoder to moments (mean and log-variance of a diagonal
Gaussian, ``[B, h, w, 2 * latent_channels]`` with ``h = H / 2**(levels - 1)``), a
``quant_conv``, a ``post_quant_conv`` and a decoder back to images in [-1, 1].

Latent convention (U-ViT/PDM): ``z = scale_factor * (mean + exp(logvar / 2) * eps)`` with the
log-variance clamped to [-30, 20]; decoding divides by ``scale_factor`` first. The factor is a
config value: ``UVIT_SCALE_FACTOR`` (0.23010) for U-ViT's ``autoencoder_kl.pth``,
``SD_SCALE_FACTOR`` (0.18215) for Stable Diffusion's VAE.

Weights load with ``pdm_jax.weights.vae.load_vae`` from CompVis or diffusers checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pdm_jax.models.vae_blocks import Level, MidBlock, conv, group_norm

Dtype = Any

SD_SCALE_FACTOR = 0.18215
UVIT_SCALE_FACTOR = 0.23010
LOGVAR_RANGE = (-30.0, 20.0)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Autoencoder hyper-parameters (diffusers names); defaults are the SD KL-f8 VAE.

    ``block_out_channels[i]`` is the width at level ``i`` (CompVis ``ch * ch_mult[i]``), and
    ``layers_per_block`` is CompVis ``num_res_blocks`` (the decoder has one block more).
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    scale_factor: float = SD_SCALE_FACTOR

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for the SD VAE)."""
        return 2 ** (len(self.block_out_channels) - 1)


class Encoder(nn.Module):
    """Images ``[B, H, W, in]`` -> raw moments ``[B, H/f, W/f, 2 * latent]``."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        groups = cfg.norm_num_groups
        h = conv(cfg.block_out_channels[0], 3, name="conv_in", **kw)(x)
        last = len(cfg.block_out_channels) - 1
        for i, width in enumerate(cfg.block_out_channels):
            resample = "downsample" if i != last else None
            h = Level(width, cfg.layers_per_block, groups, resample, name=f"down_{i}", **kw)(h)
        h = MidBlock(groups, cfg.mid_block_add_attention, name="mid", **kw)(h)
        h = nn.swish(group_norm(groups, name="norm_out", **kw)(h))
        return conv(2 * cfg.latent_channels, 3, name="conv_out", **kw)(h)


class Decoder(nn.Module):
    """Latents ``[B, h, w, latent]`` (after ``post_quant_conv``) -> images ``[B, fh, fw, out]``."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        groups = cfg.norm_num_groups
        h = conv(cfg.block_out_channels[-1], 3, name="conv_in", **kw)(z)
        h = MidBlock(groups, cfg.mid_block_add_attention, name="mid", **kw)(h)
        # Levels run from the lowest resolution up; names keep CompVis' level index.
        for i in reversed(range(len(cfg.block_out_channels))):
            resample = "upsample" if i != 0 else None
            width = cfg.block_out_channels[i]
            h = Level(width, cfg.layers_per_block + 1, groups, resample, name=f"up_{i}", **kw)(h)
        h = nn.swish(group_norm(groups, name="norm_out", **kw)(h))
        return conv(cfg.out_channels, 3, name="conv_out", **kw)(h)


class AutoencoderKL(nn.Module):
    """KL autoencoder with ``encode_moments`` and ``decode`` methods (unscaled latents)."""

    config: VAEConfig = VAEConfig()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        self.encoder = Encoder(cfg, **kw)
        self.decoder = Decoder(cfg, **kw)
        if cfg.use_quant_conv:
            self.quant_conv = conv(2 * cfg.latent_channels, 1, name=None, **kw)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = conv(cfg.latent_channels, 1, name=None, **kw)

    def encode_moments(self, images: jax.Array) -> jax.Array:
        """Encodes images.

        Args:
          images: ``[B, H, W, 3]`` in [-1, 1], ``H`` and ``W`` divisible by the downsample factor.

        Returns:
          Moments ``[B, H/f, W/f, 2C]``: mean ``[..., :C]``, log-variance ``[..., C:]`` clamped
          to [-30, 20] (the CompVis ``torch.chunk(moments, 2, dim=1)`` order, channels last).
        """
        f = self.config.downsample_factor
        if images.shape[1] % f or images.shape[2] % f:
            raise ValueError(f"image size {images.shape[1:3]} must be divisible by {f}")
        moments = self.encoder(images)
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return jnp.concatenate([mean, jnp.clip(logvar, *LOGVAR_RANGE)], axis=-1)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Decodes unscaled latents ``[B, h, w, C]`` to images ``[B, fh, fw, 3]`` (~[-1, 1])."""
        if self.config.use_post_quant_conv:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Reconstructs images from the posterior mean (used for ``init``)."""
        mean, _ = split_moments(self.encode_moments(images))
        return self.decode(mean)


def split_moments(moments: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Splits ``[..., 2C]`` moments into ``(mean, logvar)``, each ``[..., C]``."""
    return tuple(jnp.split(moments, 2, axis=-1))


@functools.partial(jax.jit, static_argnums=0)
def encode_moments(module: AutoencoderKL, params: Any, images: jax.Array) -> jax.Array:
    """Jitted ``module.encode_moments``.

    Args:
      module: the autoencoder (static).
      params: its parameters.
      images: ``[B, H, W, 3]`` float in [-1, 1].

    Returns:
      ``[B, H/8, W/8, 2C]`` moments (mean, clamped log-variance), float32.
    """
    moments = module.apply({"params": params}, images, method=AutoencoderKL.encode_moments)
    return moments.astype(jnp.float32)


@jax.jit
def sample_latent(moments: jax.Array, rng: jax.Array, scale_factor: float) -> jax.Array:
    """Draws a scaled latent from stored moments (U-ViT ``FrozenAutoencoderKL.sample``).

    Args:
      moments: ``[..., 2C]`` mean and log-variance (clamped again to [-30, 20]).
      rng: PRNG key.
      scale_factor: latent scale (``config.scale_factor``).

    Returns:
      ``scale_factor * (mean + exp(logvar / 2) * eps)``, ``[..., C]`` float32.
    """
    mean, logvar = split_moments(moments.astype(jnp.float32))
    std = jnp.exp(0.5 * jnp.clip(logvar, *LOGVAR_RANGE))
    return scale_factor * (mean + std * jax.random.normal(rng, mean.shape, mean.dtype))


@functools.partial(jax.jit, static_argnums=0)
def decode(
    module: AutoencoderKL, params: Any, latents: jax.Array, scale_factor: float | None = None
) -> jax.Array:
    """Decodes scaled latents to images.

    Args:
      module: the autoencoder (static).
      params: its parameters.
      latents: ``[B, h, w, C]`` scaled latents (as the diffusion model sees them).
      scale_factor: latent scale; ``None`` uses ``module.config.scale_factor``.

    Returns:
      ``[B, 8h, 8w, 3]`` float32 images, nominally in [-1, 1] (not clipped).
    """
    scale = module.config.scale_factor if scale_factor is None else scale_factor
    z = latents / scale
    images = module.apply({"params": params}, z.astype(module.dtype), method=AutoencoderKL.decode)
    return images.astype(jnp.float32)
