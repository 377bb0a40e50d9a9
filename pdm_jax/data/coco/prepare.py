r"""COCO 2017 panoptic + captions → ArrayRecord training data (VAE moments, CLIP contexts, maps).

    python -m pdm_jax.data.coco.prepare --coco_dir=/data/coco --output_dir=/data/coco_pdm \
        --split=train --vae=/ckpt/autoencoder_kl.pth --clip=/ckpt/clip-vit-large-patch14

Per image (see :mod:`pdm_jax.data.coco.panoptic` for crop, resize and map rules): VAE moments of
the 256×256 crop (our Flax VAE, jitted, fixed batch), the CLIP context of every caption (our
Flax CLIP text tower, batched), the captions, and category maps at 32, 64 and 128. With
``--resolution=512`` (Stable Diffusion's UNet) the crop is 512×512 (64×64 latents) and the
maps are 64, 128 and 256 (f × 64 for f = 1, 2, 4). The
empty caption's context is written once per output directory. Format and record schema:
:mod:`pdm_jax.data.coco.records`.

Work is planned from the annotations alone (images in id order, ``--records_per_shard``
per file), so every host derives the same plan: with ``--num_shards=N --shard_index=i`` a
process writes the files whose number is ≡ i (mod N). A file is written to a temporary
name and renamed when complete, then a marker records it; re-running skips marked files
and rewrites the rest, so an interrupted run resumes and ends with the same bytes. The
process that completes the last file writes ``metadata_<split>.json``.

Images without a panoptic annotation are skipped and counted. An unreadable image or PNG
stops the run with its path, unless ``--skip_bad`` (then it is listed in the metadata).
"""

import concurrent.futures
import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
import tqdm
from absl import app, flags, logging
from array_record.python.array_record_module import ArrayRecordWriter

from pdm_jax import paths
from pdm_jax.data.coco import encoders, records
from pdm_jax.data.coco import panoptic as coco
from pdm_jax.diffusion import maps
from pdm_jax.weights import clip as hf_clip
from pdm_jax.weights import vae as vae_convert

LOGVAR_RANGE = (-30.0, 20.0)  # as the KL autoencoder's DiagonalGaussianDistribution
CONTEXT_DTYPES = ("float16", "float32")
WRITER_OPTIONS = "group_size:1"  # one record per chunk: what random access needs


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
    """Everything that shapes the output bytes besides the encoders.

    Attributes:
      records_per_shard: images per ArrayRecord file.
      map_sizes: map sides written (``map_<m>`` keys); None: f × the latent side
        (``panoptic.map_sizes_for(resolution)``).
      map_pooling: ``min`` | ``min_nonvoid`` | ``mode``.
      context_dtype: storage dtype of contexts (float16 halves the disk).
      resolution: image side, 256 (U-ViT) or 512 (Stable Diffusion: 64×64 latents).
    """

    records_per_shard: int = 256
    map_sizes: tuple[int, ...] | None = None
    map_pooling: str = "min"
    context_dtype: str = "float16"
    resolution: int = coco.IMAGE_SIZE

    def __post_init__(self):
        coco.check_resolution(self.resolution)
        if self.map_sizes is None:
            object.__setattr__(self, "map_sizes", coco.map_sizes_for(self.resolution))
        if self.records_per_shard < 1:
            raise ValueError("--records_per_shard must be at least 1.")
        if self.map_pooling not in maps.POOLINGS:
            raise ValueError(f"--map_pooling={self.map_pooling!r}; choose one of {maps.POOLINGS}.")
        if self.context_dtype not in CONTEXT_DTYPES:
            raise ValueError(f"--context_dtype must be one of {CONTEXT_DTYPES}.")
        for m in self.map_sizes:
            if self.resolution % m:
                raise ValueError(f"Map side {m} does not divide --resolution={self.resolution}.")


