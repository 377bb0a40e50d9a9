"""FID: Fréchet distance against closed forms and pytorch-fid, statistics and image plumbing.

``data/fid_golden.npz`` holds three cases evaluated once with pytorch-fid 0.3.0's own
``calculate_frechet_distance`` (scipy 1.17), inputs from ``np.random.default_rng(42)``:
``a``: 16-d stats of 200 correlated samples per set; ``b``: 64-d stats of 10 samples per set
(rank-deficient, complex root with a tiny imaginary part); ``c``: ``Σ1 = [[0, 1], [0, 0]]``,
``Σ2 = I`` (nilpotent product: exercises the ``eps`` retry). See ``data/README.md``.
"""

import pathlib

import numpy as np
import pytest
from PIL import Image

from pdm_jax.evaluation import fid


@pytest.fixture(scope="module")
def golden():
    with np.load(pathlib.Path(__file__).parent / "data" / "fid_golden.npz") as f:
        return {k: f[k] for k in f.files}


def test_diagonal_covariances_match_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    var1, var2 = rng.uniform(0.1, 2.0, 5), rng.uniform(0.1, 2.0, 5)
    want = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    got = fid.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    assert got == pytest.approx(want, rel=1e-12)


def test_full_covariances_match_symmetric_formula():
    # Independent route: Tr (Σ1 Σ2)^½ = Σ sqrt(eig(Σ1^½ Σ2 Σ1^½)), all symmetric eigh.
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    sigma1, sigma2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    w, v = np.linalg.eigh(sigma1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    tr_covmean = np.sqrt(np.linalg.eigvalsh(root1 @ sigma2 @ root1)).sum()
    want = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean
    assert fid.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(want, rel=1e-10)
    # 1-d: (m1 - m2)² + (s1 - s2)².
    assert fid.frechet_distance(1.0, 4.0, -1.0, 9.0) == pytest.approx(4.0 + 1.0)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # case c is singular
@pytest.mark.parametrize("case", ["a", "b", "c"])
def test_matches_pytorch_fid(golden, case):
    args = [golden[f"{case}_{k}"] for k in ("mu1", "sigma1", "mu2", "sigma2")]
    got = fid.frechet_distance(*args)
    assert got == pytest.approx(float(golden[f"{case}_fid"]), rel=1e-6)


def test_identical_statistics_give_zero(golden):
    mu, sigma = golden["a_mu1"], golden["a_sigma1"]
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_rejects_bad_statistics():
    with pytest.raises(ValueError, match="differ in size"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="imaginary component"):
        fid.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))


def test_feature_statistics_and_npz_round_trip(tmp_path):
    feats = np.random.default_rng(2).normal(size=(7, 3)).astype(np.float32)
    mu, sigma = fid.feature_statistics(feats)
    assert mu.dtype == sigma.dtype == np.float64
    centred = feats.astype(np.float64) - feats.astype(np.float64).mean(0)
    np.testing.assert_allclose(sigma, centred.T @ centred / 6, rtol=1e-12)
    fid.save_stats(tmp_path / "ref.npz", mu, sigma)
    mu2, sigma2 = fid.load_stats(tmp_path / "ref.npz")
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    np.savez(tmp_path / "bad.npz", m=mu)
    with pytest.raises(KeyError, match="'mu', 'sigma'"):
        fid.load_stats(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="N >= 2"):
        fid.feature_statistics(feats[:1])


def _mean_colour(variables, images):
    # Cheap stand-in network: [B, H, W, 3] uint8 -> [B, 3] mean colour (+ an offset).
    return images.astype(np.float32).mean(axis=(1, 2)) + variables["offset"]


def test_stats_from_arrays_batches_and_pads():
    images = np.random.default_rng(3).integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)
    calls = []

    def spy(variables, batch):
        calls.append(batch.shape)
        return _mean_colour(variables, batch)

    mu, sigma = fid.stats_from_arrays({"offset": 1.0}, images, batch_size=3, feature_fn=spy)
    assert calls == [(3, 5, 6, 3)] * 3  # the last batch of 1 is padded to 3
    want_mu, want_sigma = fid.feature_statistics(_mean_colour({"offset": 1.0}, images))
    np.testing.assert_allclose(mu, want_mu, rtol=1e-12)
    np.testing.assert_allclose(sigma, want_sigma, rtol=1e-12)
    with pytest.raises(ValueError, match="uint8"):
        fid.stats_from_arrays({}, images.astype(np.float32), feature_fn=spy)


def test_stats_from_folder_reads_images_like_pytorch_fid(tmp_path):
    rng = np.random.default_rng(4)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(5, 6, 3)] * 3]
    images.append(rng.integers(0, 256, (4, 4), dtype=np.uint8))  # grey, other size
    for i, img in enumerate(images):
        Image.fromarray(img).save(tmp_path / f"{i:03d}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "upper.PNG").write_bytes((tmp_path / "000.png").read_bytes())  # case-sensitive
    calls = []

    def spy(variables, batch):
        calls.append(batch.shape)
        return _mean_colour(variables, batch)

    mu, sigma = fid.stats_from_folder({"offset": 0.0}, tmp_path, batch_size=2, feature_fn=spy)
    assert calls == [(2, 5, 6, 3), (2, 5, 6, 3), (2, 4, 4, 3)]
    grey = np.repeat(images[3][..., None], 3, axis=-1)  # convert("RGB") replicates the channel
    feats = [img.astype(np.float32).mean(axis=(0, 1)) for img in [*images[:3], grey]]
    want_mu, want_sigma = fid.feature_statistics(np.stack(feats))
    np.testing.assert_allclose(mu, want_mu, rtol=1e-12)
    np.testing.assert_allclose(sigma, want_sigma, rtol=1e-12)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fid.stats_from_folder({}, tmp_path / "missing")


def test_stats_from_folder_with_inception_matches_pytorch_fid(tmp_path):
    # End to end with the real network: PNGs of the inception golden inputs give pytorch-fid's
    # features (data/inception_golden.npz), hence its statistics.
    from pdm_jax.models import inception
    from tests.evaluation.test_inception import DATA, golden_images, random_state_dict

    small, _ = golden_images()  # [2, 48, 64, 3]
    for i, img in enumerate(small):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
    variables = inception.convert_inception_state_dict(random_state_dict())
    mu, sigma = fid.stats_from_folder(variables, tmp_path, batch_size=2)
    with np.load(DATA / "inception_golden.npz") as f:
        want_mu, want_sigma = fid.feature_statistics(f["features_small"])
    np.testing.assert_allclose(mu, want_mu, rtol=0, atol=1e-4)
    np.testing.assert_allclose(sigma, want_sigma, rtol=0, atol=1e-4)
