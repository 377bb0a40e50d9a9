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

The order is one global order, whatever the number of processes (:class:`GlobalOrderSampler`):
global batch ``k`` holds positions ``[k·B, (k+1)·B)`` of one seeded permutation stream, and
process ``p`` of ``P`` reads only rows ``[p·B/P, (p+1)·B/P)`` of it, which are the rows its
devices hold of the global batch. One process × 8 devices and two processes × 4 devices thus
train on the same batches (with ``data.num_workers=0``; worker processes group each
process's records by worker), and a run can continue its data order on another topology
from the step alone (``seek``).
"""

import json
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
    check_source(data.source)
    return SOURCES[data.source](data, split)


def check_source(name: str) -> None:
    """Raises ValueError unless ``name`` is a registered ``data.source``."""
    if name not in SOURCES:
        raise ValueError(
            f"Data source {name!r} is not available; available: {sorted(SOURCES)}. "
            "Set --config.data.source accordingly (the demo uses 'synthetic')."
        )


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


class GlobalOrderSampler:
    """Grain sampler: process ``p``'s records are its rows of one global batch order.

    Grain's ``DataLoader`` (``ShardByJaxProcess``) asks process ``p`` of ``P`` for sampler
    indices ``p, p + P, p + 2P, …``; index ``j`` (local record ``i = j // P``) is mapped to
    global position ``(i // b)·B + p·b + i mod b`` (``b = B / P``) of an unsharded
    ``IndexSampler``, whose record and per-record RNG depend on that position only. The
    stream ends after the last complete global batch.
    """

    def __init__(
        self,
        num_records: int,
        *,
        global_batch_size: int,
        process_count: int,
        shuffle: bool,
        num_epochs: int | None,
        seed: int,
    ):
        """Args:
        num_records: records in the source.
        global_batch_size: B, a multiple of ``process_count``.
        process_count: P.
        shuffle: a fresh seeded permutation per epoch.
        num_epochs: passes over the source; None repeats forever.
        seed: shuffle and per-record RNG seed.
        """
        if global_batch_size % process_count:
            raise ValueError(
                f"Global batch size {global_batch_size} is not divisible by the "
                f"{process_count} processes; set --config.train.batch_size to a multiple."
            )
        self._inner = grain.samplers.IndexSampler(
            num_records=num_records,
            shard_options=grain.sharding.NoSharding(),
            shuffle=shuffle,
            num_epochs=num_epochs,
            seed=seed,
        )
        self._global, self._count = int(global_batch_size), int(process_count)
        self._local = self._global // self._count
        self._len = len(self._inner) // self._global * self._global

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return (
            f"GlobalOrderSampler(global_batch_size={self._global}, "
            f"process_count={self._count}, {self._inner!r})"
        )

    def global_position(self, index: int) -> int:
        """The global stream position of sampler index ``index``."""
        process, local = index % self._count, index // self._count
        batch, row = divmod(local, self._local)
        return batch * self._global + process * self._local + row

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        if not 0 <= index < self._len:
            raise IndexError(f"Sampler index {index} is outside [0, {self._len}).")
        return self._inner[self.global_position(index)]


def seek(iterator: Any, num_batches: int, local_batch_size: int) -> None:
    """Moves a fresh loader iterator to just after its first ``num_batches`` batches.

    The state is the one grain's iterator reports after reading those batches (with or
    without worker processes, which take the batches round robin), so a run can take up
    the data order at a step without an iterator state saved for this process count.

    Args:
      iterator: ``iter(create_loader(...))``, not advanced yet.
      num_batches: batches this process has read (the training step).
      local_batch_size: rows per batch on this process.
    """
    if num_batches <= 0:
        return
    state = json.loads(iterator.get_state().decode())
    count, index = jax.process_count(), jax.process_index()
    workers = int(state["worker_count"])
    slots = max(workers, 1)
    global_slots = slots * count
    last_seen = {}
    for w in range(slots):
        batches = (num_batches - w + slots - 1) // slots if num_batches > w else 0
        consumed = batches * local_batch_size  # records read by that worker
        last_seen[str(w)] = index - global_slots + w * count + consumed * global_slots
    state["last_seen_indices"] = last_seen
    state["last_worker_index"] = num_batches % slots - 1
    iterator.set_state(json.dumps(state).encode())


def create_loader(
    source: Any,
    data: DataSpec,
    *,
    batch_size: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
) -> grain.DataLoader:
    """A grain loader yielding this process's batches in the training schema.

    Args:
      source: a random-access source (``__len__``, ``__getitem__``).
      data: the run's ``DataSpec`` (seed, workers, threads, prefetch, map side and pooling).
      batch_size: global batch size.
      shuffle: seeded shuffling (a fresh permutation per epoch).
      num_epochs: passes over the source (the last partial global batch is dropped);
        None repeats forever.

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
    sampler = GlobalOrderSampler(
        len(source),
        global_batch_size=int(batch_size),
        process_count=jax.process_count(),
        shuffle=shuffle,
        num_epochs=num_epochs,
        seed=data.seed,
    )
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        shard_options=grain.sharding.ShardByJaxProcess(drop_remainder=True),
        operations=[normalise, grain.transforms.Batch(local_batch, drop_remainder=True)],
        worker_count=data.num_workers,
        read_options=grain.ReadOptions(
            num_threads=data.num_threads, prefetch_buffer_size=data.prefetch
        ),
    )