def _settings(
    options: PrepareOptions,
    image_encoder: encoders.ImageEncoder,
    text_encoder: encoders.ContextEncoder,
    n: int,
) -> dict[str, Any]:
    """What every file of one output must agree on (checked when resuming)."""
    settings = dataclasses.asdict(options)
    settings["map_sizes"] = list(options.map_sizes)
    settings.update(
        num_files=n,
        image_size=options.resolution,
        latent_shape=list(image_encoder.latent_shape),
        vae=dict(image_encoder.identity, scale_factor=float(image_encoder.scale_factor)),
        text_encoder=dict(text_encoder.identity),
    )
    return json.loads(json.dumps(settings))


def _comparable(settings: dict[str, Any]) -> dict[str, Any]:
    # Checkpoint paths may differ between hosts; configs and weights may not.
    return {
        k: {kk: vv for kk, vv in v.items() if kk != "path"} if isinstance(v, dict) else v
        for k, v in settings.items()
    }


def _check_resume(output_dir: str, split: str, names: list[str], settings: dict) -> set[str]:
    """Names of finished files; raises when the directory holds another preparation."""
    done = set()
    for name in records.existing_markers(output_dir, split):
        marker = records.read_json(records.marker_path(output_dir, name))
        if name not in names or _comparable(marker["settings"]) != _comparable(settings):
            raise ValueError(
                f"{output_dir} already holds {split} files prepared with other settings or "
                f"encoders ({name}: {marker['settings']}). Re-run with the same flags and "
                "checkpoints, or use a fresh --output_dir."
            )
        if os.path.isfile(os.path.join(output_dir, name)):
            done.add(name)
    return done


def _encode_batch(
    batch: list[tuple[coco.ImageEntry, dict]],
    image_encoder: encoders.ImageEncoder,
    text_encoder: encoders.ContextEncoder,
    options: PrepareOptions,
) -> list[bytes]:
    images = np.stack([ex["image"] for _, ex in batch])  # [B, 256, 256, 3] uint8
    mean, logvar = image_encoder(images)  # [B, S, S, C] each
    logvar = np.clip(np.asarray(logvar, np.float32), *LOGVAR_RANGE)
    captions = [c for entry, _ in batch for c in entry.captions]
    contexts = np.asarray(text_encoder(captions)).astype(options.context_dtype)  # [ΣK, T, D]
    out, start = [], 0
    for i, (entry, ex) in enumerate(batch):
        k = len(entry.captions)
        record = {
            "version": records.RECORD_VERSION,
            "image_id": entry.image_id,
            "file_name": entry.file_name,
            "captions": list(entry.captions),
            "mean": np.asarray(mean[i], np.float32),
            "logvar": logvar[i],
            "contexts": contexts[start : start + k],
        }
        record.update({f"map_{m}": ex["maps"][m].astype(np.uint8) for m in options.map_sizes})
        out.append(records.encode_record(record))
        start += k
    return out


def _write_file(
    path: str,
    entries: Sequence[coco.ImageEntry],
    load: Callable[[coco.ImageEntry], dict],
    pool: concurrent.futures.Executor,
    encode: Callable[[list], list[bytes]],
    batch_size: int,
    skip_bad: bool,
    progress: tqdm.tqdm,
) -> tuple[list[int], int, list[dict]]:
    """Writes one file atomically; returns (image ids, caption count, bad files)."""
    tmp = f"{path}.tmp"
    if os.path.exists(tmp):
        os.remove(tmp)
    futures: dict[int, concurrent.futures.Future] = {}
    ids, num_captions, bad = [], 0, []
    writer = ArrayRecordWriter(tmp, WRITER_OPTIONS)
    try:
        for start in range(0, len(entries), batch_size):
            # Decode this batch and the next in threads while the encoders run.
            for j in range(len(futures), min(start + 2 * batch_size, len(entries))):
                futures[j] = pool.submit(load, entries[j])
            batch = []
            for j in range(start, min(start + batch_size, len(entries))):
                entry, future = entries[j], futures[j]
                try:
                    batch.append((entry, future.result()))
                except coco.CorruptFileError as e:
                    if not skip_bad:
                        raise
                    logging.warning("Skipping image %d: %s", entry.image_id, e)
                    bad.append({"image_id": entry.image_id, "path": e.path, "reason": e.reason})
            if batch:
                for data in encode(batch):
                    writer.write(data)
                ids.extend(entry.image_id for entry, _ in batch)
                num_captions += sum(len(entry.captions) for entry, _ in batch)
            progress.update(len(entries[start : start + batch_size]))
    except BaseException:
        writer.close()
        for future in futures.values():
            future.cancel()
        os.remove(tmp)
        raise
    writer.close()
    os.replace(tmp, path)
    return ids, num_captions, bad


