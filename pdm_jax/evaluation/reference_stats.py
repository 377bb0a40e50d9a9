r"""python -m pdm_jax.evaluation.reference_stats --inception=pt_inception-2015-12-05-6726825d.pth \
    --coco_dir=/data/coco --split=val --output=/data/fid_stats_coco_val2017_256.npz

FID reference statistics (``mu``, ``sigma`` of the 2048-d Inception pool features, as
:mod:`pdm_jax.evaluation.fid` computes them) written to an ``.npz`` that ``--mode=evaluate``
reads as ``eval.fid_stats`` (pytorch-fid reads it too).

Where the reference images come from (exactly one of):

* ``--coco_dir=ROOT``: the COCO 2017 images of ``--split`` that ``prepare_coco`` prepares
  (those with a panoptic annotation and captions, in image-id order), each centre-cropped to
  its short side and resized to 256×256 with PIL's Lanczos filter — the pixels whose VAE
  latents the model was trained on, at the size generated images have. The prepared
  ArrayRecord shards hold VAE moments, not pixels, so the raw ``<split>2017/`` folder and
  its annotations are read here.
* ``--images=FOLDER``: every image directly in ``FOLDER`` (pytorch-fid's extensions, sorted),
  given to the network as it is, as pytorch-fid does; ``--centre_crop=256`` applies the
  COCO crop and resize above first (e.g. for a folder without annotations).

Every image then goes through the network's own bilinear resize to 299×299, as generated
images do. The network runs on this host's devices (the batch is split over them).

``--inception`` is pytorch-fid's ``.pth`` checkpoint (reading it needs the ``torch``
extra) or an ``.npz`` holding the same state dict (name → array), which needs no torch:
``python -c "import numpy, torch; numpy.savez('inception.npz', **{k: v.numpy() for k, v in
torch.load('pt_inception-2015-12-05-6726825d.pth').items()})"``.
"""

import concurrent.futures
import os
from collections.abc import Callable, Iterable, Iterator, Sequence

import jax
import numpy as np
import tqdm
from absl import app, flags, logging
from PIL import Image

from pdm_jax import sharding
from pdm_jax.data.coco import panoptic as coco
from pdm_jax.evaluation import fid
from pdm_jax.models import inception
from pdm_jax.paths import resolve as resolve_path


