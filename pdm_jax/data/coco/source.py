"""A grain random-access source over prepared COCO (``pdm_jax.data.coco.prepare`` output).

``CocoSource(data_dir, split, map_size=...)`` reads the split's ArrayRecord files with
grain's ``ArrayRecordDataSource`` and decodes one record per index. Two record views:

* ``sample_latent=True`` (default; notebooks, evaluation): the training schema, drawn at
  read time from a generator seeded by ``(seed, record, epoch)`` where
  ``record, epoch = index % len, index // len`` (index ``epoch·len + i`` gives epoch
  ``epoch``'s draw for record ``i``)::

      latent   float32 [S, S, C]  (mean + exp(logvar / 2)·ε)·latent_scale
      map      int32 [M, M]       category ids at the model's map side
      context  float32 [T, D]     the context of one caption chosen uniformly
      caption  str                that caption
      image_id int

* ``sample_latent=False`` (what the trainer uses, :func:`coco_source_from_spec`): the
  moments view of ``pdm_jax.data.pipeline`` — ``moments`` float32 [S, S, 2C] (mean then
  logvar on the channel axis), ``contexts`` [K, T, D] in the stored dtype (float16 unless
  prepared with ``--context_dtype=float32``), ``map``, ``captions``,
  ``image_id``. The pipeline's ``NormaliseRecord`` then draws ε and the caption with
  grain's per-record generator, which grain seeds from ``(data.seed, global position)``:
  a grain ``DataLoader`` only passes record keys below ``len``, so only there does the
  draw change every epoch, stay reproducible and resume with the checkpointed iterator.

Map sides: a stored side is used as is; a smaller side that divides a stored one is pooled
from it with the pooling the data was prepared with (other poolings would need a
re-preparation and are refused).

Why no TFDS builder: the shards are ArrayRecord files that grain reads directly (this
module), with no TensorFlow at training time; their content comes from our JAX encoders,
and preparation needs host splitting, resume, ``--skip_bad`` and encoder-identity checks
that ``tfds build`` (one process or Beam) would not give. ``tfds.data_source`` would only
add a ``tf.train.Example`` decoding step per record.
"""

import os
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from pdm_jax.data.coco import panoptic as coco
from pdm_jax.data.coco import records
from pdm_jax.data.schema import DataSpec
from pdm_jax.diffusion import maps

# Names other parts of pdm_jax use for the evaluation split.
SPLIT_ALIASES = {"held_out": "val", "validation": "val", "eval": "val"}


