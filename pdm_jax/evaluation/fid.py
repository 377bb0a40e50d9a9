"""Fréchet Inception Distance, computed the way pytorch-fid computes it.

Features are :func:`~pdm_jax.models.inception.inception_pool_features` of uint8 RGB
images: every image, real or generated, goes through the network's own 299×299 PyTorch
bilinear resize (no other preprocessing), as pytorch-fid does with PNG files. Statistics are
the float64 mean and ``np.cov`` covariance of the features and are stored as ``.npz`` files
with keys ``mu`` and ``sigma`` (pytorch-fid's format, so its reference statistics load here
and ours load there).
"""

import logging
import pathlib
from collections.abc import Callable, Iterable, Iterator

import jax
import numpy as np
from PIL import Image
from scipy import linalg

from pdm_jax.models.inception import inception_pool_features

# pytorch-fid's list; matched case-sensitively as ``*.<ext>``, as it does.
IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")

FeatureFn = Callable[[dict, jax.Array], jax.Array]


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of features, in float64.

    Args:
      features: ``[N, D]`` array, ``N >= 2``.

    Returns:
      ``(mu [D], sigma [D, D])`` float64 (unbiased covariance, as ``np.cov``).
    """
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(
            f"feature_statistics needs a [N, D] array with N >= 2, got shape {features.shape}."
        )
    return features.mean(axis=0), np.cov(features, rowvar=False)


def save_stats(path: str | pathlib.Path, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Writes statistics to a compressed ``.npz`` with keys ``mu`` and ``sigma``.

    Args:
      path: output file (numpy appends ``.npz`` if missing).
      mu: ``[D]`` mean.
      sigma: ``[D, D]`` covariance.
    """
    np.savez_compressed(path, mu=np.asarray(mu), sigma=np.asarray(sigma))


