r"""python -m pdm_jax.main --config=configs/pdm.py:demo --workdir=workdir/demo --mode=sample

Sample mode: loads the latest (or ``sample.step``) checkpoint's EMA parameters and samples
prompts with the configured DPM-Solver++ (``config.sampler``: steps, order, method, skip
type, CFG scale, task). Tasks: ``cogenerate``; ``given_map`` (``sample.map``: a ``.npy`` of
ids or a PNG); ``given_image`` (``sample.image``, an RGB PNG); ``inpaint`` (``sample.mask``,
white = regenerate, with ``sample.image`` and/or ``sample.map`` as the known content).

COCO configs decode latents with the VAE of ``data.vae`` (``--vae``) and encode raw prompts
with the CLIP text encoder of ``data.clip`` (``--text_encoder``); with ``data.dir`` unset,
those two and the checkpoint are all that sampling reads (the unconditional context is
CLIP's encoding of ``""``, as in prepared data).

Per sample it writes ``NNN_image.png``, ``NNN_map.png`` (coloured, with a legend of the
category names), ``NNN_map.npy`` (raw ids), and for the run ``grid.png`` and
``samples.json`` (captions, seeds, files). Sample ``j`` of every prompt uses
``jax.random.key(sample.seed + j)``, so a sample does not depend on the batching.
"""

import dataclasses
import functools
import json
import logging
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from PIL import Image

from pdm_jax import checkpointing, models, visualize
from pdm_jax.data import pipeline
from pdm_jax.diffusion import analog_bits, maps
from pdm_jax.diffusion.reverse import (
    TASKS,
    SamplerOptions,
    from_data_prediction,
    sample_pdm,
    to_data_prediction,
)
from pdm_jax.train import step as step_lib


@dataclasses.dataclass(frozen=True)
class Samples:
    """Decoded samples of one batch (host arrays)."""

    latents: np.ndarray  # [B, S, S, C]
    images: np.ndarray  # uint8 [B, H, W, 3]
    maps: np.ndarray | None  # int32 [B, fS, fS]
    num_invalid: np.ndarray | None  # [B] map pixels that decoded outside the category table


