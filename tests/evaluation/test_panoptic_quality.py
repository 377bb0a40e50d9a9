"""PQ and mIoU of category maps: hand-computed cases, scipy's component labelling, and
torchmetrics' ``PanopticQuality`` (the ``torch`` extra) on hand-made and random maps."""

import numpy as np
import pytest
from scipy import ndimage

from pdm_jax.evaluation import panoptic_quality as pq_lib

THINGS, STUFF = (1, 2, 3), (92, 93)


def _square(shape=(8, 8), stuff=92, thing=1, rows=(2, 6), cols=(2, 6)) -> np.ndarray:
    m = np.full(shape, stuff, np.int64)
    m[rows[0] : rows[1], cols[0] : cols[1]] = thing
    return m


def _summary(gt, pred, connectivity=8):
    counts = pq_lib.segmentation_counts(gt, pred, THINGS, STUFF, connectivity)
    return counts, pq_lib.segmentation_summary(counts, THINGS, STUFF)


def test_identical_maps_score_one():
    gt = np.stack([_square(), _square(thing=2, stuff=93, cols=(0, 3))])
    gt[0, 0, 0] = 0  # void pixels in both maps change nothing
    _, s = _summary(gt, gt)
    for key in ("pq", "sq", "rq", "pq_things", "pq_stuff", "miou", "miou_things", "miou_stuff"):
        assert s[key] == 1.0, key
    assert s["pq_categories"] == 4


def test_a_thing_shifted_by_one_column_is_matched_with_its_iou():
    # Thing: 16 px each, 12 shared, union 20 → IoU 0.6 > 0.5 (TP). Stuff: 48 px each,
    # 44 shared, union 52.
    counts, s = _summary(_square(), _square(cols=(3, 7)))
    tp, fp, fn, iou_sum, inter, union = counts
    assert (tp[1], fp[1], fn[1], tp[92]) == (1, 0, 0, 1)
    np.testing.assert_allclose([iou_sum[1], iou_sum[92]], [0.6, 44 / 52])
    np.testing.assert_allclose([inter[1], union[1], inter[92], union[92]], [12, 20, 44, 52])
    np.testing.assert_allclose(s["pq_things"], 0.6)
    np.testing.assert_allclose(s["pq_stuff"], 44 / 52)
    np.testing.assert_allclose(s["pq"], (0.6 + 44 / 52) / 2)
    np.testing.assert_allclose(s["miou"], (0.6 + 44 / 52) / 2)
    assert s["rq"] == 1.0


def test_a_thing_shifted_by_two_columns_is_a_false_positive_and_negative():
    # IoU 8/24 ≤ 0.5: no match; RQ = 0 / (0 + ½ + ½), so PQ 0; the stuff matches at 40/56.
    counts, s = _summary(_square(), _square(cols=(4, 8)))
    assert (counts[0, 1], counts[1, 1], counts[2, 1]) == (0, 1, 1)
    assert s["pq_things"] == 0.0 and s["sq_things"] == 0.0 and s["rq_things"] == 0.0
    np.testing.assert_allclose(s["pq_stuff"], 40 / 56)
    np.testing.assert_allclose(s["miou_things"], 8 / 24)


def test_void_in_the_ground_truth_leaves_the_union_and_excuses_false_positives():
    gt = _square()
    gt[2:6, 6:8] = 0  # void right of the thing
    gt[0, 0:3] = 0  # void where the prediction puts a second thing
    pred = _square(cols=(3, 8))  # 20 px: 12 on the thing, 8 on void
    pred[0, 0:3] = 2  # all on void: not a false positive
    pred[7, 0:2] = 3  # on stuff: a false positive
    counts, s = _summary(gt, pred)
    # Union 16 + 20 − 12 − 8 = 16 → IoU 0.75 (12/24 = 0.5 without the void rule: no match).
    np.testing.assert_allclose(counts[3, 1], 0.75)
    assert (counts[0, 1], counts[1, 2], counts[1, 3]) == (1, 0, 1)
    assert s["pq_categories"] == 3  # things 1 and 3, stuff 92; thing 2 has no TP/FP/FN


def test_void_in_the_prediction_counts_against_it_as_in_panopticapi():
    # Half the thing predicted void: pred segment 8 px, union 16 + 8 − 8 = 16 → IoU 0.5, no
    # match (torchmetrics would leave the 8 void-predicted pixels out: IoU 1).
    pred = _square()
    pred[2:6, 4:6] = 0
    counts, s = _summary(_square(), pred)
    assert (counts[0, 1], counts[1, 1], counts[2, 1]) == (0, 1, 1)
    np.testing.assert_allclose(s["miou_things"], 0.5)  # 8 / 16: void is a wrong pixel


def test_things_are_connected_components_and_stuff_is_one_segment_per_map():
    m = np.full((6, 6), 92)
    m[0, 0] = m[1, 1] = 1  # touch at a corner only
    m[4:, 4:] = 1
    m[5, 0] = 93
    m[0, 5] = 93  # stuff 93 in two places: one segment
    labels8 = pq_lib.segment_labels(m, THINGS, STUFF, connectivity=8)[0]
    labels4 = pq_lib.segment_labels(m, THINGS, STUFF, connectivity=4)[0]
    assert len(np.unique(labels8[m == 1])) == 2 and len(np.unique(labels4[m == 1])) == 3
    assert len(np.unique(labels8[m == 93])) == 1 and len(np.unique(labels8)) == 4
    # Segments never span two maps of a batch.
    both = pq_lib.segment_labels(np.stack([m, m]), THINGS, STUFF)
    assert not set(np.unique(both[0])) & set(np.unique(both[1]))
    with pytest.raises(ValueError, match="connectivity"):
        pq_lib.segment_labels(m, THINGS, STUFF, connectivity=6)


