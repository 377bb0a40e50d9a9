"""Panoptic Diffusion Models on Stable Diffusion's UNet: the paper's two layouts.

* ``UNetOneStreamPDM``: the map's analog bits ``[B, f·H, f·W, bits]`` are space-to-depth'd
  to the latent side (``[B, H, W, f²·bits]``) and enter through ``map_conv_in``, a
  zero-initialised, bias-free 3×3 conv whose output is added to ``conv_in``'s (the same
  as extra zero-initialised ``conv_in`` input channels, with the plain UNet's parameters
  left as they are). A map head (``map_conv_norm_out`` → SiLU → ``map_conv_out`` to
  ``f²·bits`` → depth-to-space → tanh) reads the last decoder features. At
  initialisation from SD weights, ε equals the plain UNet's exactly.
* ``UNetTwoStreamPDM``: the SD UNet (the plain model's parameter names) is the image
  stream, frozen in training; a map stream of the same topology (names prefixed ``map_``,
  channels × ``map_width_multiplier``) starts from the space-to-depth'd map. Block by
  block (each down block, the mid block, each up block), the map block reads
  ``concat(image block input, map features)`` on the channels, and its output reaches
  the image stream through ``zero_convs_j``, a zero-initialised 1×1 conv added to the
  image block's output. Map-stream skips mirror the image stream's. At initialisation ε
  equals the plain UNet's exactly.

Both take ``t`` as diffusers' discrete timestep, like ``UNet2DConditionModel``.
"""

import re

import jax
import jax.numpy as jnp
from flax import linen as nn

from pdm_jax.models.layers import Dtype
from pdm_jax.models.unet import (
    UNetSpec,
    check_unet_inputs,
    check_width,
    embed_input,
    output_head,
    run_stage,
    stage_blocks,
)
from pdm_jax.models.unet_blocks import conv

Array = jax.Array

_IMAGE_STREAM = re.compile(
    r"conv_in|time_embedding|(down|up)_blocks_\d+|mid_block|conv_norm_out|conv_out"
)


def is_image_stream(name: str) -> bool:
    """Whether a top-level parameter name belongs to the UNet image stream (the plain UNet's).

    Args:
      name: a top-level key, e.g. ``down_blocks_1`` or ``map_down_blocks_1``.

    Returns:
      True for the names a plain ``UNet2DConditionModel`` has.
    """
    return _IMAGE_STREAM.fullmatch(name) is not None