def _finalize(
    output_dir: str, split: str, names: list[str], index: coco.SplitIndex, settings: dict
) -> dict[str, Any] | None:
    """Writes ``metadata_<split>.json`` once every file has its marker."""
    markers = []
    for name in names:
        path = records.marker_path(output_dir, name)
        if not os.path.isfile(path):
            return None
        markers.append(records.read_json(path))
    bad = [b for m in markers for b in m["bad_files"]]
    metadata = {
        "format": records.FORMAT,
        "record_version": records.RECORD_VERSION,
        "split": split,
        "files": [{"name": m["name"], "num_records": len(m["image_ids"])} for m in markers],
        "num_records": sum(len(m["image_ids"]) for m in markers),
        "num_captions": sum(m["num_captions"] for m in markers),
        "counts": {
            "images_listed": index.num_images,
            "records": sum(len(m["image_ids"]) for m in markers),
            "skipped_no_panoptic": len(index.skipped_no_panoptic),
            "skipped_no_captions": len(index.skipped_no_captions),
            "skipped_bad": len(bad),
        },
        "skipped_no_panoptic": list(index.skipped_no_panoptic),
        "skipped_no_captions": list(index.skipped_no_captions),
        "bad_files": bad,
        "image_size": settings["image_size"],
        "latent_shape": settings["latent_shape"],
        "context_shape": markers[0]["context_shape"],
        "map_sizes": settings["map_sizes"],
        "map_pooling": settings["map_pooling"],
        "context_dtype": settings["context_dtype"],
        "vae": settings["vae"],
        "text_encoder": settings["text_encoder"],
        "empty_context": records.EMPTY_CONTEXT_FILE,
        "categories": list(coco.load_categories()),
    }
    records.write_json_atomic(records.metadata_path(output_dir, split), metadata)
    return metadata


