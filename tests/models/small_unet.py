"""Test helpers for the UNets: the smallest UNet that still has every block kind of the SD
UNet, and random parameters for the UNet PDMs.

``tiny_sd1`` (3 levels, 2 layers per block) takes minutes to compile on a 2-core CPU,
in its initialiser as in every step or sampler program. Tests whose property does not
depend on the UNet's depth (sharding, freezing, sampling tasks) take this two-level cut
of it instead: a ``CrossAttnDownBlock2D`` with a downsampler, a last ``DownBlock2D``,
the mid block, an ``UpBlock2D`` with an upsampler and a last ``CrossAttnUpBlock2D``,
one layer each (the same text width and latent channels as ``tiny_sd1``).
"""

import json

import ml_collections
import numpy as np
from flax import traverse_util

from pdm_jax import models
from pdm_jax.models import unet

# The UNet PDMs' zero-initialised couplings (map input channels, map-to-image convs).
ZERO_INIT = ("map_conv_in", "zero_convs_")


def two_level_config(sd: str = "1") -> str:
    """``tiny_sd{sd}`` cut to two levels of one layer each, as JSON text for ``unet_config``."""
    c = json.loads((unet.CONFIG_DIR / f"tiny_sd{sd}.json").read_text())
    c.update(
        block_out_channels=[16, 32],
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        layers_per_block=1,
    )
    return json.dumps(c)


def use_two_level_unet(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Puts the two-level tiny UNet into a ``unet*,tiny=1`` config (in place); returns it."""
    sd = config.model.unet_config[-1]
    if config.model.unet_config != f"tiny_sd{sd}":
        raise ValueError(f"Expected a tiny=1 UNet config, got {config.model.unet_config!r}.")
    config.model.unet_config = two_level_config(sd)
    return config


def random_params(cfg: ml_collections.ConfigDict, seed: int) -> dict:
    """Random parameters of ``cfg``'s shapes; the zero-initialised couplings stay zero."""
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(models.abstract_params(cfg))
    return traverse_util.unflatten_dict(
        {
            p: np.zeros(v.shape, v.dtype)
            if p[0].startswith(ZERO_INIT)
            else (0.3 * rng.standard_normal(v.shape) / np.sqrt(max(v.shape[:-1] or (1,)))).astype(
                v.dtype
            )
            + float(p[-1] == "scale")
            for p, v in flat.items()
        }
    )
