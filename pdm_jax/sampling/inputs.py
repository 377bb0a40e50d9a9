"""Sample mode's inputs: prompts, and the given maps, images and masks of the tasks."""

import logging

import numpy as np
from etils import epath
from PIL import Image

from pdm_jax import visualize
from pdm_jax.data.schema import DatasetInfo
from pdm_jax.diffusion import maps, reverse
from pdm_jax.models.spec import ModelSpec
from pdm_jax.specs import ConfigError, SampleSpec


def load_map(path: str, size: int, colour_table: np.ndarray) -> np.ndarray:
    """Reads a category map: ``.npy`` ids, a grey/palette PNG of ids, or a colour PNG.

    Args:
      path: the file.
      size: the model's map side (maps are brought there with ``maps.map_to_resolution``).
      colour_table: uint8 [256, 3]; colour PNGs must use exactly these colours.

    Returns:
      int32 [size, size] ids.
    """
    p = epath.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"Map file {p} does not exist (--config.sample.map).")
    if p.suffix == ".npy":
        ids = np.load(p)
    else:
        with p.open("rb") as f:
            img = Image.open(f)
            img.load()
        if img.mode in ("L", "P", "I", "I;16"):
            ids = np.asarray(img if img.mode != "P" else img.convert("L")).astype(np.int32)
        else:
            rgb = np.asarray(img.convert("RGB")).astype(np.int32)
            codes = rgb @ np.array([65536, 256, 1])
            table = np.asarray(colour_table).astype(np.int32) @ np.array([65536, 256, 1])
            lookup = {int(c): i for i, c in reversed(list(enumerate(table)))}
            unknown = sorted({int(c) for c in np.unique(codes)} - lookup.keys())
            if unknown:
                raise ValueError(
                    f"{p} has colours outside the category table (e.g. #{unknown[0]:06x}); "
                    "give a .npy of ids or a greyscale PNG whose values are category ids."
                )
            ids = np.vectorize(lookup.__getitem__)(codes)
    ids = np.asarray(ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{p}: expected an integer [H, W] id map, got {ids.dtype} {ids.shape}.")
    return maps.map_to_resolution(ids.astype(np.int32), size)


def load_image(path: str) -> np.ndarray:
    """Reads an RGB PNG/JPEG as uint8 [H, W, 3]."""
    p = epath.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"Image file {p} does not exist (--config.sample.image).")
    with p.open("rb") as f:
        return np.asarray(Image.open(f).convert("RGB"))


def load_mask(path: str, size: int) -> np.ndarray:
    """Reads an inpainting mask (white = regenerate) as float32 [size, size, 1], 1 = known."""
    p = epath.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"Mask file {p} does not exist (--config.sample.mask).")
    with p.open("rb") as f:
        grey = np.asarray(Image.open(f).convert("L"))
    regenerate = visualize.upscale(grey, size) >= 128
    return (~regenerate).astype(np.float32)[..., None]


def read_prompts(s: SampleSpec, info: DatasetInfo) -> list[str]:
    """``sample.prompt``, else the lines of ``sample.prompts_file``, else the eval prompts."""
    if s.prompt:
        return [s.prompt]
    if s.prompts_file:
        p = epath.Path(s.prompts_file)
        if not p.exists():
            raise FileNotFoundError(
                f"Prompts file {p} does not exist (--config.sample.prompts_file)."
            )
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(
                f"Prompts file {p} is not UTF-8 text: pass a text file with one caption per "
                "line as --config.sample.prompts_file."
            ) from None
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise ConfigError(
                f"Prompts file {p} has no non-empty lines: put one caption per line in it "
                "(--config.sample.prompts_file)."
            )
        return prompts
    if not info.eval_prompts:
        raise ConfigError(
            "No prompts: pass --config.sample.prompt or --config.sample.prompts_file (without "
            "--config.data.dir there are no dataset prompts to fall back on)."
        )
    logging.info("No sample.prompt or sample.prompts_file: using the dataset's eval prompts.")
    return list(info.eval_prompts)


# The ``sample.*`` inputs each task reads.
TASK_INPUTS = {
    "cogenerate": (),
    "given_map": ("map",),
    "given_image": ("image",),
    "inpaint": ("map", "image", "mask"),
}


def check_task(task: str, model: ModelSpec, sample: SampleSpec | None = None) -> None:
    """The one check of a sampling task: ``task`` is known, the model has the map stream
    that every task but ``cogenerate`` works on, and (given ``sample``) the ``sample.*``
    inputs it reads are set and none that it would ignore (``check_task_inputs``).

    Args:
      task: ``sampler.task``.
      model: the model to sample.
      sample: ``config.sample``, the task's inputs; None: not checked.

    Raises:
      ValueError: naming the flag that fixes the problem.
    """
    reverse.check_task(task, model.has_map, model.name)
    if sample is not None:
        check_task_inputs(sample, task)


def check_task_inputs(s: SampleSpec, task: str) -> None:
    """The ``sample.*`` flags that ``task`` needs are set, and none that it would ignore
    (their files are read later).

    Raises:
      ValueError: naming the missing or unused flag.
    """
    read = TASK_INPUTS.get(task, ("map", "image", "mask"))  # an unknown task: refused elsewhere
    unused = [f for f in ("map", "image", "mask") if getattr(s, f) and f not in read]
    if unused:
        users = sorted(t for t, fields in TASK_INPUTS.items() if unused[0] in fields)
        raise ValueError(
            f"sample.{unused[0]} is set but task={task} does not read it: pass "
            f"--config.sampler.task= one of {users}, or drop --config.sample.{unused[0]}."
        )
    if task == "given_map" and not s.map:
        raise ValueError("task=given_map needs --config.sample.map (a .npy of ids or a PNG).")
    if task == "given_image" and not s.image:
        raise ValueError("task=given_image needs --config.sample.image (an RGB PNG).")
    if task == "inpaint":
        if not s.mask:
            raise ValueError("task=inpaint needs --config.sample.mask (white = regenerate).")
        if not (s.image or s.map):
            raise ValueError("task=inpaint needs --config.sample.image and/or --config.sample.map.")


def known_inputs(
    s: SampleSpec, info: DatasetInfo, task: str, latent_size: int, map_size: int, n: int
) -> dict[str, np.ndarray | None]:
    """The task's given maps/images/masks (``sample.map/image/mask``), repeated ``n`` times.

    Raises:
      ValueError: when the task lacks an input it needs (naming the flag).
    """
    check_task_inputs(s, task)
    known = dict(known_latents=None, known_maps=None, mask_x=None, mask_m=None)
    rep = lambda a: np.repeat(a[None], n, axis=0)
    if task in ("given_map", "inpaint") and s.map:
        known["known_maps"] = rep(load_map(s.map, map_size, info.colour_table))
    if task in ("given_image", "inpaint") and s.image:
        known["known_latents"] = rep(info.encode_images(load_image(s.image)[None])[0])
    if task == "inpaint":
        if known["known_latents"] is not None:
            known["mask_x"] = rep(load_mask(s.mask, latent_size))
        if known["known_maps"] is not None:
            known["mask_m"] = rep(load_mask(s.mask, map_size))
    return known
