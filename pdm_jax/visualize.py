"""Pictures of samples: coloured maps with legends, and ``caption | image | map`` grids.

Everything works on uint8 numpy arrays and writes PNGs with PIL. Small images (the demo's
16×16) are enlarged with nearest sampling so pixels stay crisp.
"""

import textwrap
from collections.abc import Mapping, Sequence

import numpy as np
from etils import epath
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)


def _font(size: int = 12) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def upscale(image: np.ndarray, size: int) -> np.ndarray:
    """Nearest resize of ``[H, W]`` or ``[H, W, C]`` to ``size × size``."""
    image = np.asarray(image)
    h, w = image.shape[:2]
    rows = np.minimum(((np.arange(size) + 0.5) * h / size).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size) + 0.5) * w / size).astype(np.int64), w - 1)
    return image[rows[:, None], cols[None, :]]


def colour_map(ids: np.ndarray, colour_table: np.ndarray) -> np.ndarray:
    """int ids ``[...]`` → uint8 ``[..., 3]`` colours (ids outside 0..255 are black)."""
    ids = np.asarray(ids)
    table = np.asarray(colour_table, np.uint8)
    inside = (ids >= 0) & (ids < table.shape[0])
    return np.where(inside[..., None], table[np.clip(ids, 0, table.shape[0] - 1)], 0).astype(
        np.uint8
    )


def legend(
    ids: Sequence[int],
    names: Mapping[int, str],
    colour_table: np.ndarray,
    *,
    width: int = 160,
    row_height: int = 16,
) -> np.ndarray:
    """A column of colour swatches with ``id name`` labels.

    Args:
      ids: the categories to list (in this order).
      names: id → category name (unknown ids are shown as ``?``).
      colour_table: uint8 [256, 3].
      width: image width in pixels.
      row_height: pixels per entry.

    Returns:
      uint8 [max(1, len(ids)) · row_height, width, 3].
    """
    rows = max(1, len(ids))
    img = Image.new("RGB", (width, rows * row_height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    font = _font(max(8, row_height - 4))
    for r, i in enumerate(ids):
        y = r * row_height
        colour = tuple(int(c) for c in colour_map(np.asarray(i), colour_table))
        draw.rectangle([2, y + 2, row_height - 2, y + row_height - 2], fill=colour, outline=TEXT)
        draw.text((row_height + 4, y + 1), f"{i} {names.get(int(i), '?')}", fill=TEXT, font=font)
    return np.asarray(img)


def map_with_legend(
    ids: np.ndarray,
    names: Mapping[int, str],
    colour_table: np.ndarray,
    *,
    size: int = 256,
) -> np.ndarray:
    """A coloured map enlarged to ``size`` with the legend of its categories on the right.

    Args:
      ids: int [H, W] category map.
      names: id → name.
      colour_table: uint8 [256, 3].
      size: side of the map panel.

    Returns:
      uint8 [size, size + 160, 3].
    """
    present = [int(i) for i in np.unique(np.asarray(ids))]
    panel = upscale(colour_map(ids, colour_table), size)
    key = legend(present, names, colour_table, row_height=min(16, max(8, size // 12)))
    key = key[:size]
    column = np.full((size, key.shape[1], 3), 255, np.uint8)
    column[: key.shape[0]] = key
    return np.concatenate([panel, column], axis=1)


def text_panel(text: str, width: int, height: int, font_size: int = 12) -> np.ndarray:
    """``text`` word-wrapped onto a white ``[height, width, 3]`` uint8 panel."""
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    font = _font(font_size)
    chars = max(8, int(width / (0.55 * font_size)))
    y = 4
    for line in textwrap.wrap(text, chars) or [""]:
        draw.text((4, y), line, fill=TEXT, font=font)
        y += font_size + 3
    return np.asarray(img)


def sample_grid(
    captions: Sequence[str],
    images: np.ndarray,
    maps: np.ndarray | None,
    names: Mapping[int, str],
    colour_table: np.ndarray,
    *,
    cell: int = 128,
    caption_width: int = 200,
) -> np.ndarray:
    """One row per sample: ``caption | image | coloured map``, then a legend of the maps.

    Args:
      captions: B captions.
      images: uint8 [B, H, W, 3].
      maps: int [B, M, M] category maps, or None (image-only models: no map column).
      names: id → name.
      colour_table: uint8 [256, 3].
      cell: side of each image/map cell.
      caption_width: width of the caption column.

    Returns:
      uint8 RGB grid.
    """
    images = np.asarray(images)
    n_maps = images.shape[0] if maps is None else np.shape(maps)[0]
    if not len(captions) == images.shape[0] == n_maps:
        raise ValueError(
            f"sample_grid needs as many captions ({len(captions)}), images ({images.shape[0]}) "
            f"and maps ({n_maps})."
        )
    gap = np.full((cell, 4, 3), 255, np.uint8)
    rows = []
    for k, (caption, image) in enumerate(zip(captions, images, strict=True)):
        row = [text_panel(caption, caption_width, cell), gap, upscale(image, cell)]
        if maps is not None:
            row += [gap, upscale(colour_map(maps[k], colour_table), cell)]
        rows.append(np.concatenate(row, axis=1))
        rows.append(np.full((4, rows[-1].shape[1], 3), 255, np.uint8))
    grid = np.concatenate(rows, axis=0)
    if maps is None:
        return grid
    present = [int(i) for i in np.unique(maps)]
    key = legend(present, names, colour_table, width=grid.shape[1])
    return np.concatenate([grid, key], axis=0)


def save_png(path: str | epath.Path, image: np.ndarray) -> epath.Path:
    """Writes a uint8 ``[H, W]`` or ``[H, W, 3]`` array as a PNG (parents created).

    Args:
      path: output file.
      image: the pixels.

    Returns:
      The path written.
    """
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"save_png expects uint8 pixels, got {image.dtype}.")
    with path.open("wb") as f:
        Image.fromarray(image).save(f, format="PNG")
    return path
