"""Label-map resizing and pooling (DESIGN §1).

Category ids are labels, not intensities: maps are only ever resized with *nearest*
sampling and reduced with order statistics. Pooling to the model's map resolution
(``map_patch_factor × latent side``) defaults to the paper's *min* pooling, so that the
smaller ids (things, < 92) win over stuff inside a cell. All functions are numpy (they run
in the input pipeline) and accept ``[H, W]`` or ``[B, H, W]`` maps.
"""

import numpy as np

POOLINGS = ("min", "min_nonvoid", "mode")


def _check_map(ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim not in (2, 3):
        raise ValueError(f"Label maps must be [H, W] or [B, H, W], got shape {ids.shape}.")
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"Label maps must hold integer ids, got dtype {ids.dtype}.")
    return ids


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source index of each output pixel for centre-aligned nearest resizing."""
    return np.minimum(
        ((np.arange(out_size) + 0.5) * in_size / out_size).astype(np.int64), in_size - 1
    )


def resize_nearest(ids: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resizes a label map with nearest sampling (no new ids are ever invented).

    Args:
      ids: ``[H, W]`` or ``[B, H, W]`` integer map.
      size: output side, or ``(height, width)``.

    Returns:
      The resized map with the same dtype.
    """
    ids = _check_map(ids)
    h, w = (size, size) if isinstance(size, int) else size
    rows = nearest_indices(ids.shape[-2], h)
    cols = nearest_indices(ids.shape[-1], w)
    return ids[..., rows[:, None], cols[None, :]]


def check_pooling(method: str) -> None:
    """Raises ValueError unless ``method`` is one of ``POOLINGS``."""
    if method not in POOLINGS:
        raise ValueError(f"Unknown map pooling {method!r}; choose one of {POOLINGS}.")


def pool_map(ids: np.ndarray, size: int, method: str = "min") -> np.ndarray:
    """Pools a label map by an integer factor to ``size × size``.

    Args:
      ids: ``[H, W]`` or ``[B, H, W]`` integer map with H, W multiples of ``size``.
      size: output side.
      method: ``min`` (paper: smallest id in the cell, void included), ``min_nonvoid``
        (smallest non-void id; void only where the whole cell is void) or ``mode``
        (most frequent id; ties go to the smaller id).

    Returns:
      ``[size, size]`` or ``[B, size, size]`` map of the same dtype.
    """
    ids = _check_map(ids)
    check_pooling(method)
    h, w = ids.shape[-2:]
    if h % size or w % size:
        raise ValueError(
            f"Cannot pool a {h}×{w} map to {size}×{size}: sides must be multiples of {size}. "
            "Resize it with resize_nearest first."
        )
    kh, kw = h // size, w // size
    # [..., size, size, kh*kw]: one row of ids per output cell.
    cells = ids.reshape(*ids.shape[:-2], size, kh, size, kw)
    cells = np.moveaxis(cells, -3, -2).reshape(*ids.shape[:-2], size, size, kh * kw)
    if method == "min":
        return cells.min(axis=-1)
    if method == "min_nonvoid":
        big = np.iinfo(ids.dtype).max
        nonvoid = np.where(cells == 0, big, cells).min(axis=-1)
        return np.where(nonvoid == big, 0, nonvoid).astype(ids.dtype)
    # mode: count every entry's occurrences within its cell (cells are small: k² compares),
    # then prefer the highest count and, among ties, the smallest id.
    counts = (cells[..., :, None] == cells[..., None, :]).sum(axis=-1)  # [..., k]
    ids64 = cells.astype(np.int64)
    score = counts.astype(np.int64) * (ids64.max(initial=0) + 1) - ids64
    best = np.take_along_axis(cells, score.argmax(axis=-1)[..., None], axis=-1)
    return best[..., 0]


def map_to_resolution(ids: np.ndarray, size: int, method: str = "min") -> np.ndarray:
    """Brings a label map to ``size × size``: pools when it divides, else nearest resize.

    Pooling is used when the map's sides are multiples of ``size``; otherwise the map is
    first resized (nearest) to the smallest multiple of ``size`` not above it.
    """
    ids = _check_map(ids)
    h, w = ids.shape[-2:]
    if h == size and w == size:
        return ids
    if h % size or w % size:
        factor = max(1, min(h, w) // size)
        ids = resize_nearest(ids, size * factor)
    return pool_map(ids, size, method)
