"""Evaluation's scoring: per-sample figures, their gathering over processes and summary.

``synthetic_figures`` is the synthetic world's oracle scoring (map ↔ image agreement,
caption recall, MCD) that both ``--mode=evaluate`` and the demo's ``metrics.json`` use.
"""

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import tqdm
from etils import epath
from jax.experimental import multihost_utils

from pdm_jax import specs
from pdm_jax.data.synthetic import world as world_lib
from pdm_jax.evaluation import clip_score, fid, reference_stats, store
from pdm_jax.evaluation import mcd as mcd_lib


def synthetic_figures(
    world: Any,
    captions: Sequence[str],
    images: np.ndarray,
    maps: np.ndarray | None,
    refs: np.ndarray | None,
) -> dict[str, np.ndarray]:
    """Per-sample figures of the synthetic world's oracle for generated images.

    Args:
      world: the ``SyntheticWorld`` (its ``segment`` is the oracle).
      captions: the B captions sampled with.
      images: uint8 [B, H, W, 3] generated images.
      maps: int [B, M, M] generated maps (cogeneration), or None.
      refs: int [B, M, M] the prompts' reference maps (given to the given-map task), or None.

    Returns:
      With ``maps``: ``thing_iou`` and ``stuff_miou`` (per sample, the mean IoU over the
      thing / stuff categories present in the map or in the oracle's reading of the image:
      are the things where the map puts them; NaN when there is none, so average with
      ``np.nanmean``), ``map_image_agreement`` (pixel accuracy of the map against that
      reading), ``caption_recall`` (caption categories in the map), ``image_caption_recall``
      (… in the image) and, with ``refs``, ``mcd`` of the map against them. Without
      ``maps`` but with ``refs`` (given map): the given map is compared with the oracle's
      reading of the image (``thing_iou``, ``stuff_miou``, ``map_image_agreement``), which
      also plays the generated map's part in ``caption_recall`` and ``mcd``. Without
      either: ``image_caption_recall``.
    """
    size = maps.shape[-1] if maps is not None else None if refs is None else refs.shape[-1]
    seg = world.segment(images, size)  # [B, M, M]
    if maps is not None:
        out = {
            **_iou_figures(maps, seg),
            "map_image_agreement": np.mean(seg == maps, axis=(1, 2)),
            "caption_recall": world.caption_recall(captions, maps),
            "image_caption_recall": world.caption_recall(captions, seg),
        }
        if refs is not None:
            out["mcd"] = mcd_lib.mean_count_difference_per_pair(refs, maps)
        return out
    if refs is not None:
        return {
            **_iou_figures(refs, seg),
            "map_image_agreement": np.mean(seg == refs, axis=(1, 2)),
            "caption_recall": world.caption_recall(captions, seg),
            "mcd": mcd_lib.mean_count_difference_per_pair(refs, seg),
        }
    return {"image_caption_recall": world.caption_recall(captions, seg)}


def mean_over_scored(values: np.ndarray) -> float | None:
    """Mean over the samples that have a value; NaN marks a sample with nothing to score
    (e.g. no thing in either map). None when no sample has one (JSON has no NaN)."""
    values = np.asarray(values, np.float64)
    scored = values[~np.isnan(values)]
    return float(np.mean(scored)) if scored.size else None


def _iou_figures(maps: np.ndarray, seg: np.ndarray) -> dict[str, np.ndarray]:
    """Per-sample thing IoU and stuff mIoU of ``maps`` against the oracle's ``seg``."""
    return {
        "thing_iou": mcd_lib.category_iou_per_pair(maps, seg, world_lib.THING_IDS),
        "stuff_miou": mcd_lib.category_iou_per_pair(maps, seg, world_lib.STUFF_IDS),
    }


