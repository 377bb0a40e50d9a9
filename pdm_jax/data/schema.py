"""What every data source shares: the record schema, ``DatasetInfo`` and ``DataSpec``.

Sources (``pdm_jax.data.synthetic``, ``pdm_jax.data.coco``) import this module and nothing
of each other; ``pdm_jax.data.pipeline`` registers them and builds the grain loader.
"""

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from pdm_jax.fields import option

SCHEMA_KEYS = ("latent", "map", "context")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What training and sampling need from a dataset besides its records.

    Attributes:
      empty_context: float32 [T, D], the unconditional (empty-caption) context.
      encode_text: captions → float32 [B, T, D] contexts.
      encode_images: uint8 [B, H, W, 3] images → float32 [B, S, S, C] latents.
      decode_latents: float [B, S, S, C] latents → uint8 [B, H, W, 3] images.
      category_names: id → name of every category (void included).
      colour_table: uint8 [256, 3] display colour per id.
      eval_prompts: captions for the sample grids written during training.
    """

    empty_context: np.ndarray
    encode_text: Callable[[Sequence[str]], np.ndarray]
    encode_images: Callable[[np.ndarray], np.ndarray]
    decode_latents: Callable[[np.ndarray], np.ndarray]
    category_names: Mapping[int, str]
    colour_table: np.ndarray
    eval_prompts: tuple[str, ...]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSpec:
    """The ``config.data`` group, plus the sizes the sources must produce.

    The config fields are declared with ``option``; the others derive from other groups
    (``pdm_jax.specs.from_config`` fills them) and are not config fields.

    Attributes:
      latent_size: the model's latent side S.
      latent_channels: the model's latent channels C.
      map_size: the model's map side f·S (0: the model has no map).
      num_clip_token, clip_dim: the context shape [T, D] the model takes.
      map_pooling: how larger maps are pooled (``diffusion.map_pooling``).
      num_eval_prompts: captions in the training sample grids.
    """

    source: str = option("coco", "Data source: coco | synthetic.")
    dir: str = option("", "COCO: the prepare command's output directory.", path=True)
    num_workers: int = option(2, "grain worker processes; 0 reads in the training process.")
    num_threads: int = option(2, "Reader threads per process.")
    prefetch: int = option(64, "Records buffered ahead.")
    seed: int = option(0, "Shuffling (and the synthetic world's) seed.")
    latent_scale: float = option(
        0.23010, "Factor on the autoencoder's latents (decoding divides by it)."
    )
    num_records: int = option(0, "Synthetic world size; 0: its default.")
    vae: str = option(
        "",
        "COCO: VAE checkpoint (autoencoder_kl.pth, a diffusers directory or a converted one).",
        path=True,
    )
    clip: str = option(
        "", "COCO: CLIP ViT-L/14 text directory, to sample from raw prompts.", path=True
    )
    latent_size: int
    latent_channels: int
    map_size: int
    num_clip_token: int
    clip_dim: int
    map_pooling: str
    num_eval_prompts: int
