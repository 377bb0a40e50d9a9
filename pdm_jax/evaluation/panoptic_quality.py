"""Segmentation metrics of category maps: mIoU and panoptic quality (PQ) as panopticapi defines it.

PDM's maps carry one category id per pixel and no instance ids (the paper drops them), so
the segments PQ matches are derived from the maps:

* a **thing** category's segments are its connected components (``connectivity`` 8 by
  default: pixels touching at an edge or a corner belong together; min-pooled maps at
  32–128 px leave diagonal steps inside one object, which 4-connectivity would split into
  several segments, each an extra false positive or negative; two objects of one category
  that touch become one segment either way);
* a **stuff** category is one segment per map (all its pixels, connected or not), as in
  COCO panoptic's ground truth and in torchmetrics' ``PanopticQuality``.

Id 0 (void) and ids outside the given thing/stuff tables belong to no segment.

**PQ** (Kirillov et al. 2019; ``panopticapi.evaluation.pq_compute``): per map, a ground-truth
and a predicted segment of one category match when ``IoU > 0.5`` (matches are then unique),
where the union leaves out the predicted segment's pixels that are void in the ground truth
(``|g| + |p| − |g ∩ p| − |p ∩ void_gt|``). Unmatched ground-truth segments are false
negatives; unmatched predicted segments are false positives unless more than half of their
pixels are void in the ground truth. Per category, over all maps: ``SQ = Σ IoU / TP``,
``RQ = TP / (TP + ½FP + ½FN)``, ``PQ = SQ · RQ``; ``pq``, ``sq`` and ``rq`` are the means over
the categories with ``TP + FP + FN > 0`` (all, things, stuff). Crowd: panopticapi skips
crowd ground-truth segments and does not count a prediction as a false positive when it
lies mostly on void or on a crowd region of its category. Category maps have no crowd flag
(COCO's crowd regions were written with their category when the data was prepared), so
every segment here is a non-crowd segment and only the void rule applies.

Differences from torchmetrics' ``PanopticQuality``: it also leaves the ground-truth
segment's pixels that are void in the *prediction* out of the union, and does not count a
ground-truth segment that is mostly void in the prediction as a false negative. With
predictions free of void both agree (the tests check that); panopticapi's rule, used here,
charges a map for its void (undecodable) pixels.

**mIoU**: over all maps, per category ``c``: ``I_c = |gt = c ∧ pred = c|`` and ``U_c = |gt =
c| + |pred = c ∧ gt ≠ void| − I_c`` (pixels void in the ground truth are ignored), then the
mean of ``I_c / U_c`` over the categories with ``U_c > 0``.

Everything is host-side numpy, vectorised over a batch of maps: connected components of a
whole batch are one ``scipy.sparse.csgraph.connected_components`` call, counts are
``bincount``\\ s. :func:`segmentation_counts` gives additive counts (sum them over batches
and processes); :func:`segmentation_summary` turns them into the figures.
"""

from collections.abc import Iterable

import numpy as np
from scipy import sparse
from scipy.sparse import csgraph

from pdm_jax.evaluation.mcd import NUM_IDS, _as_id_maps, _as_pair

# Rows of the counts array of segmentation_counts.
COUNT_ROWS = ("tp", "fp", "fn", "iou_sum", "intersection", "union")
MATCH_IOU = 0.5


def _ids(category_ids: Iterable[int], name: str) -> np.ndarray:
    ids = np.unique(np.asarray([int(c) for c in category_ids], np.int64))
    if ids.size and (ids.min() < 1 or ids.max() >= NUM_IDS):
        raise ValueError(f"{name} must be category ids in [1, {NUM_IDS - 1}], got {ids.tolist()}.")
    return ids