def load_inception_variables(path: str) -> dict:
    """Reads Inception weights: pytorch-fid's ``.pth`` or an ``.npz`` of its state dict.

    Args:
      path: ``pt_inception-2015-12-05-6726825d.pth`` (needs torch) or an ``.npz`` with the
        same names (``Conv2d_1a_3x3.conv.weight``, ...).

    Returns:
      ``{'params', 'batch_stats'}`` for :class:`~pdm_jax.models.inception.InceptionV3`.

    Raises:
      FileNotFoundError: when the file does not exist.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Inception checkpoint {path} does not exist; pass pytorch-fid's "
            "pt_inception-2015-12-05-6726825d.pth or an .npz of its state dict."
        )
    if path.endswith(".npz"):
        with np.load(path) as f:
            return inception.convert_inception_state_dict({k: f[k] for k in f.files})
    return inception.load_inception(path)


class InceptionFeatures:
    """Pool features of uint8 image batches, each batch split over this host's devices."""

    def __init__(
        self,
        variables: dict,
        batch_size: int = 50,
        devices: Sequence[jax.Device] | None = None,
    ):
        """Args:
        variables: Inception variables (:func:`load_inception_variables`).
        batch_size: images per network call, rounded up to a multiple of the devices.
        devices: devices to run on (default: this host's).
        """
        devices = list(jax.local_devices() if devices is None else devices)
        self.mesh = sharding.create_mesh((len(devices),), (sharding.DATA_AXIS,), devices)
        self.batch_size = -(-int(batch_size) // len(devices)) * len(devices)
        self.variables = jax.device_put(variables, sharding.replicated(self.mesh))
        self._batch = sharding.batch_sharding(self.mesh)

    def _features(self, variables: dict, images: np.ndarray) -> jax.Array:
        return inception.inception_pool_features(variables, jax.device_put(images, self._batch))

    def __call__(self, batches: Iterable[np.ndarray]) -> np.ndarray:
        """Features of uint8 ``[b, H, W, 3]`` batches (``b <= batch_size``).

        Returns:
          ``[N, 2048]`` float64 features, in input order.
        """
        return fid.features_from_batches(self.variables, batches, self.batch_size, self._features)

    def of_arrays(self, images: np.ndarray) -> np.ndarray:
        """Features of uint8 ``[N, H, W, 3]`` images; returns ``[N, 2048]`` float64."""
        b = self.batch_size
        return self(images[i : i + b] for i in range(0, len(images), b))


def _ordered_map(fn: Callable, items: Sequence, num_threads: int) -> Iterator:
    """``map(fn, items)`` in threads, in order, with a bounded number in flight."""
    window = max(1, 4 * num_threads)
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        pending = [pool.submit(fn, item) for item in items[:window]]
        for i in range(len(items)):
            result = pending[i].result()
            pending[i] = None  # free the decoded image
            if i + window < len(items):
                pending.append(pool.submit(fn, items[i + window]))
            yield result


def _batched(images: Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive images of one shape, stacked into batches of at most ``batch_size``."""
    batch: list[np.ndarray] = []
    for image in images:
        if batch and (len(batch) == batch_size or image.shape != batch[0].shape):
            yield np.stack(batch)
            batch = []
        batch.append(image)
    if batch:
        yield np.stack(batch)


def coco_image_paths(coco_dir: str, split: str = "val") -> list[str]:
    """The image files of a COCO split that ``prepare_coco`` prepares, in image-id order.

    Args:
      coco_dir: COCO 2017 root (``<split>2017/`` and ``annotations/``).
      split: ``train`` or ``val``.

    Returns:
      Paths of the images with a panoptic annotation and captions.
    """
    folder = coco.split_paths(coco_dir, split)["images"]
    return [os.path.join(folder, e.file_name) for e in coco.build_index(coco_dir, split).entries]


def read_image(path: str, centre_crop: int = 0) -> np.ndarray:
    """One image as uint8 RGB ``[H, W, 3]``; ``centre_crop > 0``: COCO crop + Lanczos resize."""
    if centre_crop > 0:
        return coco.load_image(path, centre_crop)[0]
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), np.uint8)


def reference_statistics(
    extractor: InceptionFeatures,
    paths: Sequence[str],
    *,
    centre_crop: int = 0,
    num_threads: int = 8,
    show_progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """FID statistics of image files.

    Args:
      extractor: the feature network.
      paths: image files (at least 2).
      centre_crop: 0 to use images as they are, else the side of the COCO centre crop.
      num_threads: decoding threads.
      show_progress: draw a tqdm bar with an ETA.

    Returns:
      ``(mu [2048], sigma [2048, 2048])`` float64.
    """
    if len(paths) < 2:
        raise ValueError(f"FID statistics need at least 2 images, got {len(paths)}.")
    images = _ordered_map(lambda p: read_image(p, centre_crop), list(paths), num_threads)
    progress = tqdm.tqdm(images, total=len(paths), unit="img", disable=not show_progress)
    return fid.feature_statistics(extractor(_batched(progress, extractor.batch_size)))


def define_flags(flag_values: flags.FlagValues) -> None:
    """Defines the command's flags (only when run as a command: the names are common)."""
    fv = {"flag_values": flag_values}
    flags.DEFINE_string("inception", None, "pytorch-fid Inception .pth (or .npz of it).", **fv)
    flags.DEFINE_string("images", None, "A folder of reference images (used as they are).", **fv)
    flags.DEFINE_string("coco_dir", None, "COCO 2017 root: its split's images at 256.", **fv)
    flags.DEFINE_enum("split", "val", list(coco.SPLITS), "COCO split (with --coco_dir).", **fv)
    flags.DEFINE_integer("centre_crop", 0, "With --images: centre-crop, resize to this.", **fv)
    flags.DEFINE_string("output", None, "Where to write the statistics (.npz).", **fv)
    flags.DEFINE_integer("batch_size", 50, "Images per Inception call (rounded).", **fv)
    flags.DEFINE_integer("max_images", 0, "Use only the first N images (0: all).", **fv)
    flags.DEFINE_integer("num_threads", 8, "Image-decoding threads.", **fv)


def run(fv: flags.FlagValues) -> str:
    """Computes and writes the statistics named by parsed flags.

    Args:
      fv: flag values defined by :func:`define_flags` and parsed.

    Returns:
      The output path.

    Raises:
      app.UsageError: for a missing or contradictory source.
    """
    if not fv.inception or not fv.output:
        raise app.UsageError("--inception and --output are required.")
    for name in ("inception", "images", "coco_dir", "output"):  # relative, ~ or gs://
        setattr(fv, name, resolve_path(getattr(fv, name)))
    if bool(fv.images) == bool(fv.coco_dir):
        raise app.UsageError("Pass exactly one of --images=FOLDER and --coco_dir=COCO_ROOT.")
    if fv.coco_dir:
        paths, crop = coco_image_paths(fv.coco_dir, fv.split), coco.IMAGE_SIZE
    else:
        paths, crop = [str(p) for p in fid.list_image_files(fv.images)], fv.centre_crop
    if fv.max_images > 0:
        paths = paths[: fv.max_images]
    extractor = InceptionFeatures(load_inception_variables(fv.inception), fv.batch_size)
    mu, sigma = reference_statistics(extractor, paths, centre_crop=crop, num_threads=fv.num_threads)
    fid.save_stats(fv.output, mu, sigma)
    logging.info("Wrote FID statistics of %d images to %s", len(paths), fv.output)
    return fv.output


def main(argv: Sequence[str]) -> None:
    """Runs the command with the global flags."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    run(flags.FLAGS)


if __name__ == "__main__":
    define_flags(flags.FLAGS)
    app.run(main)