def test_thing_components_equal_scipy_labelling_on_random_maps():
    rng = np.random.default_rng(0)
    maps = rng.choice([0, 1, 2, 92], size=(5, 16, 16), p=[0.1, 0.35, 0.35, 0.2])
    for connectivity, structure in ((4, None), (8, np.ones((3, 3)))):
        labels = pq_lib.segment_labels(maps, THINGS, STUFF, connectivity)
        assert np.all((labels < 0) == (maps == 0))
        for b in range(len(maps)):
            for c in (1, 2):
                ref, n = ndimage.label(maps[b] == c, structure=structure)
                ours = labels[b][maps[b] == c]
                assert len(np.unique(ours)) == n
                # Same partition: each reference component maps to one label and back.
                pairs = set(zip(ref[maps[b] == c].tolist(), ours.tolist(), strict=True))
                assert len(pairs) == n


def test_miou_accumulates_over_the_set():
    # Category 1: 4/4 right in the first map, 0/12 in the second: 4/16 over the set (a
    # per-map mean would give 0.5).
    gt = np.full((2, 4, 4), 92)
    gt[0, :1, :] = 1
    gt[1, 1:, :] = 1
    pred = np.where(np.arange(2)[:, None, None] == 0, gt, 92)
    s = _summary(gt, pred)[1]
    np.testing.assert_allclose(s["miou_things"], 4 / 16)
    np.testing.assert_allclose(s["miou_stuff"], 16 / 28)


def test_counts_add_over_batches():
    rng = np.random.default_rng(1)
    gt = rng.choice([0, 1, 2, 92, 93], size=(6, 8, 8))
    pred = rng.choice([1, 2, 92, 93], size=(6, 8, 8))
    whole = pq_lib.segmentation_counts(gt, pred, THINGS, STUFF)
    parts = sum(
        pq_lib.segmentation_counts(gt[i : i + 2], pred[i : i + 2], THINGS, STUFF) for i in (0, 2, 4)
    )
    np.testing.assert_allclose(whole, parts)


def _with_instances(maps: np.ndarray) -> np.ndarray:
    """[B, H, W] ids → [B, H, W, 2] (category, instance = its 8-connected component)."""
    out = np.zeros((*maps.shape, 2), np.int64)
    out[..., 0] = maps
    for b in range(len(maps)):
        for c in THINGS:
            out[b, ..., 1] += ndimage.label(maps[b] == c, structure=np.ones((3, 3)))[0]
    return out


def _torchmetrics(gt: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    import torch
    from torchmetrics.detection import PanopticQuality

    out = {}
    for suffix in ("", "_things", "_stuff"):
        metric = PanopticQuality(
            things=set(THINGS),
            stuffs=set(STUFF),
            allow_unknown_preds_category=True,
            return_sq_and_rq=True,
            return_per_class=True,
        )
        per_class = metric(
            torch.tensor(_with_instances(pred)), torch.tensor(_with_instances(gt))
        ).numpy()  # [classes: things then stuff, sorted; 3 (pq, sq, rq)]
        tp, fp, fn = (
            getattr(metric, k).numpy()
            for k in ("true_positives", "false_positives", "false_negatives")
        )
        scored = (tp + fp + fn) > 0
        keep = {
            "": scored,
            "_things": scored & (np.arange(5) < 3),
            "_stuff": scored & (np.arange(5) >= 3),
        }[suffix]
        for row, name in enumerate(("pq", "sq", "rq")):
            out[f"{name}{suffix}"] = float(per_class[keep, row].mean()) if keep.any() else None
    return out


@pytest.mark.torch
def test_pq_equals_torchmetrics_on_hand_made_maps():
    gt = np.stack([_square(), _square(), _square(thing=2, stuff=93)])
    gt[1, 2:6, 6:8] = 0
    pred = np.stack([_square(cols=(3, 7)), _square(cols=(3, 8)), _square(thing=3, stuff=93)])
    pred[0, 7, 0:2] = 2
    ours = _summary(gt, pred)[1]
    for key, value in _torchmetrics(gt, pred).items():
        np.testing.assert_allclose(
            ours[key], value, rtol=1e-6, err_msg=key
        )  # torchmetrics: float32 IoUs


@pytest.mark.torch
def test_pq_equals_torchmetrics_on_random_maps():
    rng = np.random.default_rng(2)
    ids = np.array([0, 1, 2, 3, 92, 93])
    for _ in range(5):
        # Blocky ground truth with void; the prediction flips 15 % of the pixels to other
        # table ids (never void: there the two definitions differ, see the module).
        gt = np.kron(
            rng.choice(ids, size=(4, 5, 5), p=[0.1, 0.2, 0.2, 0.1, 0.2, 0.2]),
            np.ones((1, 3, 3), int),
        )
        pred = np.where(gt == 0, rng.choice(ids[1:], size=gt.shape), gt)
        flip = rng.random(gt.shape) < 0.15
        pred[flip] = rng.choice(ids[1:], size=int(flip.sum()))
        ours = _summary(gt, pred)[1]
        for key, value in _torchmetrics(gt, pred).items():
            np.testing.assert_allclose(
                ours[key], value, rtol=1e-6, err_msg=key
            )  # torchmetrics: float32 IoUs