def segment_labels(
    maps, thing_ids: Iterable[int], stuff_ids: Iterable[int], connectivity: int = 8
) -> np.ndarray:
    """The panoptic segments of category maps (module docstring).

    Args:
      maps: ``[H, W]`` or ``[B, H, W]`` category ids in [0, 200].
      thing_ids: the thing categories (segments: connected components).
      stuff_ids: the stuff categories (segments: all pixels of the category in a map).
      connectivity: 8 (edges and corners) or 4 (edges only) for things.

    Returns:
      int64 ``[B, H, W]`` segment labels ``0..K−1``, unique over the whole batch; −1 where
      the id is void or in neither table.

    Raises:
      ValueError: for a connectivity other than 4 or 8, or ids outside [0, 200].
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}.")
    arr = _as_id_maps(maps, "maps")
    b, h, w = arr.shape
    things, stuff = _ids(thing_ids, "thing_ids"), _ids(stuff_ids, "stuff_ids")
    if np.intersect1d(things, stuff).size:
        raise ValueError(f"thing_ids and stuff_ids overlap: {np.intersect1d(things, stuff)}.")
    is_thing = np.isin(arr, things)
    index = np.arange(arr.size, dtype=np.int64).reshape(arr.shape)
    offsets = [(0, 1), (1, 0)] + ([(1, 1), (1, -1)] if connectivity == 8 else [])
    src, dst = [], []
    for dy, dx in offsets:  # each neighbour pair once
        xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
        a = (slice(None), slice(0, h - dy), xs)
        c = (slice(None), slice(dy, h), xd)
        link = is_thing[a] & (arr[a] == arr[c])
        src.append(index[a][link])
        dst.append(index[c][link])
    src, dst = np.concatenate(src), np.concatenate(dst)
    graph = sparse.coo_matrix((np.ones(src.size, np.int8), (src, dst)), shape=(arr.size,) * 2)
    _, component = csgraph.connected_components(graph, directed=False)
    image = np.arange(b, dtype=np.int64)[:, None, None]
    key = np.where(is_thing, component.reshape(arr.shape), arr.size + image * NUM_IDS + arr)
    key = np.where(is_thing | np.isin(arr, stuff), key, -1)
    labelled = key >= 0
    out = np.full(arr.shape, -1, np.int64)
    out[labelled] = np.unique(key[labelled], return_inverse=True)[1].reshape(-1)
    return out


def _segments(labels: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Category and area of each segment label ``0..K−1``."""
    on = labels >= 0
    k = int(labels.max()) + 1 if on.any() else 0
    area = np.bincount(labels[on], minlength=k)
    category = np.zeros(k, np.int64)
    category[labels[on]] = ids[on]
    return category, area