def score_samples(
    ev: specs.EvalSpec,
    prompts: Any,
    world: Any,
    samples_dir: epath.Path,
    indices: Sequence[int],
    extractor: reference_stats.InceptionFeatures | None,
    embedder: Any,
    needs_map: bool,
) -> dict[str, np.ndarray]:
    """Per-sample scores of the samples ``indices``.

    Args:
      ev: the ``eval`` settings.
      prompts: the prompts the samples were made for.
      world: the synthetic world (its oracle segmenter), or None.
      samples_dir: the sample files.
      indices: which samples.
      extractor: Inception features for FID, or None.
      embedder: a ``ClipEmbedder`` for the CLIP score, or None.
      needs_map: whether the samples have generated maps.

    Returns:
      ``{name: [n] per-sample values}`` plus ``features`` [n, 2048] for FID.
    """
    batch = extractor.batch_size if extractor is not None else int(ev.inception_batch_size)
    out: dict[str, list[np.ndarray]] = {}
    add = lambda key, value: out.setdefault(key, []).append(np.asarray(value))
    text_cache: dict[str, np.ndarray] = {}
    for lo in tqdm.tqdm(range(0, len(indices), batch), unit="batch", desc="scoring"):
        chunk = list(indices[lo : lo + batch])
        batch_prompts = [prompts[i] for i in chunk]
        images = np.stack([store.read_png(samples_dir / store.sample_name(i))[0] for i in chunk])
        refs = None if batch_prompts[0].map is None else np.stack([p.map for p in batch_prompts])
        captions = [p.caption for p in batch_prompts]
        if extractor is not None:
            add("features", extractor.of_arrays(images).astype(np.float32))
        if embedder is not None:
            all_captions = [p.captions for p in batch_prompts]
            add("clip_score", _clip_scores(embedder, images, all_captions, text_cache))
        maps = None
        if needs_map:
            read = [store.read_png(samples_dir / store.sample_name(i, "_map")) for i in chunk]
            maps = np.stack([ids for ids, _ in read]).astype(np.int32)
            add("mcd", mcd_lib.mean_count_difference_per_pair(refs, maps))
            add("invalid_map_pixels", [int(t["invalid_pixels"]) / ids.size for ids, t in read])
        if world is not None:
            for key, value in synthetic_figures(world, captions, images, maps, refs).items():
                if key != "mcd" or maps is None:  # a generated map's MCD is added above
                    add(key, value)
    return {k: np.concatenate(v) for k, v in out.items()}


def _clip_scores(
    embedder: Any, images: np.ndarray, captions: list[tuple[str, ...]], cache: dict[str, Any]
) -> np.ndarray:
    """Per-image CLIP score over each image's captions (``[n]`` float64).

    ``cache`` maps captions to their embeddings: COCO revisits every image's captions once
    per pass over the val set, so each caption is embedded once.
    """
    new = sorted({c for cs in captions for c in cs} - cache.keys())
    if new:
        cache.update(zip(new, embedder.text_embeds(new), strict=True))
    k = max(len(c) for c in captions)
    text = np.stack([[cache[c[min(j, len(c) - 1)]] for j in range(k)] for c in captions])
    mask = np.asarray([[j < len(c) for j in range(k)] for c in captions])  # [n, K]
    return clip_score.clip_scores_per_image(embedder.image_embeds(images), text, mask)


def gather(scores: dict[str, np.ndarray], eval_dir: epath.Path, task: str) -> dict | None:
    """Every process's scores, concatenated in index order, on process 0 (None elsewhere)."""
    if jax.process_count() == 1:
        return scores
    part = lambda p: eval_dir / f"scores_{task}_process{p}.npz"
    with part(jax.process_index()).open("wb") as f:
        np.savez(f, **scores)
    multihost_utils.sync_global_devices(f"pdm_eval_scores_{task}")
    if jax.process_index() != 0:
        return None
    parts = []
    for p in range(jax.process_count()):
        with part(p).open("rb") as f, np.load(f) as z:
            parts.append({k: z[k] for k in z.files})
    keys = {k for q in parts for k in q}  # a process without samples has no arrays
    return {k: np.concatenate([q[k] for q in parts if k in q]) for k in keys}


def summarise(
    scores: dict[str, np.ndarray], ev: specs.EvalSpec, eval_dir: epath.Path
) -> dict[str, float]:
    """Means of the per-sample scores, and the FID of the features.

    Args:
      scores: every sample's scores (``score_samples`` of all processes).
      ev: the ``eval`` settings (``fid_stats``, ``task``).
      eval_dir: where the samples' own FID statistics are written.

    Returns:
      ``{metric: value}``.
    """
    metrics = {k: mean_over_scored(v) for k, v in scores.items() if k != "features"}
    if "features" in scores:
        mu, sigma = fid.feature_statistics(scores["features"])
        with (eval_dir / f"fid_stats_{ev.task}.npz").open("wb") as f:
            fid.save_stats(f, mu, sigma)
        with epath.Path(ev.fid_stats).open("rb") as f:
            reference = fid.load_stats(f)
        metrics["fid"] = fid.frechet_distance(mu, sigma, *reference)
    return metrics
