"""CLIP score: hand cases and a direct numpy computation."""

import numpy as np
import pytest

from pdm_jax.evaluation import clip_score as cs


def test_hand_cases():
    e0, e1 = np.eye(3)[0], np.eye(3)[1]
    assert cs.clip_score(e0[None], e0[None, None]) == pytest.approx(100.0)  # cos = 1
    assert cs.clip_score(e0[None], e1[None, None]) == pytest.approx(0.0)  # orthogonal
    assert cs.clip_score(e0[None], -e0[None, None]) == pytest.approx(-100.0)  # no clamp
    # Scale does not matter; 45 degrees gives 100 / sqrt(2).
    assert cs.clip_score(3 * e0[None], (e0 + e1)[None]) == pytest.approx(100 / np.sqrt(2))


def test_matches_direct_computation():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(4, 8)).astype(np.float32)
    txt = rng.normal(size=(4, 5, 8)).astype(np.float32)
    per_image = cs.clip_scores_per_image(img, txt)
    for n in range(4):
        cosines = [
            img[n].astype(np.float64)
            @ txt[n, k]
            / np.linalg.norm(img[n].astype(np.float64))
            / np.linalg.norm(txt[n, k].astype(np.float64))
            for k in range(5)
        ]
        assert per_image[n] == pytest.approx(100 * np.mean(cosines), rel=1e-12)
    # Equal caption counts: the mean over images equals the official mean over all pairs.
    assert cs.clip_score(img, txt) == pytest.approx(per_image.mean())


def test_mask_averages_per_image_then_over_images():
    e = np.eye(2)
    img = np.stack([e[0], e[0]])  # [2, 2]
    txt = np.stack([[e[0], e[1], -e[0]], [e[0], e[0], e[0]]])  # [2, 3, 2]
    mask = np.array([[True, True, False], [True, False, False]])
    np.testing.assert_allclose(cs.clip_scores_per_image(img, txt, mask), [50.0, 100.0])
    assert cs.clip_score(img, txt, mask) == pytest.approx(75.0)  # not 200/3 over pairs
    txt[0, 2] = 0.0  # a zero padding slot is never normalised
    assert cs.clip_score(img, txt, mask) == pytest.approx(75.0)


def test_invalid_inputs_raise():
    img, txt = np.ones((2, 4)), np.ones((2, 3, 4))
    with pytest.raises(ValueError, match="no caption"):
        cs.clip_score(img, txt, np.array([[True, False, False], [False, False, False]]))
    with pytest.raises(ValueError, match=r"\[N, K, E\]"):
        cs.clip_score(img, np.ones((3, 3, 4)))
    with pytest.raises(ValueError, match="zero or non-finite"):
        cs.clip_score(np.zeros((2, 4)), txt)
