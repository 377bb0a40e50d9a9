"""One-stream Panoptic Diffusion Model (paper §3.5): image and map tokens in one U-ViT.

Tokens are ``[time(1), context(N), image patches(L), map patches(L)]``. The map
(``f·S × f·S`` analog bits) is embedded with patch ``f·p`` so that it gives as many
tokens as the image. After the final LayerNorm the image tokens go to the ε head and the
map tokens to the map head (``Linear(D, (f·p)²·bits)`` → un-patchify → 3×3 conv → tanh).

Given-map mode (``use_given_map``, the official ``use_ground_truth``): the map is an
input only; the ε head reads ``image tokens + map tokens`` and the map output is the
input map.

Parameters the official module owns but never uses in its forward pass
(``mask_embed_0``; the map head in given-map mode) are still created, at initialisation
only, so that parameter counts and checkpoints match the official ones; they do not
affect the outputs.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

from pdm_jax.models.layers import Dtype, PatchEmbed, constrain, dense, layer_norm
from pdm_jax.models.uvit import (
    UViTSpec,
    block_stack,
    check_inputs,
    conditioning_tokens,
    image_head,
    map_head,
    position_embedding,
)

Array = jax.Array


def embed_map(module: nn.Module, spec: UViTSpec, m_t: Array, kw: dict) -> Array:
    """Map patch embedding ``mask_embed`` (patch ``f·p``), plus the unused ``mask_embed_0``.

    Args:
      module: the calling model (to know whether it is initialising).
      spec: model hyperparameters.
      m_t: ``[B, f·S, f·S, bits]`` map input.
      kw: ``dtype`` / ``param_dtype`` for the submodules.

    Returns:
      ``[B, L, D]`` map tokens.
    """
    tokens = PatchEmbed(spec.map_patch, spec.embed_dim, name="mask_embed", **kw)(m_t)
    if module.is_initializing():
        # Official parameter without effect on the forward pass; created for checkpoints.
        PatchEmbed(spec.map_patch, spec.embed_dim, name="mask_embed_0", **kw)(m_t)
    return tokens


def fuse_tokens(spec: UViTSpec, img: Array, mp: Array, kw: dict) -> tuple[Array, Array]:
    """``token_fusion``: image and map tokens of one patch read each other before the blocks.

    Args:
      spec: model hyperparameters.
      img: ``[B, L, D]`` image patch tokens.
      mp: ``[B, L, D]`` map patch tokens (same patch order).
      kw: ``dtype`` / ``param_dtype`` for the submodules.

    Returns:
      ``(img + map_to_image(mp), mp + image_to_map(img))``; both layers start at zero.
    """
    zero = nn.initializers.zeros_init()
    axes = (None, "embed")  # as skip_linear: one mesh axis per kernel
    d = spec.embed_dim
    to_img = dense(d, axes, name="map_to_image", kernel_init=zero, **kw)(mp)
    to_map = dense(d, axes, name="image_to_map", kernel_init=zero, **kw)(img)
    return img + to_img, mp + to_map


def pdm_outputs(
    module: nn.Module,
    spec: UViTSpec,
    image_tokens: Array,
    map_tokens: Array,
    m_t: Array,
    kw: dict,
) -> tuple[Array, Array]:
    """The ε and map heads of a PDM, including given-map mode.

    Args:
      module: the calling model (to know whether it is initialising).
      spec: model hyperparameters.
      image_tokens: ``[B, L, D]`` image features for the ε head.
      map_tokens: ``[B, L, D]`` map features for the map head.
      m_t: ``[B, f·S, f·S, bits]`` map input (returned in given-map mode).
      kw: ``dtype`` / ``param_dtype`` for the submodules.

    Returns:
      ``(eps [B, S, S, C], map0 [B, f·S, f·S, bits])``, float32.
    """
    if spec.use_given_map:
        eps = image_head(spec, image_tokens + map_tokens, kw)
        if module.is_initializing():
            # Unused in this mode but part of the official parameter set.
            map_head(spec, map_tokens, kw)
        map0 = m_t
    else:
        eps = image_head(spec, image_tokens, kw)
        map0 = map_head(spec, map_tokens, kw)
    return eps.astype(jnp.float32), map0.astype(jnp.float32)


class OneStreamPDM(nn.Module):
    """One-stream PDM; ``__call__`` returns ``(eps, map0)``."""

    spec: UViTSpec
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_t: Array, m_t: Array, t: Array, context: Array) -> tuple[Array, Array]:
        """Predicts ε for the image and M̂₀ for the map.

        Args:
          x_t: ``[B, S, S, C]`` noisy latent (NHWC).
          m_t: ``[B, f·S, f·S, bits]`` noisy map (clean map in given-map mode).
          t: ``[B]`` timesteps in model units (1..1000).
          context: ``[B, N, clip_dim]`` text features.

        Returns:
          ``(eps [B, S, S, C], map0 [B, f·S, f·S, bits])``, float32.
        """
        spec = self.spec
        if m_t is None:
            raise ValueError("A PDM needs a map input m_t; use name='uvit' for image only.")
        check_inputs(spec, x_t, m_t, t, context)
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        img = PatchEmbed(spec.patch_size, spec.embed_dim, name="patch_embed", **kw)(x_t)
        mp = embed_map(self, spec, m_t, kw)  # [B, L, D]
        if spec.token_fusion:
            img, mp = fuse_tokens(spec, img, mp, kw)
        x = jnp.concatenate([conditioning_tokens(spec, t, context, kw), img, mp], axis=1)
        x = constrain(x + position_embedding(self, "pos_embed", x.shape[1], spec))  # [B, E+2L, D]
        x = block_stack(spec, x, kw)
        x = layer_norm(name="norm", **kw)(x)
        e, n = spec.extras, spec.num_patches
        return pdm_outputs(self, spec, x[:, e : e + n], x[:, e + n :], m_t, kw)
