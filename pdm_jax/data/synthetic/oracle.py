"""The synthetic world's oracle (image → category map) and its map colours.

The oracle reads any RGB image of the synthetic world, a generated one included, back
into a category map by the category colours; it is the judge of whether a generated
image and a generated map agree. On clean renders it is exact at the rendering size and
about 98% accurate on 16×16 latent-size images, where area-averaging blends colours along
every edge (see ``tests/data/test_synthetic.py``).
"""

import numpy as np

from pdm_jax.data.synthetic.world import CATEGORIES, VOID_ID

_ORACLE_IDS = np.array([c.id for c in CATEGORIES if c.id != VOID_ID], dtype=np.int32)
_ORACLE_COLOURS = np.array(
    [c.colour for c in CATEGORIES if c.id != VOID_ID], dtype=np.float32
)  # [K, 3]
_PAIR_DIFF = _ORACLE_COLOURS[:, None, :] - _ORACLE_COLOURS[None, :, :]  # [K(i), K(j), 3]
_PAIR_NORM = np.maximum(np.sum(_PAIR_DIFF**2, axis=-1), 1e-6)  # [K, K]


def resize_nearest(ids: np.ndarray, size: int) -> np.ndarray:
    """Resizes [..., H, W] label maps to [..., size, size] by pixel-centre sampling."""
    h, w = ids.shape[-2:]
    rows = ((np.arange(size) + 0.5) * h / size).astype(np.int64)
    cols = ((np.arange(size) + 0.5) * w / size).astype(np.int64)
    return ids[..., rows[:, None], cols[None, :]]


def segment(image: np.ndarray, size: int | None = None) -> np.ndarray:
    """The oracle: segments images into category maps by their category colours.

    Each pixel is explained as a blend of two category colours (or one), chosen among the
    nearest-colour labels of its 3×3 neighbourhood, and takes the category with the larger
    share. Blending matters at low resolution, where area-averaging mixes colours along
    every edge; plain nearest colour would turn a red/green edge pixel into "wall".

    Args:
      image: uint8 (or float in the uint8 range) [..., H, W, 3] RGB images.
      size: side of the returned maps (pixel-centre resize); default: the image's own.

    Returns:
      int32 [..., size, size] (or [..., H, W]) ids, never void.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim < 3 or image.shape[-1] != 3:
        raise ValueError(f"segment expects [..., H, W, 3] RGB images, got shape {image.shape}.")
    lead, (h, w) = image.shape[:-3], image.shape[-3:-1]
    flat = image.reshape(-1, h, w, 3)
    ids = np.stack([_segment_one(im) for im in flat]).reshape(*lead, h, w)
    if size is not None and (size, size) != (h, w):
        ids = resize_nearest(ids, size)
    return ids


def _segment_one(image: np.ndarray) -> np.ndarray:
    """[H, W, 3] float → int32 [H, W] ids (see :func:`segment`)."""
    h, w, _ = image.shape
    k = len(_ORACLE_IDS)
    dist = np.sum((image[:, :, None, :] - _ORACLE_COLOURS) ** 2, axis=-1)  # [H, W, K]
    nearest = np.pad(np.argmin(dist, axis=-1), 1, mode="edge")  # [H+2, W+2]
    cand = np.zeros((h, w, k), dtype=bool)
    for dy in range(3):
        for dx in range(3):
            cand |= nearest[dy : dy + h, dx : dx + w, None] == np.arange(k)
    # Blend x ≈ a·c_i + (1 − a)·c_j for every candidate pair (i, j), a in [0, 1].
    v = image[:, :, None, None, :] - _ORACLE_COLOURS[None, :, :]  # [H, W, 1, K(j), 3]
    share = np.clip(np.sum(v * _PAIR_DIFF, axis=-1) / _PAIR_NORM, 0.0, 1.0)  # [H, W, K, K]
    residual = np.sum((v - share[..., None] * _PAIR_DIFF) ** 2, axis=-1)
    residual = np.where(cand[:, :, :, None] & cand[:, :, None, :], residual, np.inf)
    best = np.argmin(residual.reshape(h, w, k * k), axis=-1)  # [H, W]
    i, j = np.divmod(best, k)
    a = np.take_along_axis(share.reshape(h, w, k * k), best[..., None], axis=-1)[..., 0]
    return _ORACLE_IDS[np.where(a >= 0.5, i, j)]


def colour_table() -> np.ndarray:
    """uint8 [256, 3] colour per id for visualising maps; ids outside the table are black."""
    table = np.zeros((256, 3), dtype=np.uint8)
    for c in CATEGORIES:
        table[c.id] = c.colour
    return table


def colourise(ids: np.ndarray) -> np.ndarray:
    """Category maps [...] (ids 0..255) → uint8 [..., 3] RGB with the category colours."""
    return colour_table()[np.clip(np.asarray(ids), 0, 255)]
