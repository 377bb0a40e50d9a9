"""A tiny COCO 2017 tree in the standard layout, with maps whose prepared form is known by hand.

Every segment is a rectangle, chosen so that the crop and the nearest resize to 256 move
its edges to positions worked out below (``EXPECTED_256`` rectangles, in output pixels):

* image 1, 512×256 landscape: crop columns 128..384, no resize (256 → 256). Inside the crop:
  sky (187) over grass (193), a person (1), a crowd of cars (3, ``iscrowd``), a void corner
  (segment id 0) and pixels of a segment missing from ``segments_info`` (→ void). Outside
  the crop: wall-brick (171), which must never appear.
* image 2, 128×192 portrait: crop rows 32..160, resize ×2 (output pixel i ← crop pixel
  i // 2). Wall (199) over wood floor (118), a dog (18); snow (159) outside the crop.
* image 3, 300×300 square: no crop, resize 300 → 256: output i ← floor((i + ½)·300/256),
  so source edges 75 and 150 land on 64 and 128. A cat (17) in the top-left, sky (187)
  above sea (155). Six captions.
* image 4: captions only, no panoptic annotation (skipped and counted).
* with ``corrupt=True``: image 5 whose JPEG is garbage and image 6 whose PNG is truncated.

Image pixels: red (255, 0, 0) outside the crop, a smooth gradient inside.
"""

import io
import json
import os

import numpy as np
from PIL import Image

from pdm_jax.models.vae import VAEConfig

SPLIT = "val"
# The VAE the COCO tests encode and decode with: four levels (256×256 images ↔ 32×32×4
# latents, as the SD KL-f8 VAE), 8 channels wide, with U-ViT's latent scale factor.
VAE_SCALE = 0.2301
TINY_VAE = VAEConfig(
    block_out_channels=(8, 8, 8, 8),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    scale_factor=VAE_SCALE,
)
# image id → (width, height)
SIZES = {1: (512, 256), 2: (128, 192), 3: (300, 300), 4: (64, 48), 5: (64, 64), 6: (64, 80)}
CROPS = {1: (128, 0, 384, 256), 2: (0, 32, 128, 160), 3: (0, 0, 300, 300)}
# Panoptic segments in source pixels: (segment id, category id, iscrowd, rows, cols); later
# rectangles paint over earlier ones. Segment id 0 paints void, 99 is not in segments_info.
SEGMENTS = {
    1: [
        (11, 171, 0, (0, 256), (0, 512)),
        (12, 187, 0, (0, 128), (128, 384)),
        (13, 193, 0, (128, 256), (128, 384)),
        (14, 1, 0, (40, 104), (188, 252)),
        (15, 3, 1, (150, 200), (258, 328)),
        (0, 0, 0, (220, 256), (128, 178)),
        (99, 0, 0, (0, 20), (328, 384)),
    ],
    2: [
        (21, 159, 0, (0, 192), (0, 128)),
        (22, 199, 0, (32, 96), (0, 128)),
        (23, 118, 0, (96, 160), (0, 128)),
        (24, 18, 0, (42, 62), (70, 100)),
    ],
    3: [
        (31, 187, 0, (0, 150), (0, 300)),
        (32, 155, 0, (150, 300), (0, 300)),
        (33, 17, 0, (0, 75), (0, 75)),
    ],
    5: [(51, 187, 0, (0, 64), (0, 64))],
    6: [(61, 187, 0, (0, 80), (0, 64))],
}
# The 256 map by hand: (category, rows, cols) in output pixels, painted in order on void.
EXPECTED_256 = {
    1: [
        (187, (0, 128), (0, 256)),
        (193, (128, 256), (0, 256)),
        (1, (40, 104), (60, 124)),
        (3, (150, 200), (130, 200)),
        (0, (220, 256), (0, 50)),
        (0, (0, 20), (200, 256)),
    ],
    2: [(199, (0, 128), (0, 256)), (118, (128, 256), (0, 256)), (18, (20, 60), (140, 200))],
    3: [(187, (0, 128), (0, 256)), (155, (128, 256), (0, 256)), (17, (0, 64), (0, 64))],
}
CAPTIONS = {
    1: [f"take {k}: a person on the grass under the sky" for k in range(5)],
    2: [f"take {k}: a dog in a room with a wooden floor" for k in range(5)],
    3: [f"take {k}: a cat by the sea" for k in range(6)],
    4: [f"take {k}: an image without panoptic labels" for k in range(5)],
    5: [f"take {k}: a broken jpeg" for k in range(5)],
    6: [f"take {k}: a broken png" for k in range(5)],
}


