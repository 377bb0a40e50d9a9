"""Evaluation's scoring: per-sample figures, their gathering over processes and summary.

``synthetic_figures`` is the synthetic world's oracle scoring (map ↔ image agreement,
caption recall, MCD) that both ``--mode=evaluate`` and the demo's ``metrics.json`` use. The
given-image and inpainting tasks score generated maps against the ground truth with
``panoptic_quality`` (mIoU, PQ), whose additive counts are summed, not averaged.
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
from pdm_jax.evaluation import panoptic_quality as pq_lib
from pdm_jax.evaluation import prompts as prompts_lib


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


def _iou_figures(
    maps: np.ndarray,
    seg: np.ndarray,
    thing_ids: Sequence[int] = world_lib.THING_IDS,
    stuff_ids: Sequence[int] = world_lib.STUFF_IDS,
    prefix: str = "",
) -> dict[str, np.ndarray]:
    """Per-sample thing IoU and stuff mIoU of ``maps`` against ``seg`` (the oracle's reading
    of the image, or the ground truth)."""
    return {
        f"{prefix}thing_iou": mcd_lib.category_iou_per_pair(maps, seg, thing_ids),
        f"{prefix}stuff_miou": mcd_lib.category_iou_per_pair(maps, seg, stuff_ids),
    }


def _inpaint_figures(
    ev: specs.EvalSpec,
    chunk: Sequence[int],
    maps: np.ndarray,
    refs: np.ndarray,
    read: list[tuple[np.ndarray, dict[str, str]]],
    tables: tuple[Sequence[int], Sequence[int]],
    latent_side: int,
) -> dict[str, np.ndarray]:
    """The inpainting task's figures of a batch: the generated map against the ground truth
    inside the regenerated box (outside it both are void), and the known region's error."""
    box = _boxes(ev, chunk, latent_side, maps.shape[-1])
    gt, gen = np.where(box, refs, 0), np.where(box, maps, 0)
    return {
        "masked_counts": pq_lib.segmentation_counts(gt, gen, *tables)[None],
        **_iou_figures(gen, gt, *tables, prefix="masked_"),
        "mask_fraction": box.mean(axis=(1, 2)),
        "known_latent_max_abs_diff": [float(t["known_latent_max_abs_diff"]) for _, t in read],
        "known_map_max_abs_diff": [int(t["known_map_max_abs_diff"]) for _, t in read],
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
    latent_side: int = 0,
) -> dict[str, np.ndarray]:
    """Per-sample scores of the samples ``indices``.

    Args:
      ev: the ``eval`` settings.
      prompts: the prompts the samples were made for (``thing_ids``/``stuff_ids`` name the
        category tables).
      world: the synthetic world (its oracle segmenter), or None.
      samples_dir: the sample files.
      indices: which samples.
      extractor: Inception features for FID, or None.
      embedder: a ``ClipEmbedder`` for the CLIP score, or None.
      needs_map: whether the samples have generated maps.
      latent_side: the model's latent side S (the inpainting boxes are drawn there).

    Returns:
      ``{name: [n] per-sample values}`` plus ``features`` [n, 2048] for FID and, for the
      given-image and inpainting tasks, ``segmentation_counts`` / ``masked_counts``
      [1, 6, 201] (``panoptic_quality.segmentation_counts`` of this slice, summed).
    """
    batch = extractor.batch_size if extractor is not None else int(ev.inception_batch_size)
    out: dict[str, list[np.ndarray]] = {}
    add = lambda key, value: out.setdefault(key, []).append(np.asarray(value))
    text_cache: dict[str, np.ndarray] = {}
    tables = (prompts.thing_ids, prompts.stuff_ids) if needs_map else None
    for lo in tqdm.tqdm(range(0, len(indices), batch), unit="batch", desc="scoring"):
        chunk = list(indices[lo : lo + batch])
        batch_prompts = [prompts[i] for i in chunk]
        images = None
        if store.has_generated_images(ev):
            images = np.stack(
                [store.read_png(samples_dir / store.sample_name(i))[0] for i in chunk]
            )
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
        if ev.task == "given_image":
            add("segmentation_counts", pq_lib.segmentation_counts(refs, maps, *tables)[None])
            for key, value in _iou_figures(maps, refs, *tables).items():
                add(key, value)
        if ev.task == "inpaint":
            figures = _inpaint_figures(ev, chunk, maps, refs, read, tables, latent_side)
            for key, value in figures.items():
                add(key, value)
        if world is not None and images is not None:
            figures = synthetic_figures(world, captions, images, maps, refs)
            if ev.task == "inpaint":
                # Inside the box: do the regenerated things stand where the map puts them?
                box = _boxes(ev, chunk, latent_side, maps.shape[-1])
                seg = world.segment(images, maps.shape[-1])
                figures["masked_thing_iou_image"] = mcd_lib.category_iou_per_pair(
                    np.where(box, maps, world_lib.VOID_ID),
                    np.where(box, seg, world_lib.VOID_ID),
                    world_lib.THING_IDS,
                )
            for key, value in figures.items():
                if key != "mcd" or maps is None:  # a generated map's MCD is added above
                    add(key, value)
    return {k: _merge(k, v) for k, v in out.items()}


