"""Segmentation-map metrics: Mean Count Difference (paper §3.6), category IoU, agreement, recall.

MCD compares how many pixels each category covers, ignoring where: with
``f = bincount(M_gt, 201)`` and ``f' = bincount(M_gen, 201)`` over the 201 ids 0..200
(0 = void), ``MCD = Σ_c |f_c − f'_c| / (H·W)`` per pair, averaged over pairs. It lies in
[0, 2]: 0 when both maps have the same category histogram, 2 when they share no category.
Host-side numpy; maps are integer category ids ``[H, W]`` or batches ``[B, H, W]``.
"""

from collections.abc import Iterable

import numpy as np

NUM_IDS = 201  # category ids 0..200


def _as_id_maps(maps, name: str) -> np.ndarray:
    """Validates id maps and returns them as int64 ``[B, H, W]``."""
    arr = np.asarray(maps)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(
            f"{name} must hold integer category ids, got dtype {arr.dtype}; decode analog bits "
            "to ids first and cast with .astype(np.int32)."
        )
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty [H, W] or [B, H, W] map, got {arr.shape}.")
    if arr.min() < 0 or arr.max() >= NUM_IDS:
        raise ValueError(
            f"{name} has ids outside [0, {NUM_IDS - 1}] (min {arr.min()}, max {arr.max()}); "
            "map unknown or out-of-range ids to 0 (void) before scoring."
        )
    return arr.astype(np.int64)


def _as_pair(map_a, map_b, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_id_maps(map_a, names[0]), _as_id_maps(map_b, names[1])
    if a.shape != b.shape:
        raise ValueError(
            f"{names[0]} {a.shape} and {names[1]} {b.shape} differ in shape; resize label maps "
            "with nearest-neighbour sampling to a common size first."
        )
    return a, b


def category_counts(maps) -> np.ndarray:
    """Pixel count of every id, per map.

    Args:
      maps: ``[H, W]`` or ``[B, H, W]`` integer ids in [0, 200].

    Returns:
      ``[B, 201]`` int64 counts (``B = 1`` for a single map).
    """
    arr = _as_id_maps(maps, "maps")
    b = arr.shape[0]
    offsets = np.arange(b, dtype=np.int64)[:, None] * NUM_IDS  # one histogram row per map
    flat = (arr.reshape(b, -1) + offsets).ravel()
    return np.bincount(flat, minlength=b * NUM_IDS).reshape(b, NUM_IDS)


def mean_count_difference_per_pair(gt_maps, gen_maps) -> np.ndarray:
    """MCD of each (ground truth, generated) pair.

    Args:
      gt_maps: ``[H, W]`` or ``[B, H, W]`` reference ids in [0, 200].
      gen_maps: generated ids, same shape.

    Returns:
      ``[B]`` float64 values in [0, 2].
    """
    gt, gen = _as_pair(gt_maps, gen_maps, ("gt_maps", "gen_maps"))
    diff = np.abs(category_counts(gt) - category_counts(gen)).sum(axis=1)  # [B]
    return diff / float(gt.shape[1] * gt.shape[2])


def mean_count_difference(gt_maps, gen_maps) -> float:
    """MCD (paper §3.6) averaged over pairs.

    Args:
      gt_maps: ``[H, W]`` or ``[B, H, W]`` reference ids in [0, 200].
      gen_maps: generated ids, same shape.

    Returns:
      Mean MCD in [0, 2] (0 best).
    """
    return float(mean_count_difference_per_pair(gt_maps, gen_maps).mean())


def category_iou_per_pair(map_a, map_b, category_ids: Iterable[int]) -> np.ndarray:
    """Mean IoU over ``category_ids`` present in either map, per pair.

    For each pair and each id ``c`` of ``category_ids`` that covers a pixel of either map,
    ``IoU_c = |a = c ∧ b = c| / |a = c ∨ b = c|``; the pair's figure is the mean over those
    ids. Pairs where none of the ids appear get NaN (nothing to agree on), so take
    ``np.nanmean`` over pairs. With the thing ids it asks whether the things stand where
    the other map puts them, which pixel agreement hides behind the large stuff regions.

    Args:
      map_a: ``[H, W]`` or ``[B, H, W]`` ids in [0, 200].
      map_b: ids, same shape.
      category_ids: the categories to score (e.g. the things, or the stuff).

    Returns:
      ``[B]`` float64 mean IoU per pair in [0, 1], NaN where no id appears.
    """
    a, b = _as_pair(map_a, map_b, ("map_a", "map_b"))
    ids = np.asarray(sorted(set(int(c) for c in category_ids)), np.int64)  # [K]
    a_c = a.reshape(a.shape[0], 1, -1) == ids[None, :, None]  # [B, K, H·W]
    b_c = b.reshape(b.shape[0], 1, -1) == ids[None, :, None]
    inter = np.sum(a_c & b_c, axis=-1)  # [B, K]
    union = np.sum(a_c | b_c, axis=-1)
    present = union > 0
    iou = np.where(present, inter / np.maximum(union, 1), 0.0)
    count = present.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, iou.sum(axis=-1) / count, np.nan)


def pixel_agreement(map_a, map_b) -> float:
    """Share of pixels where two maps carry the same id (pixel accuracy).

    Args:
      map_a: ``[H, W]`` or ``[B, H, W]`` ids in [0, 200].
      map_b: ids, same shape.

    Returns:
      Fraction in [0, 1] over all pixels of all pairs.
    """
    a, b = _as_pair(map_a, map_b, ("map_a", "map_b"))
    return float(np.mean(a == b))


def caption_recall(pred_map, category_ids_in_caption: Iterable[int], min_pixels: int = 1) -> float:
    """Share of a caption's categories that appear in a predicted map.

    Args:
      pred_map: ``[H, W]`` ids in [0, 200].
      category_ids_in_caption: ids the caption mentions (duplicates count once).
      min_pixels: pixels a category needs in the map to count as present.

    Returns:
      Fraction in [0, 1].

    Raises:
      ValueError: if the caption names no category (recall is undefined: skip it) or an id
        outside [0, 200].
    """
    arr = np.asarray(pred_map)
    if arr.ndim != 2:
        raise ValueError(f"caption_recall scores one [H, W] map, got shape {arr.shape}.")
    wanted = np.unique(np.asarray(list(category_ids_in_caption), np.int64))
    if wanted.size == 0:
        raise ValueError("caption names no category, so recall is undefined; skip this caption.")
    if wanted.min() < 0 or wanted.max() >= NUM_IDS:
        raise ValueError(f"caption category ids must lie in [0, {NUM_IDS - 1}], got {wanted}.")
    counts = category_counts(arr)[0]  # [201]
    return float(np.mean(counts[wanted] >= min_pixels))