def paint(shape: tuple[int, int], rects, dtype=np.int64) -> np.ndarray:
    """Paints ``(value, rows, cols)`` rectangles in order on zeros."""
    out = np.zeros(shape, dtype)
    for value, (r0, r1), (c0, c1) in rects:
        out[r0:r1, c0:c1] = value
    return out


def expected_map_256(image_id: int) -> np.ndarray:
    """uint8 [256, 256]: the hand-derived category map of an image."""
    return paint((256, 256), EXPECTED_256[image_id], np.uint8)


def image_pixels(image_id: int) -> np.ndarray:
    """uint8 [H, W, 3]: red outside the crop, a gradient (no pure red) inside."""
    w, h = SIZES[image_id]
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([40 + 100 * yy / h, 60 + 120 * xx / w, 90 + 60 * (xx + yy) / (w + h)], -1)
    rgb = rgb.astype(np.uint8)
    if image_id in CROPS:
        left, top, right, bottom = CROPS[image_id]
        outside = np.ones((h, w), bool)
        outside[top:bottom, left:right] = False
        rgb[outside] = (255, 0, 0)
    return rgb


def file_name(image_id: int, ext: str) -> str:
    return f"{image_id:012d}.{ext}"


def _segment_png(image_id: int) -> bytes:
    w, h = SIZES[image_id]
    ids = paint((h, w), [(sid, rows, cols) for sid, _, _, rows, cols in SEGMENTS[image_id]])
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def make_fake_coco(root: str, corrupt: bool = False) -> str:
    """Writes the fake tree (val split) under ``root`` and returns ``root``.

    Args:
      root: destination directory.
      corrupt: add images 5 (garbage JPEG) and 6 (truncated PNG).

    Returns:
      ``root``.
    """
    ids = [1, 2, 3, 4, *([5, 6] if corrupt else [])]
    images_dir = os.path.join(root, f"{SPLIT}2017")
    ann_dir = os.path.join(root, "annotations")
    png_dir = os.path.join(ann_dir, f"panoptic_{SPLIT}2017")
    for d in (images_dir, png_dir):
        os.makedirs(d, exist_ok=True)
    images, captions, panoptic = [], [], []
    caption_id = 1000
    # Listed out of id order: the index must sort by id.
    for image_id in reversed(ids):
        w, h = SIZES[image_id]
        name = file_name(image_id, "jpg")
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        jpg_path = os.path.join(images_dir, name)
        if image_id == 5:
            with open(jpg_path, "wb") as f:
                f.write(b"this is not a jpeg" * 10)
        else:
            Image.fromarray(image_pixels(image_id)).save(jpg_path, quality=95)
        for caption in CAPTIONS[image_id]:
            caption_id += 1
            captions.append({"id": caption_id, "image_id": image_id, "caption": caption})
        if image_id == 4:
            continue
        png = _segment_png(image_id)
        with open(os.path.join(png_dir, file_name(image_id, "png")), "wb") as f:
            f.write(png[: len(png) // 2] if image_id == 6 else png)
        segments = [
            {"id": sid, "category_id": cat, "iscrowd": crowd, "area": 1, "bbox": [0, 0, 1, 1]}
            for sid, cat, crowd, _, _ in SEGMENTS[image_id]
            if sid not in (0, 99)
        ]
        panoptic.append(
            {
                "image_id": image_id,
                "file_name": file_name(image_id, "png"),
                "segments_info": segments,
            }
        )
    with open(os.path.join(ann_dir, f"captions_{SPLIT}2017.json"), "w") as f:
        json.dump({"images": images, "annotations": captions}, f)
    with open(os.path.join(ann_dir, f"panoptic_{SPLIT}2017.json"), "w") as f:
        json.dump({"images": images, "annotations": panoptic, "categories": []}, f)
    return root


def _byte_alphabet() -> list[str]:
    """The 256 base symbols of byte-level BPE (GPT-2/CLIP ``bytes_to_unicode`` order)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def write_clip_tokenizer(directory: str) -> int:
    """Writes a tiny CLIP BPE tokenizer (``vocab.json``, ``merges.txt``); returns its size.

    Ids: 256 bytes, 256 word-final bytes, a few merges, then ``<|startoftext|>`` and
    ``<|endoftext|>`` (the largest id, as in OpenAI's vocabulary).
    """
    merges = ["t h", "th e</w>", "o n</w>", "s k", "sk y</w>"]
    chars = _byte_alphabet()
    vocab = [*chars, *(c + "</w>" for c in chars), *("".join(m.split()) for m in merges)]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(directory, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)