def segmentation_counts(
    gt_maps,
    pred_maps,
    thing_ids: Iterable[int],
    stuff_ids: Iterable[int],
    connectivity: int = 8,
) -> np.ndarray:
    """Additive PQ and IoU counts of (ground truth, prediction) map pairs.

    Args:
      gt_maps: ``[H, W]`` or ``[B, H, W]`` ground-truth ids in [0, 200] (0 = void).
      pred_maps: predicted ids, same shape.
      thing_ids, stuff_ids: the category tables (others count as void).
      connectivity: thing segments' connectivity (4 or 8).

    Returns:
      float64 ``[6, 201]``: per category id, the rows ``COUNT_ROWS`` (TP, FP, FN, sum of the
      matched IoUs, pixel intersection and union). Sum them over batches, then call
      :func:`segmentation_summary`.
    """
    gt, pred = _as_pair(gt_maps, pred_maps, ("gt_maps", "pred_maps"))
    table = np.union1d(_ids(thing_ids, "thing_ids"), _ids(stuff_ids, "stuff_ids"))
    g = segment_labels(gt, thing_ids, stuff_ids, connectivity).reshape(-1)
    p = segment_labels(pred, thing_ids, stuff_ids, connectivity).reshape(-1)
    gt, pred = gt.reshape(-1), pred.reshape(-1)
    g_cat, g_area = _segments(g, gt)
    p_cat, p_area = _segments(p, pred)
    n_g, n_p = len(g_area), len(p_area)
    on_void = (g < 0) & (p >= 0)  # predicted pixels that are void in the ground truth
    p_void = np.bincount(p[on_void], minlength=n_p)
    both = (g >= 0) & (p >= 0)
    pair, inter = np.unique(g[both] * max(n_p, 1) + p[both], return_counts=True)
    gi, pi = np.divmod(pair, max(n_p, 1))
    union = g_area[gi] + p_area[pi] - inter - p_void[pi]
    iou = inter / np.maximum(union, 1)
    match = (g_cat[gi] == p_cat[pi]) & (iou > MATCH_IOU)
    g_hit, p_hit = np.zeros(n_g, bool), np.zeros(n_p, bool)
    g_hit[gi[match]], p_hit[pi[match]] = True, True
    unmatched_p = ~p_hit & (p_void <= MATCH_IOU * p_area)
    count = lambda ids, weights=None: np.bincount(ids, weights, minlength=NUM_IDS)[:NUM_IDS]
    # Pixel IoU per category, void ground truth ignored; predicted ids outside the table
    # are errors on the ground truth's category only.
    valid_gt = np.isin(gt, table)
    hits = valid_gt & (gt == pred)
    pred_in = valid_gt & np.isin(pred, table)
    pix_inter = count(gt[hits])
    pix_union = count(gt[valid_gt]) + count(pred[pred_in]) - pix_inter
    return np.stack(
        [
            count(g_cat[gi[match]]),
            count(p_cat[unmatched_p]),
            count(g_cat[~g_hit]),
            count(g_cat[gi[match]], iou[match]),
            pix_inter,
            pix_union,
        ]
    ).astype(np.float64)


def segmentation_summary(
    counts: np.ndarray, thing_ids: Iterable[int], stuff_ids: Iterable[int], prefix: str = ""
) -> dict[str, float | None]:
    """mIoU and PQ/SQ/RQ (all, things, stuff) from summed :func:`segmentation_counts`.

    Args:
      counts: ``[6, 201]`` (or ``[..., 6, 201]``, summed over the leading axes).
      thing_ids, stuff_ids: the category tables.
      prefix: put before every key (e.g. ``"masked_"``).

    Returns:
      ``miou``, ``miou_things``, ``miou_stuff`` (means over the categories with a non-empty
      union), ``pq``, ``sq``, ``rq`` and their ``_things`` / ``_stuff`` variants (means over
      the categories with ``TP + FP + FN > 0``), and ``pq_categories``, the number of
      categories PQ averages over. None where no category qualifies.
    """
    c = np.asarray(counts, np.float64)
    c = c.reshape(-1, len(COUNT_ROWS), NUM_IDS).sum(axis=0)
    tp, fp, fn, iou_sum, inter, union = c
    with np.errstate(invalid="ignore", divide="ignore"):
        sq = np.where(tp > 0, iou_sum / tp, 0.0)
        denominator = tp + 0.5 * fp + 0.5 * fn
        rq = np.where(denominator > 0, tp / denominator, 0.0)
        iou = np.where(union > 0, inter / union, 0.0)
    pq = sq * rq
    things, stuff = _ids(thing_ids, "thing_ids"), _ids(stuff_ids, "stuff_ids")
    out: dict[str, float | None] = {}
    mean = lambda values, keep: float(np.mean(values[keep])) if keep.any() else None
    for suffix, ids in (("", np.union1d(things, stuff)), ("_things", things), ("_stuff", stuff)):
        chosen = np.zeros(NUM_IDS, bool)
        chosen[ids] = True
        out[f"miou{suffix}"] = mean(iou, chosen & (union > 0))
        scored = chosen & (denominator > 0)
        for name, values in (("pq", pq), ("sq", sq), ("rq", rq)):
            out[f"{name}{suffix}"] = mean(values, scored)
        if not suffix:
            out["pq_categories"] = int(scored.sum())
    return {f"{prefix}{k}": v for k, v in out.items()}
