"""Analog bits: exhaustive round trip, noisy decoding, and input validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdm_jax.diffusion import analog_bits


def test_round_trip_every_id():
    ids = np.arange(256, dtype=np.int32)
    bits = analog_bits.ids_to_bits(ids)
    assert bits.shape == (256, 8)
    assert set(np.unique(np.asarray(bits))) == {-1.0, 1.0}
    np.testing.assert_array_equal(analog_bits.bits_to_ids(bits), ids)


def test_msb_first_known_values():
    bits = np.asarray(analog_bits.ids_to_bits(np.array([1, 128, 200], np.int32)))
    np.testing.assert_array_equal(bits[0], [-1, -1, -1, -1, -1, -1, -1, 1])
    np.testing.assert_array_equal(bits[1], [1, -1, -1, -1, -1, -1, -1, -1])
    np.testing.assert_array_equal(bits[2], [1, 1, -1, -1, 1, -1, -1, -1])  # 200 = 0b11001000


def test_noisy_bits_decode_by_sign():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, size=(4, 16, 16)).astype(np.int32)
    bits = np.asarray(analog_bits.ids_to_bits(ids))
    # Noise that never crosses zero keeps every id; flipping one bit's sign changes the id.
    noisy = bits * rng.uniform(0.05, 3.0, size=bits.shape)
    np.testing.assert_array_equal(analog_bits.bits_to_ids(noisy), ids)
    noisy[..., 0] = -noisy[..., 0]
    np.testing.assert_array_equal(analog_bits.bits_to_ids(noisy), ids ^ 128)


def test_works_under_jit():
    ids = jnp.arange(10, dtype=jnp.int32)
    out = jax.jit(lambda i: analog_bits.bits_to_ids(analog_bits.ids_to_bits(i)))(ids)
    np.testing.assert_array_equal(out, ids)


def test_decode_map_counts_invalid_ids():
    ids = np.array([[0, 1, 5], [92, 7, 255]], np.int32)
    ids_out, num_invalid = analog_bits.decode_map(analog_bits.ids_to_bits(ids), valid_ids=[1, 92])
    np.testing.assert_array_equal(ids_out, [[0, 1, 0], [92, 0, 0]])
    assert int(num_invalid) == 3


@pytest.mark.parametrize("bad", [np.array([-1, 3]), np.array([256]), np.array([0, 300])])
def test_out_of_range_ids_raise(bad):
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        analog_bits.ids_to_bits(bad.astype(np.int32))


def test_non_integer_ids_raise():
    with pytest.raises(TypeError, match="integer"):
        analog_bits.ids_to_bits(np.array([1.0, 2.0]))


def test_wrong_bit_shapes_raise():
    with pytest.raises(ValueError, match="8 analog bits"):
        analog_bits.decode_map(np.zeros((4, 4, 7), np.float32), valid_ids=[1])
    with pytest.raises(ValueError, match="trailing bit axis"):
        analog_bits.bits_to_ids(np.float32(1.0))
