"""Analog bits: category ids <-> ±1 bit planes (paper §3.2, Chen et al. 2023).

An id in [0, 2**num_bits) becomes ``num_bits`` values in {-1, +1}, most significant bit
first, on the last axis. Decoding thresholds at 0. Works on numpy and jax arrays; range
checks run whenever the ids are concrete (not under ``jit``).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

NUM_BITS = 8


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def ids_to_bits(ids, num_bits: int = NUM_BITS, dtype=jnp.float32) -> jax.Array:
    """Encodes integer category ids as analog bits.

    Args:
      ids: integer array of any shape ``[...]`` with values in ``[0, 2**num_bits)``.
      num_bits: bits per id (8 covers COCO panoptic ids 0..200).
      dtype: float dtype of the result.

    Returns:
      ``[..., num_bits]`` array in {-1, +1}, most significant bit first.

    Raises:
      TypeError: if ``ids`` is not an integer array.
      ValueError: if a (concrete) id lies outside ``[0, 2**num_bits)``.
    """
    ids_dtype = np.asarray(ids).dtype if _is_concrete(ids) else ids.dtype
    if not jnp.issubdtype(ids_dtype, jnp.integer):
        raise TypeError(
            f"ids_to_bits expects integer category ids, got dtype {ids_dtype}; "
            "cast label maps with .astype(np.int32) (never interpolate ids)."
        )
    if _is_concrete(ids):
        arr = np.asarray(ids)
        if arr.size and (arr.min() < 0 or arr.max() >= 2**num_bits):
            raise ValueError(
                f"ids must lie in [0, {2**num_bits - 1}] for {num_bits} analog bits; got "
                f"min {arr.min()}, max {arr.max()}. Map unknown ids to 0 (void) first."
            )
    ids = jnp.asarray(ids, jnp.int32)
    shifts = jnp.arange(num_bits - 1, -1, -1, dtype=jnp.int32)  # MSB first
    bits = (ids[..., None] >> shifts) & 1
    return (bits * 2 - 1).astype(dtype)


def bits_to_ids(bits) -> jax.Array:
    """Decodes analog bits (any real values) to ids by thresholding at 0.

    Args:
      bits: ``[..., num_bits]`` float array, most significant bit first.

    Returns:
      ``[...]`` int32 ids.
    """
    if jnp.ndim(bits) < 1 or jnp.shape(bits)[-1] < 1:
        raise ValueError(f"bits must have a trailing bit axis, got shape {jnp.shape(bits)}.")
    if not jnp.issubdtype(jnp.result_type(bits), jnp.floating):
        raise TypeError(f"bits must be a float array, got dtype {jnp.result_type(bits)}.")
    num_bits = jnp.shape(bits)[-1]
    weights = 2 ** jnp.arange(num_bits - 1, -1, -1, dtype=jnp.int32)
    return jnp.sum((jnp.asarray(bits) > 0).astype(jnp.int32) * weights, axis=-1)


def decode_map(bits, valid_ids: Sequence[int] | np.ndarray, num_bits: int = NUM_BITS):
    """Decodes analog bits to ids, reporting ids outside the category table as void.

    Args:
      bits: ``[..., num_bits]`` analog bits.
      valid_ids: the category table's ids (void = 0 is always valid).
      num_bits: expected size of the trailing axis.

    Returns:
      ``(ids, num_invalid)``: int32 ids ``[...]`` with invalid ones set to 0, and the
      number of pixels that decoded to an id outside the table.
    """
    if jnp.shape(bits)[-1] != num_bits:
        raise ValueError(
            f"Expected {num_bits} analog bits on the last axis, got shape {jnp.shape(bits)}."
        )
    ids = bits_to_ids(bits)
    table = np.zeros(2**num_bits, dtype=bool)
    table[0] = True
    table[np.asarray(valid_ids, dtype=np.int64)] = True
    valid = jnp.asarray(table)[ids]
    return jnp.where(valid, ids, 0), jnp.sum(~valid)