def _merge(key: str, parts: list[np.ndarray]) -> np.ndarray:
    """Per-sample values concatenated; counts summed (kept as one [1, 6, 201] row)."""
    if key.endswith("_counts"):
        return np.sum(parts, axis=0)
    return np.concatenate(parts)


def _boxes(ev: specs.EvalSpec, chunk: Sequence[int], latent_side: int, map_side: int) -> np.ndarray:
    """bool [B, M, M]: the regenerated box of each sample at the map side."""
    return np.stack(
        [
            prompts_lib.upscale_mask(
                prompts_lib.inpaint_mask(ev.seed, i, latent_side, ev.mask_fraction), map_side
            )
            for i in chunk
        ]
    )


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


# Per-sample values summarised by their maximum (an exactness check), not their mean.
MAX_KEYS = ("known_latent_max_abs_diff", "known_map_max_abs_diff")


def summarise(
    scores: dict[str, np.ndarray],
    ev: specs.EvalSpec,
    eval_dir: epath.Path,
    tables: tuple[Sequence[int], Sequence[int]] | None = None,
) -> dict[str, Any]:
    """Means of the per-sample scores, the FID of the features, the segmentation figures.

    Args:
      scores: every sample's scores (``score_samples`` of all processes).
      ev: the ``eval`` settings (``fid_stats``, ``task``).
      eval_dir: where the samples' own FID statistics are written.
      tables: ``(thing_ids, stuff_ids)``, needed when ``scores`` hold counts.

    Returns:
      ``{metric: value}``: ``segmentation_counts`` become ``miou``, ``pq``, ``sq``, ``rq``
      (and their ``_things``/``_stuff`` variants, ``panoptic_quality.segmentation_summary``),
      ``masked_counts`` become ``masked_miou`` (and its variants); ``MAX_KEYS`` are maxima.
    """
    metrics: dict[str, Any] = {}
    for key, value in scores.items():
        if key == "features":
            continue
        if key == "segmentation_counts":
            metrics.update(pq_lib.segmentation_summary(value, *tables))
        elif key == "masked_counts":
            summary = pq_lib.segmentation_summary(value, *tables, prefix="masked_")
            metrics.update({k: v for k, v in summary.items() if "miou" in k})
        elif key in MAX_KEYS:
            metrics[key] = float(np.max(value)) if np.size(value) else None
        else:
            metrics[key] = mean_over_scored(value)
    if "features" in scores:
        mu, sigma = fid.feature_statistics(scores["features"])
        with (eval_dir / f"fid_stats_{ev.task}.npz").open("wb") as f:
            fid.save_stats(f, mu, sigma)
        with epath.Path(ev.fid_stats).open("rb") as f:
            reference = fid.load_stats(f)
        metrics["fid"] = fid.frechet_distance(mu, sigma, *reference)
    return metrics
