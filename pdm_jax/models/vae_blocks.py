"""Building blocks of the KL-f8 autoencoder (CompVis ``ldm`` / U-ViT ``libs/autoencoder.py``).

All tensors are NHWC. Submodule names follow the CompVis state dict (``norm1``, ``conv1``,
``nin_shortcut``, ``q``/``k``/``v``/``proj_out``, ``downsample/conv``) so a checkpoint loads by
renaming ``down.0.block.1`` to ``down_0/block_1``. Group norms use eps 1e-6 and the
configured number of groups; the 1x1-conv attention projections are ``Dense`` layers.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def group_norm(num_groups: int, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.GroupNorm:
    """GroupNorm(eps=1e-6) with torch's two-pass variance for parity."""
    return nn.GroupNorm(
        num_groups=num_groups,
        epsilon=1e-6,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


def conv(features: int, kernel: int, dtype: Dtype, param_dtype: Dtype, name: str, **kw) -> nn.Conv:
    """Conv with torch's symmetric ``padding=kernel // 2`` unless ``padding`` is given."""
    pad = kernel // 2
    kw.setdefault("padding", ((pad, pad), (pad, pad)))
    return nn.Conv(
        features, (kernel, kernel), dtype=dtype, param_dtype=param_dtype, name=name, **kw
    )


class ResnetBlock(nn.Module):
    """``x + conv2(swish(norm2(conv1(swish(norm1(x))))))``, 1x1 ``nin_shortcut`` on x if needed."""

    out_channels: int
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = nn.swish(group_norm(self.num_groups, name="norm1", **kw)(x))
        h = conv(self.out_channels, 3, name="conv1", **kw)(h)
        h = nn.swish(group_norm(self.num_groups, name="norm2", **kw)(h))
        h = conv(self.out_channels, 3, name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, name="nin_shortcut", **kw)(x)
        return x + h  # [B, H, W, out_channels]


class AttnBlock(nn.Module):
    """Single-head self-attention over all ``H*W`` positions, with a residual."""

    num_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, height, width, c = x.shape
        dense = functools.partial(nn.Dense, c, dtype=self.dtype, param_dtype=self.param_dtype)
        h = group_norm(self.num_groups, self.dtype, self.param_dtype, "norm")(x)
        h = h.reshape(b, height * width, c)
        q, k, v = dense(name="q")(h), dense(name="k")(h), dense(name="v")(h)  # [B, N, C]
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits * c**-0.5, axis=-1).astype(self.dtype)  # [B, N, N]
        out = jnp.einsum("bqk,bkc->bqc", weights, v)
        return x + dense(name="proj_out")(out).reshape(b, height, width, c)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one zero row/column at the bottom/right (CompVis)."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(
            x.shape[-1], 3, self.dtype, self.param_dtype, "conv", strides=(2, 2), padding="VALID"
        )(x)  # [B, H/2, W/2, C]


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # [B, 2H, 2W, C]
        return conv(x.shape[-1], 3, self.dtype, self.param_dtype, "conv")(x)


class MidBlock(nn.Module):
    """``block_1 -> attn_1 -> block_2`` at the lowest resolution."""

    num_groups: int = 32
    use_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        c = x.shape[-1]
        x = ResnetBlock(c, self.num_groups, name="block_1", **kw)(x)
        if self.use_attention:
            x = AttnBlock(self.num_groups, name="attn_1", **kw)(x)
        return ResnetBlock(c, self.num_groups, name="block_2", **kw)(x)


class Level(nn.Module):
    """One resolution: ``block_0..block_{n-1}`` then an optional down- or upsample."""

    out_channels: int
    num_blocks: int
    num_groups: int = 32
    resample: str | None = None  # "downsample", "upsample" or None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        for j in range(self.num_blocks):
            x = ResnetBlock(self.out_channels, self.num_groups, name=f"block_{j}", **kw)(x)
        if self.resample == "downsample":
            x = Downsample(name="downsample", **kw)(x)
        elif self.resample == "upsample":
            x = Upsample(name="upsample", **kw)(x)
        return x
