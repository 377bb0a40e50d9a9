"""Encoders for ``prepare_coco``: the interfaces and our Flax VAE / CLIP behind them.

``ImageEncoder`` maps uint8 256×256 images to VAE moments and ``ContextEncoder`` maps
captions to CLIP contexts; both carry a JSON ``identity`` (checkpoint path, config, compute
dtype and a sha256 of the parameters) that ``prepare_coco`` writes to the metadata and
compares when resuming. :class:`VaeMoments` and :class:`ClipContexts` implement them with
``pdm_jax.models.vae.AutoencoderKL`` and ``pdm_jax.models.clip.CLIPTextModel``, jitted with
the batch split over this host's devices (each host of a multi-host preparation works on its
own, so only local devices are used).
"""

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import numpy as np

from pdm_jax.data.coco import panoptic as coco
from pdm_jax.models import clip_embed, vae


class ImageEncoder(Protocol):
    """uint8 [B, 256, 256, 3] images → ``(mean, logvar)`` float [B, S, S, C] VAE moments.

    Attributes:
      identity: JSON-able description (``path``, ``config``, ``params_sha256``).
      scale_factor: latent scale factor that goes with this VAE (metadata only).
      latent_shape: ``(S, S, C)`` of the moments of a 256×256 image.
    """

    identity: dict[str, Any]
    scale_factor: float
    latent_shape: tuple[int, int, int]

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class ContextEncoder(Protocol):
    """Captions → float [B, T, D] CLIP contexts.

    Attributes:
      identity: JSON-able description (``path``, ``config``, ``params_sha256``).
    """

    identity: dict[str, Any]

    def __call__(self, captions: Sequence[str]) -> np.ndarray: ...


def params_fingerprint(params: Any) -> str:
    """sha256 of a parameter tree (paths, dtypes, shapes and values), for identities."""
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        array = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def config_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as a JSON-able dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _local_sharding() -> tuple[jax.sharding.NamedSharding, jax.sharding.NamedSharding, int]:
    """Batch-split and replicated shardings over this host's devices (hosts work alone)."""
    mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()), ("batch",))
    spec = jax.sharding.PartitionSpec
    batch = jax.sharding.NamedSharding(mesh, spec("batch"))
    return batch, jax.sharding.NamedSharding(mesh, spec()), mesh.size


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class VaeMoments:
    """:class:`ImageEncoder` with our Flax ``AutoencoderKL``, jitted over the local devices.

    Every call is padded to one fixed batch (a multiple of the local device count), so the
    encoder compiles once.
    """

    def __init__(
        self,
        module: Any,
        params: Any,
        *,
        batch_size: int = 8,
        path: str = "",
        image_size: int = coco.IMAGE_SIZE,
    ):
        """Args:
        module: a ``pdm_jax.models.vae.AutoencoderKL``.
        params: its parameters.
        batch_size: images per device call (rounded up to the local device count).
        path: checkpoint path, recorded in the identity.
        image_size: side of the images it encodes (256, or 512 for SD's 64×64 latents).
        """
        self._encode = vae.encode_moments
        self.module = module
        self._batch, replicated, ndev = _local_sharding()
        self.batch_size = _round_up(batch_size, ndev)
        self.params = jax.device_put(params, replicated)
        cfg = module.config
        coco.check_resolution(image_size)
        self.image_size = image_size
        side = image_size // cfg.downsample_factor
        self.latent_shape = (side, side, cfg.latent_channels)
        self.scale_factor = float(cfg.scale_factor)
        self.identity = {
            "path": os.path.abspath(path) if path else "",
            "config": config_dict(cfg),
            "dtype": np.dtype(module.dtype).name,
            "params_sha256": params_fingerprint(params),
        }

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [B, 256, 256, 3] → ``(mean, logvar)`` float32 [B, S, S, C]."""
        outs = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            x = np.zeros((self.batch_size, *chunk.shape[1:]), np.float32)
            x[: len(chunk)] = chunk.astype(np.float32) / 127.5 - 1.0  # U-ViT's [-1, 1]
            moments = self._encode(self.module, self.params, jax.device_put(x, self._batch))
            outs.append(np.asarray(moments)[: len(chunk)])
        moments = np.concatenate(outs)  # [B, S, S, 2C]
        c = moments.shape[-1] // 2
        return moments[..., :c], moments[..., c:]


class ClipContexts:
    """:class:`ContextEncoder` with our Flax CLIP text tower, jitted over the local devices.

    Captions are tokenized as ``pdm_jax.models.clip_embed.TextEncoder`` does (max-length
    padding, truncation) and encoded in chunks of ``batch_size``; the last chunk is padded to
    a power of two, so only a few shapes compile.
    """

    def __init__(
        self, module: Any, params: Any, tokenizer: Any, *, batch_size: int = 32, path: str = ""
    ):
        """Args:
        module: a ``pdm_jax.models.clip.CLIPTextModel``.
        params: its parameters.
        tokenizer: the matching Hugging Face CLIP tokenizer.
        batch_size: captions per device call (rounded to the local device count).
        path: checkpoint path, recorded in the identity.
        """
        self._tokenize = lambda captions: clip_embed.tokenize(
            tokenizer, captions, module.config.max_position_embeddings
        )
        self._batch, replicated, self._ndev = _local_sharding()
        self.batch_size = _round_up(batch_size, self._ndev)
        self.params = jax.device_put(params, replicated)
        self._apply = jax.jit(lambda p, ids: module.apply({"params": p}, ids)[0])
        self.identity = {
            "path": os.path.abspath(path) if path else "",
            "config": config_dict(module.config),
            "dtype": np.dtype(module.dtype).name,
            "params_sha256": params_fingerprint(params),
            "tokenizer": type(tokenizer).__name__,
        }

    def __call__(self, captions: Sequence[str]) -> np.ndarray:
        """``B`` captions → float32 [B, T, D] (last hidden state after the final layer norm)."""
        ids = self._tokenize(list(captions))  # [B, T]
        outs = []
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start : start + self.batch_size]
            size = max(self._ndev, min(self.batch_size, 1 << (len(chunk) - 1).bit_length()))
            padded = np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk), 0)])
            out = self._apply(self.params, jax.device_put(padded, self._batch))
            outs.append(np.asarray(out, np.float32)[: len(chunk)])
        return np.concatenate(outs)
