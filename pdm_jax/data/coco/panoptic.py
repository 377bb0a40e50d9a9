"""COCO 2017 panoptic + captions: the category table, the split index and per-image decoding.

Reads the standard download, unchanged::

    <coco_dir>/train2017/*.jpg                     val2017/*.jpg
    <coco_dir>/annotations/captions_train2017.json captions_val2017.json
    <coco_dir>/annotations/panoptic_train2017.json panoptic_val2017.json
    <coco_dir>/annotations/panoptic_train2017/*.png panoptic_val2017/*.png

Per image (DESIGN §1):

* **crop**: the centred square on the short side, offset ``(long − short) // 2`` (as U-ViT's
  ``center_crop``); EXIF orientation is ignored, as the annotations are;
* **image**: the crop resized to 256×256 with PIL's Lanczos filter and no ``reducing_gap``,
  bit-for-bit U-ViT's preprocessing, so latents match the ones its COCO checkpoints saw;
* **map**: the panoptic PNG's segment id ``R + 256·G + 256²·B`` is looked up in the
  annotation's ``segments_info``: pixels of a listed segment get its ``category_id``, all
  others (id 0, unlisted ids) are void, 0. Crowd segments (``iscrowd = 1``) keep their
  category, like any other segment: they label real pixels of that category, only
  instance separation is missing, and instance ids are dropped anyway. The id map is
  cropped with the same box, resized to 256 with *nearest* sampling
  (:func:`pdm_jax.diffusion.maps.resize_nearest`; ids are never interpolated) and pooled
  from 256 to every map side (32, 64, 128) with the configured pooling.

Images missing from the panoptic annotations (or without captions) are skipped and counted
by :func:`build_index`. A file that cannot be decoded raises :class:`CorruptFileError`
naming it.
"""

import dataclasses
import functools
import json
import os
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

import numpy as np
from PIL import Image

from pdm_jax.diffusion import maps

SPLITS = ("train", "val")
IMAGE_SIZE = 256
MAP_SIZES = (32, 64, 128)
# Image sides prepare_coco writes: 256 (U-ViT, 32×32 latents), 512 (Stable Diffusion, 64×64).
RESOLUTIONS = (256, 512)


