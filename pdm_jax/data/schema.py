"""What every data source shares: the record schema, ``DatasetInfo`` and ``DataSpec``.

Sources (``pdm_jax.data.synthetic``, ``pdm_jax.data.coco``) import this module and nothing
of each other; ``pdm_jax.data.pipeline`` registers them and builds the grain loader.
"""

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np

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


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """The ``config.data`` group, typed, plus the sizes the sources must produce.

    Attributes:
      source: ``synthetic`` or ``coco`` (``pipeline.SOURCES``).
      dir: COCO: the ``prepare`` output directory.
      num_workers: grain worker processes (0: read in the training process).
      num_threads: reader threads per process.
      prefetch: records buffered ahead.
      seed: shuffling (and the synthetic world's) seed.
      latent_scale: factor on the autoencoder's latents.
      num_records: synthetic world size (0: its default).
      vae: COCO: VAE checkpoint path ("" = none).
      clip: COCO: CLIP text directory ("" = none).
      latent_size: the model's latent side S.
      latent_channels: the model's latent channels C.
      map_size: the model's map side f·S (0: the model has no map).
      num_clip_token, clip_dim: the context shape [T, D] the model takes.
      map_pooling: how larger maps are pooled (``diffusion.map_pooling``).
      num_eval_prompts: captions in the training sample grids.
    """

    source: str
    dir: str
    num_workers: int
    num_threads: int
    prefetch: int
    seed: int
    latent_scale: float
    num_records: int
    vae: str
    clip: str
    latent_size: int
    latent_channels: int
    map_size: int
    num_clip_token: int
    clip_dim: int
    map_pooling: str
    num_eval_prompts: int
