"""Image-stream surgery: which parameters form a PDM's image stream, and swapping them in.

A two-stream PDM's image stream has the names and shapes of a plain U-ViT's (or, for the
UNet PDMs, a plain UNet's) parameters, so a pretrained plain model initialises it
(``merge_image_stream``) and ``ckpt.freeze_image_stream`` freezes it
(``image_stream_mask``).
"""

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from pdm_jax.models import two_stream, unet_pdm

Params = dict[str, Any]


def is_image_stream(name: str) -> bool:
    """Whether a top-level parameter name belongs to an image stream (a plain U-ViT's or a
    plain UNet's names; map-stream and coupling names are neither)."""
    return two_stream.is_image_stream(name) or unet_pdm.is_image_stream(name)


def image_stream_mask(params: Mapping[str, Any]) -> Params:
    """Marks the image-stream leaves (those a plain U-ViT also has).

    Args:
      params: a parameter tree (any model).

    Returns:
      Tree like ``params`` with bool leaves, True for the image stream; suitable as an
      ``optax.masked`` / ``multi_transform`` label source for freezing it.
    """
    return {k: _fill(v, is_image_stream(k)) for k, v in params.items()}


def _fill(tree: Any, value: bool) -> Any:
    """``tree`` with every leaf replaced by ``value``."""
    return jax.tree_util.tree_map(lambda _: value, tree)


def merge_image_stream(params: Mapping[str, Any], uvit_params: Mapping[str, Any]) -> Params:
    """Replaces the image stream of ``params`` by a plain U-ViT's (or SD UNet's) parameters.

    Args:
      params: PDM parameters (typically two-stream).
      uvit_params: parameters of a plain U-ViT of the same size (for a UNet PDM: of the
        plain UNet of the same ``unet_config``).

    Returns:
      A new tree: ``params`` with every image-stream entry taken from ``uvit_params``.

    Raises:
      ValueError: listing image-stream entries missing on either side or mis-shaped.
    """
    ours = {k for k in params if is_image_stream(k)}
    a = traverse_util.flatten_dict({k: params[k] for k in ours}, sep="/")
    b = traverse_util.flatten_dict(dict(uvit_params), sep="/")
    unet = "conv_in" in params  # the SD UNet's image stream (a UNet PDM)
    other = "the UNet checkpoint" if unet else "uvit_params"
    problems = [f"missing from {other}: {k}" for k in sorted(a.keys() - b.keys())]
    problems += [f"not in the image stream of params: {k}" for k in sorted(b.keys() - a.keys())]
    problems += [
        f"{k}: shape {np.shape(a[k])} in params vs {np.shape(b[k])} in {other}"
        for k in sorted(a.keys() & b.keys())
        if np.shape(a[k]) != np.shape(b[k])
    ]
    if problems:
        if unet:
            what = (
                "The UNet checkpoint does not fit the image stream (model.unet_config must "
                "describe the checkpoint's UNet: same block_out_channels, layers_per_block, "
                "attention heads, cross_attention_dim and in/out channels)"
            )
        else:
            what = (
                "The U-ViT parameters do not fit the image stream (same img_size, patch_size, "
                "embed_dim, depth, clip and mlp_time_embed settings needed)"
            )
        raise ValueError(f"{what}:\n  " + "\n  ".join(problems))
    return {k: (uvit_params[k] if k in ours else v) for k, v in params.items()}
