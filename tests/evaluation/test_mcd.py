"""MCD, pixel agreement and caption recall on hand-made maps and an independent loop."""

import numpy as np
import pytest

from pdm_jax.evaluation import mcd

GT = np.array([[0, 0, 1], [1, 2, 2]])  # counts: 0→2, 1→2, 2→2
GEN = np.array([[0, 0, 1], [1, 1, 5]])  # counts: 0→2, 1→3, 5→1


def test_identical_maps_score_zero():
    assert mcd.mean_count_difference(GT, GT) == 0.0
    # Location is ignored: any pixel permutation keeps the histogram.
    shuffled = np.random.default_rng(0).permutation(GT.ravel()).reshape(GT.shape)
    assert mcd.mean_count_difference(GT, shuffled) == 0.0


def test_disjoint_categories_score_two():
    gt = np.full((4, 5), 7)
    gen = np.zeros((4, 5), np.int32)
    gen[:, 2:] = 200
    assert mcd.mean_count_difference(gt, gen) == 2.0


def test_hand_computed_mixed_case():
    # |2-2| + |2-3| + |2-0| + |0-1| = 4 differing counts over 6 pixels.
    assert mcd.mean_count_difference(GT, GEN) == pytest.approx(4 / 6)
    np.testing.assert_array_equal(mcd.category_counts(GEN)[0, [0, 1, 5]], [2, 3, 1])


def test_batched_pairs_average():
    gt = np.stack([GT, GT, np.full((2, 3), 3)])
    gen = np.stack([GT, GEN, np.full((2, 3), 4)])
    per_pair = mcd.mean_count_difference_per_pair(gt, gen)
    np.testing.assert_allclose(per_pair, [0.0, 4 / 6, 2.0])
    assert mcd.mean_count_difference(gt, gen) == pytest.approx((4 / 6 + 2.0) / 3)


def test_matches_independent_loop():
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 201, (5, 16, 12), dtype=np.uint8)
    gen = rng.integers(0, 30, (5, 16, 12), dtype=np.int64)
    want = [
        np.abs(np.bincount(a.ravel(), minlength=201) - np.bincount(b.ravel(), minlength=201)).sum()
        / a.size
        for a, b in zip(gt, gen, strict=True)
    ]
    np.testing.assert_allclose(mcd.mean_count_difference_per_pair(gt, gen), want, rtol=1e-12)


def test_invalid_maps_raise():
    with pytest.raises(ValueError, match=r"outside \[0, 200\]"):
        mcd.mean_count_difference(GT, GEN + 200)
    with pytest.raises(ValueError, match=r"outside \[0, 200\]"):
        mcd.mean_count_difference(GT - 1, GEN)
    with pytest.raises(TypeError, match="integer category ids"):
        mcd.mean_count_difference(GT.astype(np.float32), GEN)
    with pytest.raises(ValueError, match="differ in shape"):
        mcd.mean_count_difference(GT, GEN[:, :2])


def test_pixel_agreement():
    assert mcd.pixel_agreement(GT, GEN) == pytest.approx(4 / 6)  # two pixels differ
    assert mcd.pixel_agreement(np.stack([GT, GT]), np.stack([GT, GEN])) == pytest.approx(10 / 12)
    assert mcd.pixel_agreement(GT, GT) == 1.0


def test_caption_recall():
    assert mcd.caption_recall(GT, [1, 2, 7, 7]) == pytest.approx(2 / 3)  # 7 is absent
    assert mcd.caption_recall(GT, [2]) == 1.0
    assert mcd.caption_recall(GT, [1, 2], min_pixels=3) == 0.0  # each covers only 2 pixels
    with pytest.raises(ValueError, match="no category"):
        mcd.caption_recall(GT, [])
    with pytest.raises(ValueError, match=r"\[0, 200\]"):
        mcd.caption_recall(GT, [201])


def test_category_iou_by_hand_and_against_a_loop():
    # GT/GEN ids 1: inter 2 ({(0,2),(1,0)}), union 3 → 2/3; id 2: inter 0, union 2 → 0;
    # id 5: inter 0, union 1 → 0; id 7 appears in neither and is not counted.
    np.testing.assert_allclose(mcd.category_iou_per_pair(GT, GEN, [1, 2, 5, 7]), [2 / 9])
    np.testing.assert_allclose(mcd.category_iou_per_pair(GT, GEN, [1]), [2 / 3])
    assert np.isnan(mcd.category_iou_per_pair(GT, GEN, [7, 9])[0])  # nothing to score
    np.testing.assert_array_equal(mcd.category_iou_per_pair(GEN, GEN, [1, 5]), [1.0])
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 6, (5, 7, 7)), rng.integers(0, 6, (5, 7, 7))
    ids = [1, 3, 4]
    want = []
    for x, y in zip(a, b, strict=True):
        ious = [
            np.sum((x == c) & (y == c)) / np.sum((x == c) | (y == c))
            for c in ids
            if np.any((x == c) | (y == c))
        ]
        want.append(np.mean(ious) if ious else np.nan)
    np.testing.assert_allclose(mcd.category_iou_per_pair(a, b, ids), want)
