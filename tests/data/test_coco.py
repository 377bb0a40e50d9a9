"""COCO decoding: category table, split index, crop/resize of images and maps, pooling, errors,
and the record codec — against maps worked out by hand in ``fake_coco``."""

import os

import numpy as np
import pytest
from PIL import Image

from pdm_jax.data.coco import panoptic as coco
from pdm_jax.data.coco import records
from tests.data import fake_coco


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return fake_coco.make_fake_coco(str(tmp_path_factory.mktemp("coco")), corrupt=True)


def _example(tree, image_id, sizes=coco.MAP_SIZES, pooling="min"):
    index = coco.build_index(tree, "val")
    entry = next(e for e in index.entries if e.image_id == image_id)
    return coco.load_example(tree, "val", entry, sizes, pooling)


def test_category_table_is_coco_panoptic():
    cats = coco.load_categories()
    assert len(cats) == 133
    things = [c["id"] for c in cats if c["isthing"]]
    stuff = [c["id"] for c in cats if not c["isthing"]]
    assert len(things) == 80 and min(things) == 1 and max(things) == 90
    assert len(stuff) == 53 and min(stuff) == 92 and max(stuff) == 200
    names = coco.category_names()
    assert names[0] == "void" and names[1] == "person" and names[18] == "dog"
    assert names[92] == "banner" and names[187] == "sky-other-merged" and names[200] == "rug-merged"
    table = coco.colour_table()
    assert table.shape == (256, 3) and table.dtype == np.uint8
    np.testing.assert_array_equal(table[1], [220, 20, 60])  # panopticapi's person colour
    np.testing.assert_array_equal(table[0], [0, 0, 0])
    assert len({tuple(table[c["id"]]) for c in cats}) == 133


def test_index_sorts_joins_and_counts_skips(tree):
    index = coco.build_index(tree, "val")
    assert [e.image_id for e in index.entries] == [1, 2, 3, 5, 6]
    assert index.num_images == 6
    assert index.skipped_no_panoptic == (4,)
    assert index.skipped_no_captions == ()
    first = index.entries[0]
    assert first.captions == tuple(fake_coco.CAPTIONS[1])
    assert first.file_name == "000000000001.jpg" and first.panoptic_file == "000000000001.png"
    # Crowd segment 15 is listed like any other; segment 99 is not in segments_info.
    assert dict(first.segments) == {11: 171, 12: 187, 13: 193, 14: 1, 15: 3}
    assert len(index.entries[2].captions) == 6


def test_segment_id_formula_and_lookup():
    rgb = np.array([[[1, 2, 3], [0, 0, 0], [99, 0, 0]]], np.uint8)
    seg = coco.segment_ids(rgb)
    np.testing.assert_array_equal(seg, [[1 + 2 * 256 + 3 * 65536, 0, 99]])
    cats = coco.segments_to_categories(seg, [(1 + 2 * 256 + 3 * 65536, 200), (7, 5)])
    np.testing.assert_array_equal(cats, [[200, 0, 0]])  # id 0 and unlisted 99 are void
    assert cats.dtype == np.uint8


@pytest.mark.parametrize("image_id", [1, 2, 3])
def test_map_256_matches_hand_derivation(tree, image_id):
    index = coco.build_index(tree, "val")
    entry = next(e for e in index.entries if e.image_id == image_id)
    png = os.path.join(tree, "annotations", "panoptic_val2017", entry.panoptic_file)
    ids = coco.load_category_map(png, entry.segments, fake_coco.SIZES[image_id])
    np.testing.assert_array_equal(ids, fake_coco.expected_map_256(image_id))
    # Nothing from outside the crop (wall-brick 171, snow 159) survives.
    assert not np.isin(ids, [171, 159]).any()


@pytest.mark.parametrize("image_id", [1, 2, 3])
def test_min_pyramid_is_blockwise_min_of_the_256_map(tree, image_id):
    got = _example(tree, image_id)["maps"]
    full = fake_coco.expected_map_256(image_id)
    for side in coco.MAP_SIZES:
        k = 256 // side
        want = full.reshape(side, k, side, k).min(axis=(1, 3))
        np.testing.assert_array_equal(got[side], want)
        assert got[side].dtype == np.uint8


