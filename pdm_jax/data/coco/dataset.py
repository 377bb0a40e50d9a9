"""COCO as a training/sampling dataset: the prepared shards plus the encoders around them.

The prepared ArrayRecord files (``prepare_coco``) already hold VAE moments and CLIP contexts,
so training needs no network besides the denoiser. Sampling and evaluation need more: the
VAE decoder to turn latents into 256×256 PNGs (``config.data.vae``), and the CLIP text
encoder to turn raw prompts into contexts (``config.data.clip``). Both are loaded lazily,
on first use, from local paths — an original checkpoint or a ``python -m pdm_jax.convert``
directory — once per process (``pdm_jax.preflight`` loads them at start-up). The eval
captions (the training grids' prompts) come with their stored contexts and need no CLIP.
"""

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pdm_jax.data.coco import panoptic as coco
from pdm_jax.data.coco.source import coco_source_from_spec
from pdm_jax.data.schema import DatasetInfo, DataSpec
from pdm_jax.weights.clip import load_text_encoder
from pdm_jax.weights.vae import load_vae

SPLITS = {"train": "train", "held_out": "val", "val": "val", "eval": "val"}


@functools.lru_cache(maxsize=4)
def load_vae_once(path: str) -> tuple[Any, Any]:
    """``load_vae(path)``, once per process: the start-up check and the decoder share it."""
    return load_vae(path)


@functools.lru_cache(maxsize=4)
def load_text_encoder_once(path: str) -> Any:
    """``load_text_encoder(path)``, once per process (as ``load_vae_once``)."""
    return load_text_encoder(path)


class _LazyVAE:
    """Loads the VAE on first use; encodes uint8 images and decodes scaled latents."""

    def __init__(self, path: str, scale_factor: float):
        self.path, self.scale_factor = path, scale_factor

    @functools.cached_property
    def _model(self) -> tuple[Any, Any, Any, Any]:
        if not self.path:
            raise FileNotFoundError(
                "Decoding COCO latents needs the VAE: pass --vae (or --config.data.vae)="
                "<autoencoder_kl.pth, a diffusers vae/ directory or a `pdm_jax.convert vae` "
                "output>."
            )
        module, params = load_vae_once(self.path)
        encode = jax.jit(lambda p, x: module.apply({"params": p}, x, method="encode_moments"))
        decode = jax.jit(lambda p, z: module.apply({"params": p}, z, method="decode"))
        return module, params, encode, decode

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``[B, H, W, 3]`` → scaled posterior-mean latents ``[B, h, w, C]``."""
        module, params, encode, _ = self._model
        moments = encode(params, jnp.asarray(images, jnp.float32) / 127.5 - 1.0)
        mean = moments[..., : module.config.latent_channels]
        return np.asarray(mean * self.scale_factor)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Scaled latents ``[B, h, w, C]`` → uint8 images ``[B, 8h, 8w, 3]``."""
        _, params, _, decode = self._model
        images = decode(params, jnp.asarray(latents, jnp.float32) / self.scale_factor)
        return np.asarray(jnp.clip((images + 1.0) * 127.5 + 0.5, 0, 255)).astype(np.uint8)


class _LazyText:
    """Loads the CLIP text encoder on first use (raw prompts → contexts)."""

    def __init__(self, path: str):
        self.path = path

    @functools.cached_property
    def _encoder(self) -> Any:
        if not self.path:
            raise FileNotFoundError(
                "Raw prompts need the CLIP text encoder: pass --text_encoder (or "
                "--config.data.clip)=<local clip-vit-large-patch14 directory or a "
                "`pdm_jax.convert clip_text` output>."
            )
        return load_text_encoder_once(self.path)

    def __call__(self, captions: Sequence[str]) -> np.ndarray:
        return np.asarray(self._encoder.encode(list(captions)), np.float32)


class _KnownContexts:
    """Captions whose contexts the prepared data holds need no CLIP; others go to CLIP.

    The training grids sample the dataset's eval captions: with their stored contexts, a
    run needs no text encoder (only the VAE, to decode the grid).
    """

    def __init__(self, known: dict[str, np.ndarray], text: _LazyText):
        self.known, self.text = known, text

    def __call__(self, captions: Sequence[str]) -> np.ndarray:
        if all(c in self.known for c in captions):
            return np.stack([self.known[c] for c in captions]).astype(np.float32)
        return self.text(captions)


def coco_dataset(data: DataSpec, split: str) -> tuple[Any, DatasetInfo]:
    """``(source, DatasetInfo)`` for ``data.source == "coco"``.

    Args:
      data: the run's ``DataSpec`` (``dir``, ``vae``, ``clip``, ``latent_scale``, sizes).
      split: ``train``, or ``held_out``/``val``/``eval`` for the validation split.

    Returns:
      The grain source over the prepared shards and the dataset description the trainer,
      sample mode and evaluation use.
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown COCO split {split!r}; choose one of {sorted(SPLITS)}.")
    source = coco_source_from_spec(data, SPLITS[split])
    vae = _LazyVAE(data.vae, data.latent_scale)
    first = [source.record(i) for i in range(min(data.num_eval_prompts, len(source)))]
    prompts = tuple(rec["captions"][0] for rec in first)
    contexts = {rec["captions"][0]: np.asarray(rec["contexts"][0], np.float32) for rec in first}
    info = DatasetInfo(
        empty_context=np.asarray(source.empty_context, np.float32),
        encode_text=_KnownContexts(contexts, _LazyText(data.clip)),
        encode_images=vae.encode,
        decode_latents=vae.decode,
        category_names=coco.category_names(),
        colour_table=coco.colour_table(),
        eval_prompts=prompts,
    )
    return source, info


def encoder_info(data: DataSpec) -> DatasetInfo:
    """The ``DatasetInfo`` of COCO without prepared data: sampling from raw prompts.

    The unconditional context is the CLIP encoding of ``""``, which is what ``prepare_coco``
    stores, so a sample equals the one drawn with ``data.dir`` set to data prepared with the
    same CLIP. There are no evaluation prompts.

    Args:
      data: the run's ``DataSpec`` (``clip``, ``vae``, ``latent_scale``, context shape).

    Returns:
      The dataset description sample mode uses.

    Raises:
      FileNotFoundError: when ``data.clip`` is unset or missing.
      ValueError: when the CLIP context shape is not the model's.
    """
    text = _LazyText(data.clip)
    empty = text([""])[0]  # [T, D]
    want = (data.num_clip_token, data.clip_dim)
    if empty.shape != want:
        raise ValueError(
            f"The CLIP text encoder at {text.path} gives contexts of shape {empty.shape}, but "
            f"the model takes {want} (model.num_clip_token, model.clip_dim); pass the CLIP the "
            "model was trained with."
        )
    vae = _LazyVAE(data.vae, data.latent_scale)
    return DatasetInfo(
        empty_context=empty,
        encode_text=text,
        encode_images=vae.encode,
        decode_latents=vae.decode,
        category_names=coco.category_names(),
        colour_table=coco.colour_table(),
        eval_prompts=(),
    )