class Sampler:
    """Jitted sampling of fixed-size batches for one task, with per-example seeds."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        info: pipeline.DatasetInfo,
        *,
        task: str | None = None,
        batch_size: int = 16,
    ):
        """Args:
        config: the full config (``model``, ``diffusion``, ``sampler``).
        info: the dataset's codecs and category table.
        task: one of ``TASKS`` (default ``config.sampler.task``).
        batch_size: examples per compiled call (shorter batches are padded).
        """
        task = task or config.sampler.task
        if task not in TASKS:
            raise ValueError(f"Unknown sampler task {task!r}; choose one of {TASKS}.")
        m = config.model
        self.task, self.batch_size, self.info = task, batch_size, info
        self.has_map = m.name != "uvit"
        self.map_side = int(m.img_size * m.map_patch_factor)
        self.num_bits = int(m.num_bits)
        self.valid_ids = np.asarray(sorted(info.category_names), np.int64)
        key = json.dumps(
            {k: config[k].to_dict() for k in ("model", "diffusion", "sampler")}, sort_keys=True
        )
        self._fn = _compiled_sampler(key, task)

    def __call__(
        self,
        params: Any,
        captions: Sequence[str],
        seeds: Sequence[int],
        *,
        known_latents: np.ndarray | None = None,
        known_maps: np.ndarray | None = None,
        mask_x: np.ndarray | None = None,
        mask_m: np.ndarray | None = None,
    ) -> Samples:
        """Samples one example per caption.

        Args:
          params: model parameters (EMA ones for sampling).
          captions: B captions.
          seeds: B seeds (example i starts from ``jax.random.key(seeds[i])``).
          known_latents: float [B, S, S, C] clean latents (given_image, inpaint).
          known_maps: int [B, fS, fS] ids (given_map, inpaint).
          mask_x, mask_m: inpainting masks [B, S, S, 1] / [B, fS, fS, 1], 1 = known.

        Returns:
          The decoded ``Samples``.
        """
        n = len(captions)
        if len(seeds) != n:
            raise ValueError(f"Got {n} captions but {len(seeds)} seeds.")
        out = []
        for lo in range(0, n, self.batch_size):
            sl = slice(lo, min(n, lo + self.batch_size))
            out.append(
                self._batch(
                    params,
                    captions[sl],
                    seeds[sl],
                    *(None if a is None else a[sl] for a in (known_latents, known_maps)),
                    *(None if a is None else a[sl] for a in (mask_x, mask_m)),
                )
            )
        cat = lambda k: (
            None if getattr(out[0], k) is None else np.concatenate([getattr(o, k) for o in out])
        )
        return Samples(*(cat(k) for k in ("latents", "images", "maps", "num_invalid")))

    def _batch(self, params, captions, seeds, known_latents, known_maps, mask_x, mask_m):
        n, pad = len(captions), self.batch_size - len(captions)

        def padded(a, dtype=np.float32):
            if a is None:
                return None
            a = np.asarray(a, dtype)
            return np.concatenate([a, np.repeat(a[-1:], pad, axis=0)]) if pad else a

        context = padded(self.info.encode_text(list(captions)))
        rngs = jax.vmap(jax.random.key)(jnp.asarray(padded(np.asarray(seeds), np.uint32)))
        known_m = None
        if known_maps is not None:
            known_m = analog_bits.ids_to_bits(padded(known_maps, np.int32), self.num_bits)
        result = self._fn(
            params,
            rngs,
            context,
            jnp.asarray(self.info.empty_context),
            padded(known_latents),
            known_m,
            padded(mask_x),
            padded(mask_m),
        )
        latents = np.asarray(jax.device_get(result["x"]))[:n]
        ids = invalid = None
        if self.has_map:
            ids, invalid = jax.vmap(
                lambda b: analog_bits.decode_map(b, self.valid_ids, self.num_bits)
            )(result["m"])
            ids = np.asarray(ids)[:n].astype(np.int32)
            invalid = np.asarray(invalid)[:n]
        return Samples(latents, self.info.decode_latents(latents), ids, invalid)


def clipped_denoiser(denoise, schedule, bound: float, has_map: bool, image_prediction: str = "eps"):
    """Wraps a denoiser so that its image data prediction lies in ``[-bound, bound]``.

    ``x̂_0 = (x_t − σ_t ε̂)/α_t`` (or ``α_t x_t − σ_t v̂``) is clipped and turned back into
    ``ε̂' = (x_t − α_t clip(x̂_0))/σ_t`` (or ``v̂' = (α_t x_t − clip(x̂_0))/σ_t``; DDPM's
    ``clip_denoised``): for bounded latents
    such as the synthetic world's pixels, it keeps an imperfect model's early, noisy
    predictions (amplified by σ/α ≈ 15 at t = 1) from leaving the data range.

    Args:
      denoise: ``(params, x_t, m_t, t_model, context)`` → ε̂ or ``(ε̂, M̂_0)``.
      schedule: the sampling schedule (``t_model = t · N``).
      bound: the clip value.
      has_map: whether ``denoise`` returns a map prediction too.
      image_prediction: the network's image output: ``"eps"``, ``"v"`` or ``"x0"``.

    Returns:
      A denoiser with the same signature and outputs.
    """

    def wrapped(params, x_t, m_t, t_model, context):
        out = denoise(params, x_t, m_t, t_model, context)
        img = out[0] if has_map else out
        t = (t_model / schedule.num_timesteps).reshape(-1, *(1,) * (x_t.ndim - 1))
        alpha, sigma = schedule.marginal_alpha(t), schedule.marginal_std(t)
        x0 = to_data_prediction(img, x_t, alpha, sigma, image_prediction)
        x0 = jnp.clip(x0, -bound, bound)
        clipped = from_data_prediction(x0, x_t, alpha, sigma, image_prediction).astype(img.dtype)
        return (clipped, *out[1:]) if has_map else clipped

    return wrapped


def sampling_denoiser(c: ml_collections.ConfigDict):
    """``(denoise, schedule)``: the network as every sampler sees it (``sampler.clip_x0``).

    Sample mode, the training grids, the demo metrics and evaluation all build their
    sampler from this, so the same seed gives the same sample everywhere.
    """
    schedule = step_lib.schedule_from_config(c.diffusion)
    denoise = step_lib.make_denoise_fn(c.model)
    if c.sampler.get("clip_x0", 0.0) > 0:
        has_map = c.model.name != "uvit"
        denoise = clipped_denoiser(
            denoise,
            schedule,
            float(c.sampler.clip_x0),
            has_map,
            c.diffusion.image_prediction,
        )
    return denoise, schedule


def configured_sampler(
    c: ml_collections.ConfigDict, task: str = "cogenerate", options: SamplerOptions | None = None
):
    """``sample_pdm`` bound to the configured network, schedule, shapes and solver.

    Args:
      c: the full config (``model``, ``diffusion``, ``sampler``).
      task: sampling task (``diffusion.sampling.TASKS``).
      options: solver settings; default ``SamplerOptions.from_config(c.sampler)``.

    Returns:
      ``(params, rng, context, empty_context, **known/masks) -> {"x", "m"?}``.
    """
    m = c.model
    map_side = int(m.img_size * m.map_patch_factor)
    denoise, schedule = sampling_denoiser(c)
    return functools.partial(
        sample_pdm,
        denoise,
        schedule=schedule,
        image_shape=(m.img_size, m.img_size, m.in_chans),
        map_shape=(map_side, map_side, m.num_bits) if m.name != "uvit" else None,
        options=options or SamplerOptions.from_config(c.sampler),
        map_noise_std=c.diffusion.map_noise_std,
        image_prediction=c.diffusion.image_prediction,
        task=task,
    )


@functools.lru_cache(maxsize=16)
def _compiled_sampler(key: str, task: str):
    """The jitted, per-example-seeded sampler of one (model, diffusion, sampler) config.

    Cached so the trainer's sample grids, the demo metrics and sample mode share compiled
    programs (one per batch shape) within a process.
    """
    sample_fn = configured_sampler(ml_collections.ConfigDict(json.loads(key)), task)

    def one(params, rng, context, empty, known_x, known_m, mask_x, mask_m):
        add = lambda a: None if a is None else a[None]
        out = sample_fn(
            params,
            rng,
            context[None],
            empty,
            known_x=add(known_x),
            known_m=add(known_m),
            mask_x=add(mask_x),
            mask_m=add(mask_m),
        )
        return jax.tree.map(lambda a: a[0], out)

    return jax.jit(jax.vmap(one, in_axes=(None, 0, 0, None, 0, 0, 0, 0)))


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


def read_prompts(config: ml_collections.ConfigDict, info: pipeline.DatasetInfo) -> list[str]:
    """``sample.prompt``, else the lines of ``sample.prompts_file``, else the eval prompts."""
    s = config.sample
    if s.prompt:
        return [s.prompt]
    if s.prompts_file:
        p = epath.Path(s.prompts_file)
        if not p.exists():
            raise FileNotFoundError(
                f"Prompts file {p} does not exist (--config.sample.prompts_file)."
            )
        prompts = [line.strip() for line in p.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"Prompts file {p} has no non-empty lines.")
        return prompts
    if not info.eval_prompts:
        raise ValueError(
            "No prompts: pass --config.sample.prompt or --config.sample.prompts_file (without "
            "--config.data.dir there are no dataset prompts to fall back on)."
        )
    logging.info("No sample.prompt or sample.prompts_file: using the dataset's eval prompts.")
    return list(info.eval_prompts)


def dataset_info(config: ml_collections.ConfigDict) -> pipeline.DatasetInfo:
    """The codecs and unconditional context sample mode uses.

    Those of the configured dataset's train split; for COCO without ``data.dir``, those of
    the encoders alone (``coco_info.encoder_info``): a converted checkpoint, the VAE and the
    CLIP text encoder are all sampling needs.
    """
    if config.data.source == "coco" and not config.data.dir:
        from pdm_jax.data.coco import dataset as coco_info

        return coco_info.encoder_info(config)
    return pipeline.create_source(config, "train")[1]


def _known_inputs(config, info, sampler: Sampler, n: int) -> dict[str, np.ndarray | None]:
    """Given maps/images/masks of the task, repeated for ``n`` samples."""
    s, m, task = config.sample, config.model, sampler.task
    known = dict(known_latents=None, known_maps=None, mask_x=None, mask_m=None)
    rep = lambda a: np.repeat(a[None], n, axis=0)
    if task in ("given_map", "inpaint") and s.map:
        known["known_maps"] = rep(load_map(s.map, sampler.map_side, info.colour_table))
    if task in ("given_image", "inpaint") and s.image:
        known["known_latents"] = rep(info.encode_images(load_image(s.image)[None])[0])
    if task == "given_map" and known["known_maps"] is None:
        raise ValueError("task=given_map needs --config.sample.map (a .npy of ids or a PNG).")
    if task == "given_image" and known["known_latents"] is None:
        raise ValueError("task=given_image needs --config.sample.image (an RGB PNG).")
    if task == "inpaint":
        if not s.mask:
            raise ValueError("task=inpaint needs --config.sample.mask (white = regenerate).")
        if known["known_latents"] is None and known["known_maps"] is None:
            raise ValueError("task=inpaint needs --config.sample.image and/or --config.sample.map.")
        if known["known_latents"] is not None:
            known["mask_x"] = rep(load_mask(s.mask, int(m.img_size)))
        if known["known_maps"] is not None:
            known["mask_m"] = rep(load_mask(s.mask, sampler.map_side))
    return known


def load_sampling_params(config: ml_collections.ConfigDict, workdir: str) -> tuple[Any, int]:
    """EMA (or raw) parameters of the workdir's latest or ``sample.step`` checkpoint.

    Raises:
      CheckpointNotFoundError: naming the directory looked in.
      ConfigMismatchError: listing mismatched parameter paths and shapes.
      CorruptCheckpointError: the step cannot be read (names the ``sample.step`` to use).
    """
    step = None if config.sample.step < 0 else int(config.sample.step)
    root, step = checkpointing.locate(checkpointing.checkpoint_dir(workdir), step)
    params, where = checkpointing.load_params(
        root / str(step),
        use_ema=config.sample.use_ema,
        fix="Rerun with --config.sample.step={step}",
    )
    lines = checkpointing.param_mismatches(params, models.abstract_params(config.model))
    if lines:
        raise checkpointing.mismatch_error(where, lines, config.model.name)
    return params, step


def run(config: ml_collections.ConfigDict, workdir: str) -> epath.Path:
    """Sample mode (see the module docstring).

    Args:
      config: the full config.
      workdir: the training run's directory.

    Returns:
      The output directory.
    """
    params, step = load_sampling_params(config, workdir)
    info = dataset_info(config)
    prompts = read_prompts(config, info)
    s = config.sample
    captions = [p for p in prompts for _ in range(s.num_samples)]
    seeds = [s.seed + j for _ in prompts for j in range(s.num_samples)]
    sampler = Sampler(config, info, batch_size=min(s.batch_size, len(captions)))
    known = _known_inputs(config, info, sampler, len(captions))
    samples = sampler(params, captions, seeds, **known)
    out = epath.Path(s.out_dir or epath.Path(workdir) / f"sample_{sampler.task}_step{step}")
    out.mkdir(parents=True, exist_ok=True)
    size = max(256, samples.images.shape[1])
    records = []
    for k, (caption, seed) in enumerate(zip(captions, seeds, strict=True)):
        rec = {"caption": caption, "seed": seed, "image": f"{k:03d}_image.png"}
        visualize.save_png(out / rec["image"], visualize.upscale(samples.images[k], size))
        if samples.maps is not None:
            rec.update(map=f"{k:03d}_map.png", ids=f"{k:03d}_map.npy")
            rec["invalid_pixels"] = int(samples.num_invalid[k])
            panel = visualize.map_with_legend(
                samples.maps[k], info.category_names, info.colour_table, size=size
            )
            visualize.save_png(out / rec["map"], panel)
            np.save(out / rec["ids"], samples.maps[k])
        records.append(rec)
    grid = visualize.sample_grid(
        captions, samples.images, samples.maps, info.category_names, info.colour_table
    )
    visualize.save_png(out / "grid.png", grid)
    meta = {
        "step": step,
        "task": sampler.task,
        "sampler": config.sampler.to_dict(),
        "samples": records,
    }
    (out / "samples.json").write_text(json.dumps(meta, indent=2))
    logging.info("Wrote %d samples to %s", len(records), out)
    return out
