"""The input pipeline: a random-access source → grain ``DataLoader`` → batches in one schema.

Every source (``pdm_jax.data.synthetic``, ``pdm_jax.data.coco``; registered in ``SOURCES``)
is a grain random-access data source (``__len__``, ``__getitem__``) whose records hold

* ``latent`` float [S, S, C], or ``moments`` float [S, S, 2C] (VAE mean and log-variance:
  a latent ``mean + exp(logvar / 2)·ε`` is drawn per read) — the autoencoder's output; the
  model sees it times ``data.latent_scale`` (LDM's scale factor, 0.23010 for U-ViT's VAE),
  and ``DatasetInfo`` applies the same factor when encoding and decoding;
* ``map`` int [H, W] category ids at any resolution that pools to the model's map side
  (min pooling by default, DESIGN §1) — ignored by the plain U-ViT;
* ``context`` float [T, D], or ``contexts`` float [K, T, D] (one caption drawn per read).

:class:`NormaliseRecord` turns a record into the training schema ``{"latent", "map",
"context"}`` so the train step never branches on data plumbing. The loader shuffles with a
seed, shards by JAX process (``ShardByJaxProcess``), batches per process, runs
``data.num_workers`` worker processes (0: in-process) and its iterator state is a
checkpoint item (``pdm_jax.checkpointing``).
"""

from collections.abc import Callable, Mapping
from typing import Any

import grain
import jax
import numpy as np
from absl import flags

from pdm_jax.data.coco import dataset as coco_dataset
from pdm_jax.data.schema import DatasetInfo, DataSpec
from pdm_jax.data.synthetic import dataset as synthetic
from pdm_jax.diffusion import maps

# data.source → (data spec, split) → (random-access source, info). New sources register here.
SOURCES: dict[str, Callable[[DataSpec, str], tuple[Any, DatasetInfo]]] = {
    "synthetic": synthetic.synthetic_dataset,
    "coco": coco_dataset.coco_dataset,
}


def create_source(data: DataSpec, split: str = "train") -> tuple[Any, DatasetInfo]:
    """Builds the random-access source named by ``data.source``.

    Args:
      data: the run's ``DataSpec``.
      split: the split to read (synthetic: ``train`` or ``held_out``).

    Returns:
      ``(source, info)``.

    Raises:
      ValueError: for a source that is not available.
    """
    name = data.source
    if name not in SOURCES:
        raise ValueError(
            f"Data source {name!r} is not available; available: {sorted(SOURCES)}. "
            "Set --config.data.source accordingly (the demo uses 'synthetic')."
        )
    return SOURCES[name](data, split)


class NormaliseRecord(grain.transforms.RandomMap):
    """One record → ``{"latent" [S, S, C], "map" [fS, fS] int32, "context" [T, D]}``."""

    def __init__(
        self,
        *,
        map_size: int | None,
        map_pooling: str = "min",
        latent_scale: float = 1.0,
    ):
        """Args:
        map_size: the model's map side f·S, or None for an image-only model.
        map_pooling: how larger maps are pooled (``maps.POOLINGS``).
        latent_scale: factor on every latent (e.g. 0.23010 for SD's VAE).
        """
        self.map_size = map_size
        self.map_pooling = map_pooling
        self.latent_scale = latent_scale

    def random_map(self, element: Mapping[str, Any], rng: np.random.Generator) -> dict:
        """Normalises one record; ``rng`` is seeded per record by grain."""
        out = {}
        if "latent" in element:
            latent = np.asarray(element["latent"], np.float32)
        elif "moments" in element:
            mean, logvar = np.split(np.asarray(element["moments"], np.float32), 2, axis=-1)
            noise = rng.standard_normal(mean.shape, dtype=np.float32)
            latent = mean + np.exp(0.5 * logvar) * noise
        else:
            raise KeyError(f"Record has neither 'latent' nor 'moments'; keys: {sorted(element)}.")
        out["latent"] = latent * np.float32(self.latent_scale)
        if "context" in element:
            out["context"] = np.asarray(element["context"], np.float32)
        elif "contexts" in element:
            contexts = np.asarray(element["contexts"], np.float32)
            out["context"] = contexts[rng.integers(contexts.shape[0])]
        else:
            raise KeyError(f"Record has neither 'context' nor 'contexts'; keys: {sorted(element)}.")
        if self.map_size is not None:
            if "map" not in element:
                raise KeyError(
                    f"The model needs maps but the record has none; keys: {sorted(element)}."
                )
            ids = np.asarray(element["map"]).astype(np.int32)
            out["map"] = maps.map_to_resolution(ids, self.map_size, self.map_pooling)
        return out


def per_process_batch_size(global_batch_size: int, num_data_shards: int | None = None) -> int:
    """This process's share of the global batch, checked against the device count.

    Args:
      global_batch_size: ``config.train.batch_size``.
      num_data_shards: devices on the ``data`` axis (default: all devices).

    Returns:
      ``global_batch_size // jax.process_count()``.
    """
    shards = jax.device_count() if num_data_shards is None else num_data_shards
    if global_batch_size % shards:
        raise ValueError(
            f"Global batch size {global_batch_size} is not divisible by the {shards} devices of "
            "the data axis; set --config.train.batch_size to a multiple."
        )
    return global_batch_size // jax.process_count()


def create_loader(
    source: Any,
    data: DataSpec,
    *,
    batch_size: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
) -> grain.DataLoader:
    """A grain loader yielding this process's batches in the training schema.

    Args:
      source: a random-access source (``__len__``, ``__getitem__``).
      data: the run's ``DataSpec`` (seed, workers, threads, prefetch, map side and pooling).
      batch_size: global batch size.
      shuffle: seeded shuffling (a fresh permutation per epoch).
      num_epochs: passes over the source; None repeats forever.
      drop_remainder: drop a last partial batch (and uneven shards).

    Returns:
      A ``grain.DataLoader``; ``iter(loader)`` is checkpointable
      (``get_state``/``set_state``).
    """
    local_batch = per_process_batch_size(int(batch_size))
    normalise = NormaliseRecord(
        map_size=data.map_size or None,
        map_pooling=data.map_pooling,
        latent_scale=data.latent_scale,
    )
    if data.num_workers > 0 and not flags.FLAGS.is_parsed():
        raise RuntimeError(
            f"data.num_workers={data.num_workers}: grain's worker processes read absl flags, "
            "which nothing has parsed outside an absl program (a notebook, a script). Call "
            "absl.flags.FLAGS.mark_as_parsed() (or flags.FLAGS(sys.argv)) first, run through "
            "python -m pdm_jax.main, or set data.num_workers=0."
        )
    shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=drop_remainder)
    sampler = grain.samplers.IndexSampler(
        num_records=len(source),
        shard_options=shard_options,
        shuffle=shuffle,
        num_epochs=num_epochs,
        seed=data.seed,
    )
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[normalise, grain.transforms.Batch(local_batch, drop_remainder=drop_remainder)],
        worker_count=data.num_workers,
        read_options=grain.ReadOptions(
            num_threads=data.num_threads, prefetch_buffer_size=data.prefetch
        ),
    )