def space_to_depth(m: Array, f: int) -> Array:
    """``[B, f·H, f·W, C] -> [B, H, W, f·f·C]`` (channel order ``(f1, f2, C)``)."""
    b, fh, fw, c = m.shape
    m = m.reshape(b, fh // f, f, fw // f, f, c).transpose(0, 1, 3, 2, 4, 5)
    return m.reshape(b, fh // f, fw // f, f * f * c)


def depth_to_space(m: Array, f: int) -> Array:
    """Inverse of ``space_to_depth``: ``[B, H, W, f·f·C] -> [B, f·H, f·W, C]``."""
    b, h, w, ffc = m.shape
    c = ffc // (f * f)
    m = m.reshape(b, h, w, f, f, c).transpose(0, 1, 3, 2, 4, 5)
    return m.reshape(b, h * f, w * f, c)


def _check_map(spec: UNetSpec, x: Array, m: Array | None, f: int, bits: int) -> None:
    if m is None:
        raise ValueError("A PDM needs a map input m_t; use name='unet' for image only.")
    b, h, w, _ = x.shape
    if m.shape != (b, f * h, f * w, bits):
        raise ValueError(
            f"m_t has shape {m.shape}; expected NHWC [{b}, {f * h}, {f * w}, {bits}] (map side "
            "= map_patch_factor × latent side)."
        )


class _MapPDM(nn.Module):
    """Shared fields of the UNet PDMs (see the module docstring)."""

    spec: UNetSpec
    num_bits: int = 8
    map_patch_factor: int = 1
    use_given_map: bool = False
    map_width_multiplier: float = 1.0
    remat_policy: str = "none"
    attention: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _inputs(self, x_t: Array, m_t: Array, t: Array, context: Array) -> tuple[dict, dict, Array]:
        """Checks the inputs; returns the dtype kwargs, the block kwargs and the context."""
        check_unet_inputs(self.spec, x_t, t, context)
        _check_map(self.spec, x_t, m_t, self.map_patch_factor, self.num_bits)
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        common = {"remat_policy": self.remat_policy, "attention": self.attention, **kw}
        return kw, common, context.astype(self.dtype)

    def _map_head(self, g: Array, m_t: Array, kw: dict, prefix: str) -> Array:
        """``conv_norm_out`` → SiLU → ``conv_out`` → depth-to-space → tanh (or the given map)."""
        f = self.map_patch_factor
        y = output_head(self.spec, g, kw, prefix=prefix, features=f * f * self.num_bits)
        map0 = jnp.tanh(depth_to_space(y, f))
        return m_t if self.use_given_map else map0


class UNetOneStreamPDM(_MapPDM):
    """One-stream PDM on the UNet; ``__call__`` returns ``(eps, map0)``."""

    @nn.compact
    def __call__(self, x_t: Array, m_t: Array, t: Array, context: Array) -> tuple[Array, Array]:
        """Predicts ε for the image and M̂₀ for the map.

        Args:
          x_t: ``[B, H, W, C]`` noisy latent (NHWC).
          m_t: ``[B, f·H, f·W, bits]`` noisy map (the clean map in given-map mode).
          t: ``[B]`` diffusers' discrete timesteps.
          context: ``[B, N, cross_attention_dim]`` text features.

        Returns:
          ``(eps [B, H, W, C], map0 [B, f·H, f·W, bits])``, float32.
        """
        spec, f = self.spec, self.map_patch_factor
        kw, common, context = self._inputs(x_t, m_t, t, context)
        h, temb = embed_input(spec, x_t, t, kw)
        bits = space_to_depth(m_t.astype(self.dtype), f)
        c0, cin = spec.block_out_channels[0], f * f * self.num_bits
        h = h + conv(c0, cin, 3, zero_init=True, use_bias=False, name="map_conv_in", **kw)(bits)
        skips = [h]
        for kind, block in stage_blocks(spec, common):
            h = run_stage(kind, block, h, temb, context, skips)
        eps = output_head(spec, h, kw)
        map0 = self._map_head(h, m_t, kw, "map_")
        return eps.astype(jnp.float32), map0.astype(jnp.float32)


class UNetTwoStreamPDM(_MapPDM):
    """Two-stream PDM on the UNet; ``__call__`` returns ``(eps, map0)``."""

    @nn.compact
    def __call__(self, x_t: Array, m_t: Array, t: Array, context: Array) -> tuple[Array, Array]:
        """Predicts ε for the image and M̂₀ for the map.

        Args:
          x_t: ``[B, H, W, C]`` noisy latent (NHWC).
          m_t: ``[B, f·H, f·W, bits]`` noisy map (the clean map in given-map mode).
          t: ``[B]`` diffusers' discrete timesteps.
          context: ``[B, N, cross_attention_dim]`` text features.

        Returns:
          ``(eps [B, H, W, C], map0 [B, f·H, f·W, bits])``, float32.
        """
        spec, f, w = self.spec, self.map_patch_factor, self.map_width_multiplier
        kw, common, context = self._inputs(x_t, m_t, t, context)
        check_width(spec, w)
        h, temb = embed_input(spec, x_t, t, kw)
        g, temb_map = embed_input(
            spec, space_to_depth(m_t.astype(self.dtype), f), t, kw, prefix="map_", width=w
        )
        skips, skips_map = [h], [g]
        image_blocks = stage_blocks(spec, common)
        map_blocks = stage_blocks(spec, common, prefix="map_", width=w)
        for j, ((kind, block), (_, map_block)) in enumerate(
            zip(image_blocks, map_blocks, strict=True)
        ):
            g_in = jnp.concatenate([h, g], axis=-1)  # the image block's input + map features
            h = run_stage(kind, block, h, temb, context, skips)
            g = run_stage(kind, map_block, g_in, temb_map, context, skips_map)
            c, cm = h.shape[-1], g.shape[-1]
            h = h + conv(c, cm, 1, zero_init=True, name=f"zero_convs_{j}", **kw)(g)
        eps = output_head(spec, h, kw)
        map0 = self._map_head(g, m_t, kw, "map_")
        return eps.astype(jnp.float32), map0.astype(jnp.float32)