def test_pooling_options_on_hand_picked_cells(tree):
    """Image 1 at side 32 (8×8 cells): person rows 40..104 × cols 60..124, void corner rows
    220..256 × cols 0..50, unlisted segment rows 0..20 × cols 200..256."""
    pooled = {p: _example(tree, 1, (32,), p)["maps"][32] for p in ("min", "min_nonvoid", "mode")}
    m, nv, mode = pooled["min"], pooled["min_nonvoid"], pooled["mode"]
    # Cell (5, 7): rows 40..48, cols 56..64 — 4 columns person (1), 4 sky (187).
    assert m[5, 7] == 1 and nv[5, 7] == 1 and mode[5, 7] == 1  # tie 32:32 → smaller id
    # Cell (4, 7): rows 32..40 — only sky.
    assert m[4, 7] == 187
    # Cell (28, 6): cols 48..56 — 2 columns void, 6 grass.
    assert m[28, 6] == 0 and nv[28, 6] == 193 and mode[28, 6] == 193
    # Cell (28, 0): all void.
    assert m[28, 0] == 0 and nv[28, 0] == 0 and mode[28, 0] == 0
    # Cell (2, 25): rows 16..24 — rows 16..19 void (unlisted segment), 20..23 sky.
    assert m[2, 25] == 0 and nv[2, 25] == 187 and mode[2, 25] == 0  # tie → void (smaller)
    # Crowd cars (3) keep their category: rows 150..200 × cols 130..200 → cells 18..24 × 16..24.
    assert (m[18:25, 16:25] == 3).all() and m[17, 20] == 193 and m[25, 20] == 193


def test_image_is_centre_cropped_and_lanczos_resized(tree):
    for image_id in (1, 2, 3):
        image = _example(tree, image_id)["image"]
        assert image.shape == (256, 256, 3) and image.dtype == np.uint8
        decoded = np.asarray(Image.open(os.path.join(tree, "val2017", f"{image_id:012d}.jpg")))
        left, top, right, bottom = fake_coco.CROPS[image_id]
        crop = Image.fromarray(decoded[top:bottom, left:right])
        want = np.asarray(crop.resize((256, 256), Image.Resampling.LANCZOS))
        np.testing.assert_array_equal(image, want)
        # No red from outside the crop leaks in.
        red = (image[..., 0] > 200) & (image[..., 1] < 60) & (image[..., 2] < 60)
        assert not red.any()
    # Image 1 is already 256 high: the crop is returned untouched.
    decoded = np.asarray(Image.open(os.path.join(tree, "val2017", "000000000001.jpg")))
    np.testing.assert_array_equal(_example(tree, 1)["image"], decoded[:, 128:384])


def test_corrupt_files_raise_with_their_path(tree):
    with pytest.raises(coco.CorruptFileError, match=r"000000000005\.jpg.*--skip_bad"):
        _example(tree, 5)
    with pytest.raises(coco.CorruptFileError, match=r"panoptic_val2017/000000000006\.png"):
        _example(tree, 6)


def test_png_of_another_size_is_rejected(tree, tmp_path):
    entry = coco.build_index(tree, "val").entries[0]
    png = os.path.join(tree, "annotations", "panoptic_val2017", entry.panoptic_file)
    with pytest.raises(coco.CorruptFileError, match="differs from the image"):
        coco.load_category_map(png, entry.segments, (300, 200))


def test_missing_annotations_name_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="standard COCO 2017 layout"):
        coco.build_index(str(tmp_path), "train")
    with pytest.raises(ValueError, match="Unknown COCO split"):
        coco.split_paths(str(tmp_path), "test")


def test_record_codec_round_trip_is_exact_and_deterministic():
    rng = np.random.default_rng(0)
    record = {
        "version": records.RECORD_VERSION,
        "image_id": 42,
        "captions": ["a", "bé"],
        "mean": rng.standard_normal((4, 4, 2)).astype(np.float32),
        "contexts": rng.standard_normal((2, 3, 5)).astype(np.float16),
        "map_32": rng.integers(0, 201, (32, 32)).astype(np.uint8),
    }
    data = records.encode_record(record)
    assert records.encode_record(dict(reversed(record.items()))) == data
    back = records.decode_record(data)
    assert back["image_id"] == 42 and back["captions"] == ["a", "bé"]
    for key in ("mean", "contexts", "map_32"):
        assert back[key].dtype == record[key].dtype
        np.testing.assert_array_equal(back[key], record[key])
    with pytest.raises(ValueError, match="Record version"):
        records.decode_record(records.encode_record(dict(record, version=0)))
