"""Two-stream Panoptic Diffusion Model (paper §3.5; official ``separate=True``).

A pretrained, frozen image stream (a plain U-ViT with the same parameter names) and a
trainable map stream of the same depth. Before each image block (in, mid, out), the map
block takes ``concat(image-block input [E+L], map tokens [L])``; its output is split, the
image part goes through a zero-initialised 1×1 projection ``zero_convs_{2i+1}`` and is
added to the image block's output, the map part carries on. Map-stream long skips store
the whole concatenated output. The map head reads the map tokens without a final norm,
exactly as the official forward pass. At initialisation the image output equals the
plain U-ViT's output for the same image-stream parameters.

The parameter tree is flat like the official state dict; ``is_image_stream`` tells which
top-level entries form the image stream (the names a plain U-ViT has).

The official module owns ``2·depth + 2`` zero convs of which only the odd-numbered ones
are used, and an unused ``mask_embed_0``: they are created at initialisation only, so
parameter counts and checkpoints match, and have no effect on the outputs.
"""

import re

import jax
import jax.numpy as jnp
from flax import linen as nn

from pdm_jax.models.layers import Dtype, PatchEmbed, ZeroConv, block_class, constrain, layer_norm
from pdm_jax.models.pdm import embed_map, pdm_outputs
from pdm_jax.models.uvit import UViTSpec, check_inputs, conditioning_tokens, position_embedding

Array = jax.Array

_IMAGE_STREAM = re.compile(
    r"(patch_embed|context_embed|pos_embed|time_embed_\d+|(in|out)_blocks_\d+|mid_block|norm"
    r"|decoder_pred|final_layer)"
)


def is_image_stream(name: str) -> bool:
    """Whether a top-level parameter name belongs to the image stream (a plain U-ViT's).

    Args:
      name: top-level key of the parameter tree, e.g. ``in_blocks_3`` or ``zero_convs_1``.

    Returns:
      True for the names a plain U-ViT also has.
    """
    return _IMAGE_STREAM.fullmatch(name) is not None


def _stage_names(depth: int) -> list[tuple[str, str, bool]]:
    """``(image block, map block, has long skip)`` for each stage, in order."""
    half = depth // 2
    stages = [(f"in_blocks_{i}", f"in_blocks_mask_{i}", False) for i in range(half)]
    stages.append(("mid_block", "mid_block_mask", False))
    stages += [(f"out_blocks_{i}", f"out_blocks_mask_{i}", True) for i in range(half)]
    return stages


class TwoStreamPDM(nn.Module):
    """Two-stream PDM; ``__call__`` returns ``(eps, map0)``."""

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
        x = jnp.concatenate([conditioning_tokens(spec, t, context, kw), img], axis=1)
        x = constrain(x + position_embedding(self, "pos_embed", x.shape[1], spec))  # [B, E+L, D]
        m = embed_map(self, spec, m_t, kw)
        pos_m = position_embedding(self, "pos_embed_mask", spec.num_patches, spec, extras=0)
        m = constrain(m + pos_m)
        split = x.shape[1]

        blk = block_class(spec.remat_policy)
        bkw = spec.block_kwargs
        stages = _stage_names(spec.depth)
        skips, skips_map = [], []
        for j, (image_name, map_name, has_skip) in enumerate(stages):
            mx = constrain(jnp.concatenate([x, m], axis=1))  # [B, E+2L, D]
            if has_skip:
                x = blk(skip=True, name=image_name, **bkw, **kw)(x, skips.pop())
                mx = blk(skip=True, name=map_name, **bkw, **kw)(mx, skips_map.pop())
            else:
                x = blk(name=image_name, **bkw, **kw)(x)
                mx = blk(name=map_name, **bkw, **kw)(mx)
            x = constrain(x + ZeroConv(name=f"zero_convs_{2 * j + 1}", **kw)(mx[:, :split]))
            m = mx[:, split:]  # [B, L, D]
            if j < spec.depth // 2:
                skips.append(x)
                skips_map.append(mx)

        if self.is_initializing():
            used = {2 * j + 1 for j in range(len(stages))}
            for j in range(2 * spec.depth + 2):
                if j not in used:
                    ZeroConv(name=f"zero_convs_{j}", **kw)(x[:, :1])

        x = layer_norm(name="norm", **kw)(x)
        return pdm_outputs(self, spec, x[:, spec.extras :], m, m_t, kw)
