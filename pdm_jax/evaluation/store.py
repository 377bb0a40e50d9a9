"""Evaluation's resumable sample store: one PNG per sample, written once, never regenerated.

``settings.json`` records what the samples depend on; a later run with other settings is
refused, and a run with more samples only samples the new indices. The given-image task
writes the generated map only (its PNG text holds the caption); the inpainting task's map
PNG also records the largest change of a known latent and map pixel
(``known_latent_max_abs_diff``, ``known_map_max_abs_diff``).
"""

import json
import time
from typing import Any

import jax
import numpy as np
import tqdm
from etils import epath
from PIL import Image, PngImagePlugin

from pdm_jax import specs
from pdm_jax.data.schema import DatasetInfo
from pdm_jax.evaluation.prompts import inpaint_mask, upscale_mask
from pdm_jax.sampling.sampler import Sampler, host_indices

MAP_TASKS = ("cogenerate", "given_image", "inpaint")  # tasks that generate a map


def has_generated_maps(config: specs.RunSpec, ev: specs.EvalSpec) -> bool:
    """Whether the samples include a generated map (a PDM cogenerating, segmenting or
    inpainting)."""
    return config.model.has_map and ev.task in MAP_TASKS


def has_generated_images(ev: specs.EvalSpec) -> bool:
    """Whether the samples include a generated image (all tasks but ``given_image``)."""
    return ev.task != "given_image"


def sample_name(i: int, suffix: str = "") -> str:
    """File name of sample ``i`` (``suffix="_map"``: its generated map)."""
    return f"{i:06d}{suffix}.png"


def write_png(path: epath.Path, array: np.ndarray, text: dict[str, str]) -> None:
    """Writes a PNG atomically (temporary name, then rename) with iTXt entries."""
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_itxt(key, value)
    tmp = path.parent / f"{path.name}.tmp"
    with tmp.open("wb") as f:
        Image.fromarray(array).save(f, format="PNG", pnginfo=info)
    tmp.replace(path)


def read_png(path: epath.Path) -> tuple[np.ndarray, dict[str, str]]:
    """A PNG's pixels and its text entries."""
    with path.open("rb") as f, Image.open(f) as img:
        img.load()
        return np.asarray(img), dict(img.text)


def check_settings(samples_dir: epath.Path, settings: dict[str, Any]) -> None:
    """Writes ``settings.json`` or checks that existing samples were made the same way."""
    path = samples_dir / "settings.json"
    settings = json.loads(json.dumps(settings))
    if path.exists():
        found = json.loads(path.read_text())
        diff = sorted(k for k in settings.keys() | found.keys() if found.get(k) != settings.get(k))
        if diff:
            raise ValueError(
                f"{samples_dir} holds samples made with other settings ({', '.join(diff)} "
                f"differ: {[found.get(k) for k in diff]} vs {[settings.get(k) for k in diff]}). "
                "Delete that directory or evaluate in another workdir."
            )
    elif jax.process_index() == 0:
        samples_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=2))


def done_indices(samples_dir: epath.Path, needs_map: bool, needs_image: bool = True) -> set[int]:
    """Indices whose files are complete (the image, when there is one, is written last)."""
    names = {p.name for p in samples_dir.iterdir()} if samples_dir.exists() else set()
    if not needs_image:
        maps = {n[: -len("_map.png")] for n in names if n.endswith("_map.png")}
        return {int(n) for n in maps if n.isdigit()}
    images = {int(n[:-4]) for n in names if n.endswith(".png") and n[:-4].isdigit()}
    return {i for i in images if not needs_map or sample_name(i, "_map") in names}


