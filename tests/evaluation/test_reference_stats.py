"""FID reference statistics: image selection and preprocessing, sharded features, the command."""

import jax
import numpy as np
import pytest
from absl import app, flags
from PIL import Image

from pdm_jax.data.coco import panoptic as coco
from pdm_jax.evaluation import fid, reference_stats
from pdm_jax.models import inception
from tests.data import fake_coco
from tests.evaluation.test_inception import random_state_dict


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return fake_coco.make_fake_coco(str(tmp_path_factory.mktemp("coco")))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "inception.npz"
    state_dict = random_state_dict()
    np.savez(path, **state_dict)
    return str(path), inception.convert_inception_state_dict(state_dict)


def _parse(argv: list[str]) -> flags.FlagValues:
    fv = flags.FlagValues()
    reference_stats.define_flags(fv)
    fv(["reference_stats", *argv])
    return fv


def test_coco_images_are_the_prepared_ones_in_id_order(tree):
    paths = reference_stats.coco_image_paths(tree, "val")
    # Image 4 has no panoptic annotation: prepare_coco skips it, so do the statistics.
    assert [p.rsplit("/", 1)[1] for p in paths] == [
        fake_coco.file_name(i, "jpg") for i in (1, 2, 3)
    ]


def test_centre_crop_is_prepare_coco_preprocessing(tree):
    path = reference_stats.coco_image_paths(tree, "val")[0]
    cropped = reference_stats.read_image(path, centre_crop=256)
    np.testing.assert_array_equal(cropped, coco.load_image(path)[0])
    # Image 1 is red outside its centre square: the crop must not reach it.
    assert not np.any(np.all(cropped == (255, 0, 0), axis=-1))
    assert reference_stats.read_image(path).shape == (256, 512, 3)  # as is: no crop


def test_sharded_statistics_equal_the_unsharded_network(tree, weights):
    _, variables = weights
    paths = reference_stats.coco_image_paths(tree, "val")
    extractor = reference_stats.InceptionFeatures(variables, batch_size=8)
    assert extractor.mesh.size == jax.local_device_count() == 8
    mu, sigma = reference_stats.reference_statistics(
        extractor, paths, centre_crop=256, num_threads=2, show_progress=False
    )
    images = np.stack([coco.load_image(p)[0] for p in paths])  # [3, 256, 256, 3]
    features = np.asarray(inception.inception_pool_features(variables, images), np.float64)
    ref_mu, ref_sigma = fid.feature_statistics(features)
    np.testing.assert_allclose(mu, ref_mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-4, atol=1e-7)


def test_command_on_a_folder_matches_the_library(tree, weights, tmp_path):
    path, variables = weights
    folder = tmp_path / "images"
    folder.mkdir()
    paths = reference_stats.coco_image_paths(tree, "val")
    for i, p in enumerate(paths):
        Image.fromarray(coco.load_image(p)[0]).save(folder / f"{i}.png")
    out = str(tmp_path / "stats.npz")
    reference_stats.run(
        _parse([f"--inception={path}", f"--images={folder}", f"--output={out}", "--batch_size=8"])
    )
    extractor = reference_stats.InceptionFeatures(variables, batch_size=8)
    expected = reference_stats.reference_statistics(
        extractor, paths, centre_crop=256, show_progress=False
    )
    for got, want in zip(fid.load_stats(out), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)


def test_command_needs_exactly_one_source(weights, tmp_path):
    path, _ = weights
    out = f"--output={tmp_path / 's.npz'}"
    with pytest.raises(app.UsageError, match="exactly one"):
        reference_stats.run(_parse([f"--inception={path}", out]))
    with pytest.raises(app.UsageError, match="exactly one"):
        reference_stats.run(_parse([f"--inception={path}", out, "--images=a", "--coco_dir=b"]))
    with pytest.raises(app.UsageError, match="required"):
        reference_stats.run(_parse(["--images=a"]))


def test_inception_weights_from_npz_or_a_clear_error(weights, tmp_path):
    path, variables = weights
    loaded = reference_stats.load_inception_variables(path)
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)
    with pytest.raises(FileNotFoundError, match=r"missing\.pth"):
        reference_stats.load_inception_variables(str(tmp_path / "missing.pth"))