def map_sizes_for(resolution: int) -> tuple[int, ...]:
    """The default map sides of ``resolution``: f × the latent side (resolution / 8), f = 1, 2, 4.

    Args:
      resolution: the image side, one of ``RESOLUTIONS``.

    Returns:
      ``(32, 64, 128)`` for 256, ``(64, 128, 256)`` for 512.

    Raises:
      ValueError: an unsupported resolution.
    """
    check_resolution(resolution)
    return tuple(resolution // 8 * f for f in (1, 2, 4))


def check_resolution(resolution: int) -> None:
    """Raises a ValueError naming the choices when ``resolution`` is not supported."""
    if resolution not in RESOLUTIONS:
        raise ValueError(
            f"--resolution={resolution} is not supported; choose 256 (U-ViT: 32×32 latents) or "
            "512 (Stable Diffusion's UNet: 64×64 latents)."
        )


NUM_IDS = 256  # ids are stored as uint8: COCO panoptic ids are 0..200
VOID = 0


class CorruptFileError(ValueError):
    """An input file of the COCO tree cannot be read or does not match its annotation."""

    def __init__(self, path: str, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(
            f"Cannot read {path}: {reason}. Re-download or repair the file, or pass --skip_bad "
            "to skip it (skipped files are listed in the output metadata)."
        )


@functools.cache
def load_categories() -> tuple[dict[str, Any], ...]:
    """The 133 COCO panoptic categories (panopticapi's ``panoptic_coco_categories.json``).

    Returns:
      Entries sorted by id, each ``{"id", "name", "supercategory", "isthing", "color"}``:
      80 things (ids 1..90) and 53 stuff classes (ids 92..200); void (0) is not listed.
    """
    text = resources.files("pdm_jax.data.coco").joinpath("categories.json").read_text()
    return tuple(json.loads(text))


def category_names() -> dict[int, str]:
    """Id → name for void (0, ``"void"``) and the 133 categories."""
    return {VOID: "void", **{c["id"]: c["name"] for c in load_categories()}}


def colour_table() -> np.ndarray:
    """uint8 [256, 3] display colour per id (panopticapi colours; void and unused ids black)."""
    table = np.zeros((NUM_IDS, 3), np.uint8)
    for c in load_categories():
        table[c["id"]] = c["color"]
    return table


@dataclasses.dataclass(frozen=True)
class ImageEntry:
    """One annotated image of a split.

    Attributes:
      image_id: COCO image id.
      file_name: image file name inside ``<split>2017/``.
      panoptic_file: PNG name inside ``annotations/panoptic_<split>2017/``.
      segments: ``((segment_id, category_id), ...)`` from ``segments_info``.
      captions: the image's captions, in annotation-id order.
    """

    image_id: int
    file_name: str
    panoptic_file: str
    segments: tuple[tuple[int, int], ...]
    captions: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class SplitIndex:
    """The usable images of a split and what was left out.

    Attributes:
      entries: images with a panoptic annotation and at least one caption, by image id.
      num_images: images listed in the captions file.
      skipped_no_panoptic: ids of images without a panoptic annotation.
      skipped_no_captions: ids of images without any caption.
    """

    entries: tuple[ImageEntry, ...]
    num_images: int
    skipped_no_panoptic: tuple[int, ...]
    skipped_no_captions: tuple[int, ...]


def split_paths(coco_dir: str, split: str) -> dict[str, str]:
    """Paths of one split in the standard layout.

    Args:
      coco_dir: the COCO root.
      split: ``train`` or ``val``.

    Returns:
      ``{"images", "captions", "panoptic_json", "panoptic_pngs"}`` paths.
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown COCO split {split!r}; choose one of {SPLITS}.")
    ann = os.path.join(coco_dir, "annotations")
    return {
        "images": os.path.join(coco_dir, f"{split}2017"),
        "captions": os.path.join(ann, f"captions_{split}2017.json"),
        "panoptic_json": os.path.join(ann, f"panoptic_{split}2017.json"),
        "panoptic_pngs": os.path.join(ann, f"panoptic_{split}2017"),
    }


def _read_json(path: str) -> Any:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing; --coco_dir must hold the standard COCO 2017 layout "
            "(train2017/, val2017/, annotations/captions_*2017.json, annotations/panoptic_*)."
        )
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(path, f"invalid JSON ({e})") from e


def build_index(coco_dir: str, split: str) -> SplitIndex:
    """Joins the captions and panoptic annotations of a split.

    Args:
      coco_dir: the COCO root.
      split: ``train`` or ``val``.

    Returns:
      The :class:`SplitIndex`; entries are sorted by image id so that every host derives
      the same plan.
    """
    paths = split_paths(coco_dir, split)
    captions_json = _read_json(paths["captions"])
    panoptic_json = _read_json(paths["panoptic_json"])
    captions: dict[int, list[tuple[int, str]]] = {}
    for ann in captions_json["annotations"]:
        captions.setdefault(int(ann["image_id"]), []).append((int(ann["id"]), ann["caption"]))
    panoptic = {int(a["image_id"]): a for a in panoptic_json["annotations"]}
    entries, no_panoptic, no_captions = [], [], []
    images = sorted(captions_json["images"], key=lambda im: int(im["id"]))
    for image in images:
        image_id = int(image["id"])
        if image_id not in panoptic:
            no_panoptic.append(image_id)
            continue
        if not captions.get(image_id):
            no_captions.append(image_id)
            continue
        ann = panoptic[image_id]
        entries.append(
            ImageEntry(
                image_id=image_id,
                file_name=image["file_name"],
                panoptic_file=ann["file_name"],
                segments=tuple((int(s["id"]), int(s["category_id"])) for s in ann["segments_info"]),
                captions=tuple(c.strip() for _, c in sorted(captions[image_id])),
            )
        )
    return SplitIndex(tuple(entries), len(images), tuple(no_panoptic), tuple(no_captions))


def centre_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The centred square on the short side as a PIL box ``(left, top, right, bottom)``."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def _open(path: str, mode: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert(mode)
    except FileNotFoundError as e:
        raise CorruptFileError(path, "the file does not exist") from e
    except (OSError, SyntaxError, ValueError) as e:
        # PIL raises UnidentifiedImageError (an OSError) for garbage and OSError for
        # truncated data.
        raise CorruptFileError(path, f"{type(e).__name__}: {e}") from e


def load_image(path: str, size: int = IMAGE_SIZE) -> tuple[np.ndarray, tuple[int, int]]:
    """Reads an image, centre-crops it to a square and resizes it with Lanczos.

    Args:
      path: image file.
      size: output side.

    Returns:
      ``(uint8 [size, size, 3], (width, height) of the original)``.
    """
    image = _open(path, "RGB")
    # Crop first: resize(box=...) would let the filter read pixels outside the crop.
    out = image.crop(centre_crop_box(*image.size)).resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(out, np.uint8), image.size


def segment_ids(rgb: np.ndarray) -> np.ndarray:
    """Panoptic PNG colours → segment ids ``R + 256·G + 256²·B``.

    Args:
      rgb: uint8 [H, W, 3].

    Returns:
      int64 [H, W] segment ids.
    """
    rgb = np.asarray(rgb).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def segments_to_categories(
    seg_ids: np.ndarray, segments: Sequence[tuple[int, int]] | Mapping[int, int]
) -> np.ndarray:
    """Segment ids → category ids; unlisted segments (and id 0) become void.

    Args:
      seg_ids: int [H, W] segment ids.
      segments: ``(segment_id, category_id)`` pairs (crowd segments included).

    Returns:
      uint8 [H, W] category ids.
    """
    pairs = dict(segments)
    for cat in pairs.values():
        if not 0 < cat < NUM_IDS:
            raise ValueError(f"Category id {cat} does not fit the uint8 map (1..{NUM_IDS - 1}).")
    if not pairs:
        return np.zeros(seg_ids.shape, np.uint8)
    keys = np.fromiter(pairs, np.int64)
    order = np.argsort(keys)
    keys, values = keys[order], np.fromiter(pairs.values(), np.int64)[order]
    pos = np.clip(np.searchsorted(keys, seg_ids), 0, len(keys) - 1)
    return np.where(keys[pos] == seg_ids, values[pos], VOID).astype(np.uint8)


def load_category_map(
    path: str,
    segments: Sequence[tuple[int, int]],
    image_size: tuple[int, int] | None = None,
    size: int = IMAGE_SIZE,
) -> np.ndarray:
    """Reads a panoptic PNG as a centre-cropped, nearest-resized category map.

    Args:
      path: the panoptic PNG.
      segments: its ``(segment_id, category_id)`` pairs.
      image_size: the image's ``(width, height)``; the PNG must match it.
      size: output side.

    Returns:
      uint8 [size, size] category ids (0 = void).
    """
    png = _open(path, "RGB")
    if image_size is not None and png.size != tuple(image_size):
        raise CorruptFileError(
            path, f"its size {png.size} differs from the image's {tuple(image_size)}"
        )
    left, top, right, bottom = centre_crop_box(*png.size)
    ids = segments_to_categories(segment_ids(np.asarray(png)), segments)
    return maps.resize_nearest(ids[top:bottom, left:right], size)


def map_pyramid(
    ids: np.ndarray, sizes: Sequence[int] = MAP_SIZES, pooling: str = "min"
) -> dict[int, np.ndarray]:
    """Pools a 256 map to every map side, each straight from the 256 map.

    Args:
      ids: uint8 [256, 256] category map.
      sizes: map sides, divisors of 256.
      pooling: ``min`` | ``min_nonvoid`` | ``mode`` (:func:`maps.pool_map`).

    Returns:
      ``{side: uint8 [side, side]}``.
    """
    return {int(s): maps.pool_map(ids, int(s), pooling) for s in sizes}


def load_example(
    coco_dir: str,
    split: str,
    entry: ImageEntry,
    map_sizes: Sequence[int] = MAP_SIZES,
    pooling: str = "min",
    resolution: int = IMAGE_SIZE,
) -> dict[str, Any]:
    """Decodes one image and its maps.

    Args:
      coco_dir: the COCO root.
      split: ``train`` or ``val``.
      entry: the image's :class:`ImageEntry`.
      map_sizes: map sides to produce.
      pooling: map pooling.
      resolution: image side (the map is resized to it, then pooled to ``map_sizes``).

    Returns:
      ``{"image": uint8 [R, R, 3], "maps": {side: uint8 [side, side]}}``, R = resolution.

    Raises:
      CorruptFileError: an unreadable image or PNG, or a PNG whose size differs.
    """
    paths = split_paths(coco_dir, split)
    image, size = load_image(os.path.join(paths["images"], entry.file_name), resolution)
    ids = load_category_map(
        os.path.join(paths["panoptic_pngs"], entry.panoptic_file), entry.segments, size, resolution
    )
    return {"image": image, "maps": map_pyramid(ids, map_sizes, pooling)}