class CocoSource:
    """Random access to one prepared COCO split (see the module docstring for the views)."""

    def __init__(
        self,
        data_dir: str,
        split: str = "train",
        *,
        map_size: int | None = None,
        map_pooling: str | None = None,
        latent_scale: float | None = None,
        seed: int = 0,
        sample_latent: bool = True,
    ):
        """Args:
        data_dir: the ``--output_dir`` of ``prepare_coco``.
        split: ``train`` or ``val`` (``held_out`` means ``val``).
        map_size: the model's map side (``img_size × map_patch_factor``); None: no map.
        map_pooling: expected pooling (None: whatever the data was prepared with).
        latent_scale: factor on drawn latents; None: the VAE's, from the metadata.
        seed: seed of the draws in the ``sample_latent`` view.
        sample_latent: the training-schema view (True) or the moments view (False).
        """
        self.data_dir = data_dir
        self.split = SPLIT_ALIASES.get(split, split)
        if self.split not in coco.SPLITS:
            raise ValueError(f"Unknown COCO split {split!r}; choose one of {coco.SPLITS}.")
        self.metadata = records.read_metadata(data_dir, self.split)
        self.latent_scale = float(
            self.metadata["vae"]["scale_factor"] if latent_scale is None else latent_scale
        )
        self.seed = int(seed)
        self.sample_latent = sample_latent
        self.map_size, self._stored_map = map_size, None
        if map_size is not None:
            self._stored_map = self._stored_side(int(map_size), map_pooling)
        paths = [os.path.join(data_dir, f["name"]) for f in self.metadata["files"]]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} ArrayRecord files listed in the metadata are missing, e.g. "
                f"{missing[0]}; copy the whole prepared directory."
            )
        # Files without records (every image skipped as bad) cannot be opened for reading.
        nonempty = [
            p for p, f in zip(paths, self.metadata["files"], strict=True) if f["num_records"]
        ]
        self._source = grain.sources.ArrayRecordDataSource(nonempty)
        if len(self._source) != self.metadata["num_records"]:
            raise ValueError(
                f"{data_dir} holds {len(self._source)} {self.split} records but its metadata "
                f"says {self.metadata['num_records']}; re-run prepare_coco into a fresh directory."
            )

    def _stored_side(self, size: int, pooling: str | None) -> int:
        stored = sorted(int(m) for m in self.metadata["map_sizes"])
        prepared = self.metadata["map_pooling"]
        if size in stored and (pooling is None or pooling == prepared):
            return size
        if pooling is not None and pooling != prepared:
            raise ValueError(
                f"{self.data_dir} was prepared with map pooling {prepared!r}, not {pooling!r}; "
                f"set --config.diffusion.map_pooling={prepared} or re-run prepare_coco with "
                f"--map_pooling={pooling}."
            )
        multiples = [m for m in stored if m % size == 0]
        if not multiples:
            raise ValueError(
                f"Map side {size} is neither stored ({stored}) nor a divisor of a stored side; "
                "re-run prepare_coco with --map_sizes including it."
            )
        return multiples[0]

    def __len__(self) -> int:
        return len(self._source)

    @property
    def empty_context(self) -> np.ndarray:
        """float32 [T, D]: the empty caption's context (the unconditional context)."""
        return np.load(os.path.join(self.data_dir, self.metadata["empty_context"]))

    def record(self, index: int) -> dict[str, Any]:
        """The stored record ``index`` (schema in :mod:`pdm_jax.data.coco.records`)."""
        return records.decode_record(self._source[int(index)])

    def _map(self, rec: Mapping[str, Any]) -> np.ndarray:
        ids = np.asarray(rec[f"map_{self._stored_map}"], np.int32)
        if self._stored_map == self.map_size:
            return ids
        return maps.pool_map(ids, self.map_size, self.metadata["map_pooling"])

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if index < 0:
            raise IndexError(f"Index {index} is negative.")
        n = len(self)
        rec = self.record(index % n)
        mean = np.asarray(rec["mean"], np.float32)  # [S, S, C]
        logvar = np.asarray(rec["logvar"], np.float32)
        out: dict[str, Any] = {"image_id": np.int64(rec["image_id"])}
        if self.map_size is not None:
            out["map"] = self._map(rec)
        if not self.sample_latent:
            out["moments"] = np.concatenate([mean, logvar], axis=-1)  # [S, S, 2C]
            out["contexts"] = rec["contexts"]  # [K, T, D], stored dtype (float16)
            out["captions"] = list(rec["captions"])
            return out
        rng = np.random.default_rng((self.seed, index % n, index // n))
        eps = rng.standard_normal(mean.shape, dtype=np.float32)
        out["latent"] = (mean + np.exp(0.5 * logvar) * eps) * np.float32(self.latent_scale)
        k = int(rng.integers(len(rec["captions"])))
        out["context"] = np.asarray(rec["contexts"][k], np.float32)  # [T, D]
        out["caption"] = rec["captions"][k]
        return out

    def __repr__(self) -> str:
        return (
            f"CocoSource({self.data_dir!r}, split={self.split!r}, records={len(self)}, "
            f"map_size={self.map_size}, sample_latent={self.sample_latent})"
        )


def coco_source_from_spec(data: DataSpec, split: str = "train") -> CocoSource:
    """The trainer's COCO source: ``data.dir``, the model's map side, moments view.

    Args:
      data: the run's ``DataSpec`` (``dir``, ``latent_scale``, ``seed``, the model's sizes,
        ``map_pooling``).
      split: ``train`` or ``val``.

    Returns:
      A :class:`CocoSource` with ``sample_latent=False`` (the pipeline draws latents).

    Raises:
      ValueError: when ``data.dir`` is unset or the data disagrees with the spec
        (latent shape, context shape, latent scale, pooling).
    """
    if not data.dir:
        raise ValueError(
            "config.data.dir is empty: pass --config.data.dir=<prepare_coco --output_dir>."
        )
    source = CocoSource(
        data.dir,
        split,
        map_size=data.map_size or None,
        map_pooling=data.map_pooling,
        latent_scale=data.latent_scale,
        seed=data.seed,
        sample_latent=False,
    )
    meta = source.metadata
    expected = {
        "latent_shape": [data.latent_size, data.latent_size, data.latent_channels],
        "context_shape": [data.num_clip_token, data.clip_dim],
    }
    for key, want in expected.items():
        if list(meta[key]) != want:
            raise ValueError(
                f"{data.dir} has {key} {meta[key]} but the model expects {want}; "
                "prepare the data with matching encoders or change the model config."
            )
    scale = float(meta["vae"]["scale_factor"])
    if not np.isclose(scale, source.latent_scale, rtol=1e-6):
        raise ValueError(
            f"{data.dir} was encoded with a VAE whose scale factor is {scale}, but "
            f"config.data.latent_scale={source.latent_scale}; pass "
            f"--config.data.latent_scale={scale}."
        )
    return source
