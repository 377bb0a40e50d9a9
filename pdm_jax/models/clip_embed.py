"""Host-facing CLIP wrappers: text contexts for conditioning and embeddings for CLIP score.

``TextEncoder`` turns captions into the diffusion model's context: tokens padded to
``max_length`` (77) with truncation, then the text tower's last hidden state after the
final layer norm, ``[B, 77, D]``. The unconditional context is the empty caption ``""``
encoded the same way (``empty_context``), never zeros.

``ClipEmbedder`` gives L2-normalised projected embeddings for images and captions. Image
preprocessing (``clip_preprocess``) reproduces OpenAI CLIP's ``preprocess`` that the paper's
``tools/clip_score.py`` uses (``clip.load``): PIL bicubic resize of the shorter side to 224
(long side ``int(224 * long / short)``), centre crop with torchvision's rounding
(``round((h - 224) / 2)``), ``/255`` and normalisation by the OpenAI mean/std. The Hugging
Face ``CLIPImageProcessorPil`` does the same resize but floors the crop offset, so the two
differ by at most a one-pixel shift when ``h - 224`` is odd; the torchvision-backed
``CLIPImageProcessor`` of transformers 5 also resizes differently (tensor bicubic).
Captions are tokenized by the Hugging Face tokenizer, which skips OpenAI's ``ftfy``/HTML
unescaping (for plain captions such as COCO's the ids are the same) and pads with EOS where
OpenAI pads with 0; padding comes after the EOS token, and the causal mask keeps it from
changing the pooled EOS feature.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from pdm_jax.models.clip import CLIPModel, CLIPTextModel

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def tokenize(tokenizer: Any, captions: Sequence[str], max_length: int) -> np.ndarray:
    """Tokenizes captions padded to ``max_length`` with truncation (as SD / U-ViT).

    Args:
      tokenizer: a Hugging Face CLIP tokenizer.
      captions: ``B`` strings.
      max_length: padded length (77).

    Returns:
      ``[B, max_length]`` int32 ids.
    """
    if isinstance(captions, str):
        raise TypeError("captions must be a list of strings, not one string")
    out = tokenizer(
        list(captions),
        padding="max_length",
        max_length=max_length,
        truncation=True,
        return_tensors="np",
    )
    return np.asarray(out["input_ids"], dtype=np.int32)


def _bucket(n: int, batch_size: int) -> int:
    # Few compiled shapes: powers of two up to batch_size.
    return min(batch_size, 1 << max(0, (n - 1).bit_length()))


def _run_batched(fn, inputs: np.ndarray, batch_size: int) -> np.ndarray:
    """Applies a jitted ``fn`` over the leading axis in padded chunks; returns numpy."""
    outs = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size]
        size = _bucket(len(chunk), batch_size)
        pad = np.repeat(chunk[-1:], size - len(chunk), axis=0)
        out = fn(np.concatenate([chunk, pad], axis=0))
        outs.append(np.asarray(out[: len(chunk)]))
    return np.concatenate(outs, axis=0)


class TextEncoder:
    """Captions -> CLIP text contexts ``[B, L, D]`` (last hidden state, final layer norm).

    Args:
      module: a ``CLIPTextModel``.
      params: its parameters.
      tokenizer: the matching Hugging Face tokenizer.
      batch_size: largest batch per device call.
    """

    def __init__(self, module: CLIPTextModel, params: Any, tokenizer: Any, batch_size: int = 64):
        self.module = module
        self.params = params
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = module.config.max_position_embeddings
        self._apply = jax.jit(lambda p, ids: module.apply({"params": p}, ids)[0])

    def tokenize(self, captions: Sequence[str]) -> np.ndarray:
        """Returns ``[B, L]`` int32 ids (max-length padding, truncation)."""
        return tokenize(self.tokenizer, captions, self.max_length)

    def encode_ids(self, input_ids: np.ndarray) -> np.ndarray:
        """Encodes token ids ``[B, L]`` into ``[B, L, D]`` (numpy, module dtype)."""
        return _run_batched(lambda ids: self._apply(self.params, ids), input_ids, self.batch_size)

    def encode(self, captions: Sequence[str]) -> np.ndarray:
        """Encodes captions.

        Args:
          captions: ``B`` strings.

        Returns:
          ``[B, L, D]`` contexts (L = 77, D = 768 for ViT-L/14).
        """
        return self.encode_ids(self.tokenize(captions))

    def empty_context(self) -> np.ndarray:
        """The unconditional context: ``""`` encoded like any caption, ``[L, D]``."""
        return self.encode([""])[0]


def _resize_crop(image: np.ndarray, size: int) -> np.ndarray:
    pil = Image.fromarray(image).convert("RGB")
    w, h = pil.size
    short, long = min(w, h), max(w, h)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    pil = pil.resize((new_w, new_h), Image.Resampling.BICUBIC)
    if new_h < size or new_w < size:
        raise ValueError(f"resized image {new_h}x{new_w} is smaller than the crop {size}")
    top = round((new_h - size) / 2.0)
    left = round((new_w - size) / 2.0)
    return np.asarray(pil)[top : top + size, left : left + size]


def clip_preprocess(images: np.ndarray | Sequence[np.ndarray], size: int = 224) -> np.ndarray:
    """OpenAI CLIP preprocessing (see the module docstring for how it matches references).

    Args:
      images: uint8 ``[B, H, W, 3]`` (or a list of ``[H_i, W_i, 3]``, sizes may differ).
      size: model input size (``vision.image_size``).

    Returns:
      ``[B, size, size, 3]`` float32, normalised with the OpenAI CLIP mean and std.
    """
    arrays = [np.asarray(im) for im in images]
    for im in arrays:
        if im.dtype != np.uint8 or im.ndim != 3 or im.shape[-1] != 3:
            raise ValueError(
                f"expected uint8 [H, W, 3] images, got {im.dtype} {im.shape}; "
                "convert with ((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8)"
            )
    crops = np.stack([_resize_crop(im, size) for im in arrays]).astype(np.float32) / 255.0
    mean = np.asarray(OPENAI_CLIP_MEAN, np.float32)
    std = np.asarray(OPENAI_CLIP_STD, np.float32)
    return (crops - mean) / std


def l2_normalize(x: jax.Array) -> jax.Array:
    """``x / ||x||`` over the last axis, in float32."""
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class ClipEmbedder:
    """L2-normalised CLIP image and text embeddings (for CLIP score: ``100 * cos``).

    Args:
      module: a ``CLIPModel``.
      params: its parameters.
      tokenizer: the matching Hugging Face tokenizer.
      batch_size: largest batch per device call.
    """

    def __init__(self, module: CLIPModel, params: Any, tokenizer: Any, batch_size: int = 64):
        self.module = module
        self.params = params
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.image_size = module.config.vision.image_size
        self.max_length = module.config.text.max_position_embeddings

        def text_fn(p, ids):
            feats = module.apply({"params": p}, ids, method=CLIPModel.get_text_features)
            return l2_normalize(feats)

        def image_fn(p, pixels):
            feats = module.apply({"params": p}, pixels, method=CLIPModel.get_image_features)
            return l2_normalize(feats)

        self._text = jax.jit(text_fn)
        self._image = jax.jit(image_fn)

    def pixel_embeds(self, pixel_values: np.ndarray) -> np.ndarray:
        """Embeds already preprocessed ``[B, S, S, 3]`` pixels; returns ``[B, P]`` unit vectors."""
        return _run_batched(lambda x: self._image(self.params, x), pixel_values, self.batch_size)

    def image_embeds(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """Embeds uint8 images.

        Args:
          images: uint8 ``[B, H, W, 3]`` (any size; see ``clip_preprocess``).

        Returns:
          ``[B, P]`` float32 unit vectors.
        """
        return self.pixel_embeds(clip_preprocess(images, self.image_size))

    def text_embeds(self, captions: Sequence[str]) -> np.ndarray:
        """Embeds captions (max-length padding, truncation); returns ``[B, P]`` unit vectors."""
        ids = tokenize(self.tokenizer, captions, self.max_length)
        return _run_batched(lambda x: self._text(self.params, x), ids, self.batch_size)
