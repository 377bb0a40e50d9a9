"""Nearest resizing and pooling of label maps on hand-made examples."""

import numpy as np
import pytest

from pdm_jax.diffusion import maps

M = np.array(
    [
        [1, 1, 5, 0],
        [2, 1, 0, 0],
        [3, 3, 7, 7],
        [3, 0, 9, 9],
    ],
    np.int32,
)


def test_min_pooling_lets_smaller_ids_and_void_win():
    np.testing.assert_array_equal(maps.pool_map(M, 2, "min"), [[1, 0], [0, 7]])


def test_min_nonvoid_pooling():
    np.testing.assert_array_equal(maps.pool_map(M, 2, "min_nonvoid"), [[1, 5], [3, 7]])
    all_void = np.zeros((4, 4), np.int32)
    np.testing.assert_array_equal(maps.pool_map(all_void, 2, "min_nonvoid"), np.zeros((2, 2)))


def test_mode_pooling_breaks_ties_to_smaller_id():
    # cells: [1,1,2,1] -> 1; [5,0,0,0] -> 0; [3,3,3,0] -> 3; [7,7,9,9] -> 7 (tie)
    np.testing.assert_array_equal(maps.pool_map(M, 2, "mode"), [[1, 0], [3, 7]])


def test_pooling_batched_and_identity():
    batch = np.stack([M, M[::-1]])
    out = maps.pool_map(batch, 2, "min")
    np.testing.assert_array_equal(out[0], maps.pool_map(M, 2, "min"))
    np.testing.assert_array_equal(out[1], maps.pool_map(M[::-1], 2, "min"))
    np.testing.assert_array_equal(maps.pool_map(M, 4, "mode"), M)


def test_resize_nearest_never_invents_ids():
    rng = np.random.default_rng(0)
    ids = rng.choice([0, 3, 92, 200], size=(37, 53)).astype(np.int32)
    for size in [(16, 16), (64, 100), (37, 53)]:
        out = maps.resize_nearest(ids, size)
        assert out.shape == size
        assert set(np.unique(out)) <= {0, 3, 92, 200}
    np.testing.assert_array_equal(maps.resize_nearest(ids, (37, 53)), ids)
    # Upsampling by 2 repeats every pixel twice.
    np.testing.assert_array_equal(maps.resize_nearest(M, 8), M.repeat(2, 0).repeat(2, 1))


def test_map_to_resolution_pools_when_divisible():
    np.testing.assert_array_equal(maps.map_to_resolution(M, 2), maps.pool_map(M, 2))
    odd = np.ones((10, 10), np.int32)
    assert maps.map_to_resolution(odd, 4).shape == (4, 4)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="multiples"):
        maps.pool_map(M, 3)
    with pytest.raises(ValueError, match="Unknown map pooling"):
        maps.pool_map(M, 2, "max")
    with pytest.raises(TypeError, match="integer ids"):
        maps.pool_map(M.astype(np.float32), 2)
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        maps.pool_map(M[None, None], 2)
