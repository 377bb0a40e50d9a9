"""The input pipeline: a random-access source → grain ``DataLoader`` → batches in one schema.

Every source (the synthetic world now, a COCO ArrayRecord source later) is a grain
random-access data source (``__len__``, ``__getitem__``) whose records hold

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

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from absl import flags

from pdm_jax.data.synthetic import dataset as synthetic
from pdm_jax.diffusion import maps

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


def synthetic_world(config: ml_collections.ConfigDict) -> synthetic.SyntheticWorld:
    """The synthetic world whose sizes match ``config.model`` and ``config.data``."""
    overrides = {}
    if config.data.get("num_records", 0):
        overrides["num_records"] = int(config.data.num_records)
    return synthetic.SyntheticWorld(synthetic.SyntheticWorldConfig.from_config(config, **overrides))


def _synthetic(config: ml_collections.ConfigDict, split: str) -> tuple[Any, DatasetInfo]:
    world = synthetic_world(config)
    num_eval = int(config.train.get("num_eval_prompts", 8))
    scale = np.float32(config.data.latent_scale)
    info = DatasetInfo(
        empty_context=world.empty_context,
        encode_text=world.encode_text,
        encode_images=lambda images: world.autoencoder.encode(images) * scale,
        decode_latents=lambda latents: world.autoencoder.decode(np.asarray(latents) / scale),
        category_names=dict(world.category_names),
        colour_table=world.colour_table(),
        eval_prompts=tuple(world.held_out_prompts(num_eval)["caption"]),
    )
    return synthetic.SyntheticSource(world, split), info


def _coco(config: ml_collections.ConfigDict, split: str) -> tuple[Any, DatasetInfo]:
    from pdm_jax.data.coco import dataset as coco_info  # the COCO readers load only when used

    return coco_info.coco_dataset(config, split)


# data.source → (config, split) → (random-access source, info). New sources register here.
SOURCES: dict[str, Callable[[ml_collections.ConfigDict, str], tuple[Any, DatasetInfo]]] = {
    "synthetic": _synthetic,
    "coco": _coco,
}


def create_source(
    config: ml_collections.ConfigDict, split: str = "train"
) -> tuple[Any, DatasetInfo]:
    """Builds the random-access source named by ``config.data.source``.

    Args:
      config: the full config.
      split: the split to read (synthetic: ``train`` or ``held_out``).

    Returns:
      ``(source, info)``.

    Raises:
      ValueError: for a source that is not available.
    """
    name = config.data.source
    if name not in SOURCES:
        raise ValueError(
            f"Data source {name!r} is not available; available: {sorted(SOURCES)}. "
            "Set --config.data.source accordingly (the demo uses 'synthetic')."
        )
    return SOURCES[name](config, split)


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
    config: ml_collections.ConfigDict,
    *,
    batch_size: int | None = None,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
) -> grain.DataLoader:
    """A grain loader yielding this process's batches in the training schema.

    Args:
      source: a random-access source (``__len__``, ``__getitem__``).
      config: the full config (``data.seed``, ``data.num_workers``, ``data.num_threads``,
        ``data.prefetch``, ``model`` for the map side, ``diffusion.map_pooling``).
      batch_size: global batch size (default ``config.train.batch_size``).
      shuffle: seeded shuffling (a fresh permutation per epoch).
      num_epochs: passes over the source; None repeats forever.
      drop_remainder: drop a last partial batch (and uneven shards).

    Returns:
      A ``grain.DataLoader``; ``iter(loader)`` is checkpointable
      (``get_state``/``set_state``).
    """
    m = config.model
    global_batch = int(batch_size or config.train.batch_size)
    local_batch = per_process_batch_size(global_batch)
    normalise = NormaliseRecord(
        map_size=None if m.name == "uvit" else int(m.img_size * m.map_patch_factor),
        map_pooling=config.diffusion.map_pooling,
        latent_scale=float(config.data.get("latent_scale", 1.0)),
    )
    shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=drop_remainder)
    sampler = grain.samplers.IndexSampler(
        num_records=len(source),
        shard_options=shard_options,
        shuffle=shuffle,
        num_epochs=num_epochs,
        seed=int(config.data.seed),
    )
    num_threads = int(config.data.get("num_threads", 2))
    if config.data.num_workers > 0 and not flags.FLAGS.is_parsed():
        # Grain's worker processes read absl flags; outside an absl app (notebooks, tests)
        # nothing parsed them, so their defaults are taken.
        flags.FLAGS.mark_as_parsed()
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[normalise, grain.transforms.Batch(local_batch, drop_remainder=drop_remainder)],
        worker_count=int(config.data.num_workers),
        read_options=grain.ReadOptions(
            num_threads=num_threads, prefetch_buffer_size=int(config.data.get("prefetch", 64))
        ),
    )