def task_inputs(
    ev: specs.EvalSpec, batch_prompts: list[Any], indices: list[int], latent_side: int
) -> dict[str, np.ndarray | None]:
    """The known inputs and masks of a batch for ``ev.task`` (``Sampler`` keywords).

    ``given_map``: the ground-truth maps; ``given_image``: the reference latents;
    ``inpaint``: both, with the box of ``prompts.inpaint_mask`` regenerated in the latent
    and in the map (1 = known in the masks).
    """
    known = dict(known_latents=None, known_maps=None, mask_x=None, mask_m=None)
    if ev.task in ("given_map", "inpaint"):
        known["known_maps"] = np.stack([p.map for p in batch_prompts])  # [B, M, M]
    if ev.task in ("given_image", "inpaint"):
        known["known_latents"] = np.stack([p.latent for p in batch_prompts])  # [B, S, S, C]
    if ev.task == "inpaint":
        boxes = np.stack(
            [inpaint_mask(ev.seed, i, latent_side, ev.mask_fraction) for i in indices]
        )  # [B, S, S]
        map_side = known["known_maps"].shape[-1]
        known["mask_x"] = (~boxes).astype(np.float32)[..., None]
        known["mask_m"] = (~upscale_mask(boxes, map_side)).astype(np.float32)[..., None]
    return known


def known_region_error(out: Any, known: dict[str, np.ndarray | None], j: int) -> dict[str, str]:
    """PNG text entries of sample ``j``: max |generated − known| over its known region."""
    keep_x, keep_m = known["mask_x"][j, ..., 0] > 0, known["mask_m"][j, ..., 0] > 0
    dx = np.abs(out.latents[j] - known["known_latents"][j])[keep_x]
    dm = np.abs(out.maps[j].astype(np.int64) - known["known_maps"][j])[keep_m]
    return {
        "known_latent_max_abs_diff": repr(float(dx.max(initial=0.0))),
        "known_map_max_abs_diff": str(int(dm.max(initial=0))),
    }


def generate_samples(
    config: specs.RunSpec,
    ev: specs.EvalSpec,
    prompts: Any,
    info: DatasetInfo,
    params: Any,
    samples_dir: epath.Path,
) -> tuple[int, float]:
    """Samples this process's missing indices into ``samples_dir``.

    Args:
      config: the run's spec.
      ev: the ``eval`` settings (``eval_settings``).
      prompts: ``SyntheticPrompts`` or ``CocoPrompts``.
      info: the dataset's codecs (``decode_latents``, ``empty_context``, categories).
      params: host parameters.
      samples_dir: where the sample files go.

    Returns:
      ``(number generated, seconds)``.
    """
    needs_map, needs_image = has_generated_maps(config, ev), has_generated_images(ev)
    mine = host_indices(ev.num_samples, jax.process_index(), jax.process_count())
    done = done_indices(samples_dir, needs_map, needs_image)
    todo = [i for i in mine if i not in done]
    if not todo:
        return 0, 0.0
    samples_dir.mkdir(parents=True, exist_ok=True)
    sampler = Sampler.for_run(config, info, params, batch_size=ev.batch_size)
    t0 = time.perf_counter()
    desc = f"sampling ({ev.task})" + (
        f" process {jax.process_index()}" if jax.process_count() > 1 else ""
    )
    with tqdm.tqdm(total=len(todo), unit="sample", desc=desc) as progress:
        for lo in range(0, len(todo), sampler.batch_size):
            indices = todo[lo : lo + sampler.batch_size]
            batch_prompts = [prompts[i] for i in indices]
            known = task_inputs(ev, batch_prompts, indices, config.model.img_size)
            out = sampler(
                [ev.seed + i for i in indices],
                contexts=np.stack([p.context for p in batch_prompts]),  # [B, T, D]
                task=ev.task,
                decode_images=needs_image,
                **known,
            )
            for j, i in enumerate(indices):
                caption = {"caption": batch_prompts[j].caption}
                if needs_map:
                    ids = out.maps[j].astype(np.uint8)  # ids <= 200
                    text = {"invalid_pixels": str(int(out.num_invalid[j]))}
                    if ev.task == "inpaint":
                        text.update(known_region_error(out, known, j))
                    if not needs_image:
                        text.update(caption)
                    write_png(samples_dir / sample_name(i, "_map"), ids, text)
                if needs_image:
                    write_png(samples_dir / sample_name(i), out.images[j], caption)
            progress.update(len(indices))
    return len(todo), time.perf_counter() - t0