def prepare(
    coco_dir: str,
    output_dir: str,
    split: str,
    image_encoder: encoders.ImageEncoder,
    text_encoder: encoders.ContextEncoder,
    *,
    options: PrepareOptions = PrepareOptions(),
    shard_index: int = 0,
    num_shards: int = 1,
    batch_size: int = 8,
    skip_bad: bool = False,
    num_threads: int = 4,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Prepares this process's part of a split (library form of the command).

    Args:
      coco_dir: COCO root in the standard layout.
      output_dir: destination (created; shared by the hosts).
      split: ``train`` or ``val``.
      image_encoder: VAE moments encoder.
      text_encoder: CLIP context encoder.
      options: output layout options.
      shard_index: this process's part, in ``[0, num_shards)``.
      num_shards: number of processes splitting the work.
      batch_size: images per encoder call.
      skip_bad: skip (and list) unreadable files instead of stopping.
      num_threads: image-decoding threads.
      show_progress: draw a tqdm bar.

    Returns:
      ``{"files_written", "files_skipped", "metadata"}``; ``metadata`` is None until every
      file of the split exists.

    Raises:
      coco.CorruptFileError: an unreadable input (without ``skip_bad``).
    """
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"--shard_index={shard_index} must be in [0, --num_shards={num_shards}).")
    encoder_size = getattr(image_encoder, "image_size", options.resolution)
    if encoder_size != options.resolution:
        raise ValueError(
            f"The image encoder takes {encoder_size}-px images but --resolution="
            f"{options.resolution}; build it with image_size={options.resolution}."
        )
    index = coco.build_index(coco_dir, split)
    n = options.records_per_shard
    num_files = max(1, math.ceil(len(index.entries) / n))
    names = records.file_names(split, num_files)
    settings = _settings(options, image_encoder, text_encoder, num_files)
    os.makedirs(os.path.join(output_dir, records.PROGRESS_DIR), exist_ok=True)
    done = _check_resume(output_dir, split, names, settings)

    empty = np.asarray(text_encoder([""])[0], np.float32)  # [T, D]
    empty_path = os.path.join(output_dir, records.EMPTY_CONTEXT_FILE)
    if not os.path.isfile(empty_path):
        records.write_npy_atomic(empty_path, empty)
    elif not np.array_equal(np.load(empty_path), empty):
        raise ValueError(
            f"{empty_path} was written by another text encoder; use the same --clip or a "
            "fresh --output_dir."
        )

    mine = [i for i in range(num_files) if i % num_shards == shard_index]
    todo = [i for i in mine if names[i] not in done]
    load = lambda e: coco.load_example(
        coco_dir, split, e, options.map_sizes, options.map_pooling, options.resolution
    )
    encode = lambda batch: _encode_batch(batch, image_encoder, text_encoder, options)
    total = sum(len(index.entries[i * n : (i + 1) * n]) for i in mine)
    progress = tqdm.tqdm(
        total=total,
        initial=total - sum(len(index.entries[i * n : (i + 1) * n]) for i in todo),
        unit="img",
        desc=f"{split} part {shard_index}/{num_shards}",
        disable=not show_progress,
    )
    with progress, concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        for i in todo:
            entries = index.entries[i * n : (i + 1) * n]
            path = os.path.join(output_dir, names[i])
            ids, num_captions, bad = _write_file(
                path, entries, load, pool, encode, batch_size, skip_bad, progress
            )
            records.write_json_atomic(
                records.marker_path(output_dir, names[i]),
                {
                    "name": names[i],
                    "image_ids": ids,
                    "num_captions": num_captions,
                    "bad_files": bad,
                    "settings": settings,
                    "context_shape": list(empty.shape),
                },
            )
    metadata = _finalize(output_dir, split, names, index, settings)
    return {
        "files_written": [names[i] for i in todo],
        "files_skipped": [names[i] for i in mine if i not in todo],
        "metadata": metadata,
    }


def define_flags(fv: flags.FlagValues) -> None:
    """Defines the command's flags (only when run as a command: the names are common)."""
    flags.DEFINE_string(
        "coco_dir", None, "COCO 2017 root (train2017/, val2017/, annotations/).", flag_values=fv
    )
    flags.DEFINE_string(
        "output_dir", None, "Where the ArrayRecord files and metadata go.", flag_values=fv
    )
    flags.DEFINE_enum(
        "split", "train", list(coco.SPLITS), "Which split to prepare.", flag_values=fv
    )
    flags.DEFINE_string(
        "vae", None, "VAE checkpoint (U-ViT autoencoder_kl.pth or a diffusers dir).", flag_values=fv
    )
    flags.DEFINE_string(
        "clip", None, "Hugging Face CLIP (ViT-L/14) directory, e.g. an SD root.", flag_values=fv
    )
    flags.DEFINE_integer(
        "shard_index", 0, "This process's part of the work, in [0, num_shards).", flag_values=fv
    )
    flags.DEFINE_integer(
        "num_shards", 1, "Processes splitting the work (file i goes to i % N).", flag_values=fv
    )
    flags.DEFINE_integer("records_per_shard", 256, "Images per ArrayRecord file.", flag_values=fv)
    flags.DEFINE_integer("batch_size", 8, "Images per VAE call.", flag_values=fv)
    flags.DEFINE_integer("text_batch_size", 32, "Captions per CLIP call.", flag_values=fv)
    flags.DEFINE_bool(
        "skip_bad", False, "Skip unreadable files (listed in the metadata).", flag_values=fv
    )
    flags.DEFINE_integer(
        "resolution",
        coco.IMAGE_SIZE,
        "Image side: 256 (U-ViT, 32×32 latents) or 512 (Stable Diffusion, 64×64 latents).",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "map_pooling",
        "min",
        list(maps.POOLINGS),
        "Pooling of the full-resolution map.",
        flag_values=fv,
    )
    flags.DEFINE_list(
        "map_sizes",
        [],
        "Map sides to store (default: 1, 2 and 4 × the latent side, e.g. 32,64,128 at 256).",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "context_dtype", "float16", list(CONTEXT_DTYPES), "Context storage dtype.", flag_values=fv
    )
    flags.DEFINE_integer("num_threads", 4, "Image-decoding threads.", flag_values=fv)
    flags.DEFINE_float(
        "scale_factor",
        None,
        "Latent scale recorded in the metadata (default: VAE's).",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "compute_dtype",
        "float32",
        ["float32", "bfloat16"],
        "Encoder compute dtype (weights stay float32).",
        flag_values=fv,
    )


def main(argv: Sequence[str]) -> None:
    """Loads the encoders named by the flags and runs :func:`prepare`."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    for name in ("coco_dir", "output_dir", "vae", "clip"):
        if not getattr(flags.FLAGS, name):
            raise app.UsageError(f"--{name} is required.")
        setattr(flags.FLAGS, name, paths.resolve(getattr(flags.FLAGS, name)))  # relative, ~
    try:
        coco.check_resolution(flags.FLAGS.resolution)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    dtype = jnp.dtype(flags.FLAGS.compute_dtype)
    module, params = vae_convert.load_vae(flags.FLAGS.vae, dtype=dtype)
    if flags.FLAGS.scale_factor is not None:
        module = module.clone(
            config=dataclasses.replace(module.config, scale_factor=flags.FLAGS.scale_factor)
        )
    image_encoder = encoders.VaeMoments(
        module,
        params,
        batch_size=flags.FLAGS.batch_size,
        path=flags.FLAGS.vae,
        image_size=flags.FLAGS.resolution,
    )
    text_module, text_params, tokenizer = hf_clip.load_clip_text(flags.FLAGS.clip, dtype=dtype)
    text_encoder = encoders.ClipContexts(
        text_module,
        text_params,
        tokenizer,
        batch_size=flags.FLAGS.text_batch_size,
        path=flags.FLAGS.clip,
    )
    options = PrepareOptions(
        records_per_shard=flags.FLAGS.records_per_shard,
        map_sizes=tuple(int(m) for m in flags.FLAGS.map_sizes) or None,
        map_pooling=flags.FLAGS.map_pooling,
        context_dtype=flags.FLAGS.context_dtype,
        resolution=flags.FLAGS.resolution,
    )
    try:
        result = prepare(
            flags.FLAGS.coco_dir,
            flags.FLAGS.output_dir,
            flags.FLAGS.split,
            image_encoder,
            text_encoder,
            options=options,
            shard_index=flags.FLAGS.shard_index,
            num_shards=flags.FLAGS.num_shards,
            batch_size=flags.FLAGS.batch_size,
            skip_bad=flags.FLAGS.skip_bad,
            num_threads=flags.FLAGS.num_threads,
        )
    except coco.CorruptFileError as e:
        raise SystemExit(f"prepare_coco: {e}") from e
    meta = result["metadata"]
    logging.info(
        "Wrote %d files, %d already done; %s",
        len(result["files_written"]),
        len(result["files_skipped"]),
        f"split complete: {meta['counts']}" if meta else "other parts are still missing.",
    )


if __name__ == "__main__":
    define_flags(flags.FLAGS)
    app.run(main)