def load_stats(path: str | pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads statistics written by :func:`save_stats` or by pytorch-fid ``--save-stats``.

    Args:
      path: ``.npz`` file with keys ``mu`` and ``sigma``.

    Returns:
      ``(mu [D], sigma [D, D])`` float64.
    """
    with np.load(path) as f:
        missing = {"mu", "sigma"} - set(f.files)
        if missing:
            raise KeyError(f"{path} lacks {sorted(missing)}; FID statistics need 'mu' and 'sigma'.")
        return np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance ``‖mu1 − mu2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½)`` between two Gaussians.

    Same algorithm as pytorch-fid's ``calculate_frechet_distance``: ``scipy.linalg.sqrtm`` of
    the product; if that is not finite, ``eps`` is added to both diagonals and the root is
    retaken; an imaginary part is dropped when the diagonal's is within 1e-3 of zero.

    Args:
      mu1: ``[D]`` mean of the first set.
      sigma1: ``[D, D]`` covariance of the first set.
      mu2: ``[D]`` mean of the second set.
      sigma2: ``[D, D]`` covariance of the second set.
      eps: diagonal offset for a singular product.

    Returns:
      The distance (float64; tiny negative values are possible from rounding).

    Raises:
      ValueError: on mismatched shapes, or a large imaginary component in the root.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1 = np.atleast_2d(sigma1).astype(np.float64)
    sigma2 = np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"statistics differ in size: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
            f"{sigma2.shape}; compute both with the same feature layer (2048-d pool)."
        )
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        logging.getLogger(__name__).warning(
            "FID: singular covariance product; adding %s to the diagonals", eps
        )
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"FID: imaginary component {np.max(np.abs(covmean.imag))} in sqrtm(Σ1 Σ2); the "
                "covariances are not positive semi-definite (use more samples than feature dims)."
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def features_from_batches(
    variables: dict,
    batches: Iterable[np.ndarray],
    batch_size: int,
    feature_fn: FeatureFn = inception_pool_features,
) -> np.ndarray:
    """Runs the feature network over uint8 batches, padding each to one compiled shape.

    Args:
      variables: Inception variables from :func:`~pdm_jax.models.inception.load_inception`.
      batches: iterable of ``[b, H, W, 3]`` uint8 arrays with ``b <= batch_size``.
      batch_size: batch every call is padded to (repeats of the last image), so each image
        size compiles once.
      feature_fn: ``(variables, [batch_size, H, W, 3] uint8) -> [batch_size, D]``.

    Returns:
      ``[N, D]`` float64 features, in input order.
    """
    out = []
    for batch in batches:
        batch = np.asarray(batch)
        n = batch.shape[0]
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3 or n > batch_size:
            raise ValueError(
                f"expected uint8 [b<={batch_size}, H, W, 3] batches, got {batch.dtype} "
                f"{batch.shape}; quantise images with np.round(x * 255).astype(np.uint8)."
            )
        if n == 0:
            continue
        padded = np.concatenate([batch, np.repeat(batch[-1:], batch_size - n, axis=0)])
        out.append(np.asarray(feature_fn(variables, padded), np.float64)[:n])  # [n, D]
    if not out:
        raise ValueError("no images given to compute FID features from.")
    return np.concatenate(out)


def stats_from_arrays(
    variables: dict,
    images: np.ndarray,
    batch_size: int = 50,
    feature_fn: FeatureFn = inception_pool_features,
) -> tuple[np.ndarray, np.ndarray]:
    """FID statistics of an array of images (e.g. generated samples).

    Args:
      variables: Inception variables.
      images: ``[N, H, W, 3]`` uint8 RGB, ``N >= 2``.
      batch_size: images per network call.
      feature_fn: feature network, see :func:`features_from_batches`.

    Returns:
      ``(mu [2048], sigma [2048, 2048])`` float64.
    """
    images = np.asarray(images)
    batches = (images[i : i + batch_size] for i in range(0, images.shape[0], batch_size))
    return feature_statistics(features_from_batches(variables, batches, batch_size, feature_fn))


def list_image_files(folder: str | pathlib.Path) -> list[pathlib.Path]:
    """Image files directly in ``folder``, sorted, with pytorch-fid's extensions."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"FID image folder {folder} does not exist.")
    return sorted(p for ext in IMAGE_EXTENSIONS for p in folder.glob(f"*.{ext}"))


def _folder_batches(files: list[pathlib.Path], batch_size: int) -> Iterator[np.ndarray]:
    # Consecutive images of one size share a batch (a folder of equal sizes batches exactly
    # as pytorch-fid's DataLoader does; mixed sizes, which it cannot collate, still work).
    batch: list[np.ndarray] = []
    for path in files:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"), np.uint8)  # [H, W, 3]
        if batch and (len(batch) == batch_size or arr.shape != batch[0].shape):
            yield np.stack(batch)
            batch = []
        batch.append(arr)
    if batch:
        yield np.stack(batch)


def stats_from_folder(
    variables: dict,
    folder: str | pathlib.Path,
    batch_size: int = 50,
    feature_fn: FeatureFn = inception_pool_features,
) -> tuple[np.ndarray, np.ndarray]:
    """FID statistics of the images in a folder (e.g. the reference set).

    Images are read with PIL, converted to RGB uint8 and given to the network unchanged: the
    only resize is the Inception's own 299×299 bilinear one, exactly as for generated images
    and as in pytorch-fid.

    Args:
      variables: Inception variables.
      folder: directory of images (``IMAGE_EXTENSIONS``, not recursive).
      batch_size: images per network call.
      feature_fn: feature network, see :func:`features_from_batches`.

    Returns:
      ``(mu [2048], sigma [2048, 2048])`` float64.
    """
    files = list_image_files(folder)
    if len(files) < 2:
        raise ValueError(f"{folder} holds {len(files)} images; FID statistics need at least 2.")
    features = features_from_batches(
        variables, _folder_batches(files, batch_size), batch_size, feature_fn
    )
    return feature_statistics(features)
