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

With several processes (``--distributed``), each samples a contiguous slice of the samples
on its own devices and writes their files; process 0 writes ``grid.png`` and
``samples.json`` of all of them.
"""

import dataclasses
import json
import logging
from typing import Any

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from pdm_jax import specs, visualize
from pdm_jax.data import pipeline
from pdm_jax.data.coco import dataset as coco_dataset
from pdm_jax.data.schema import DatasetInfo, DataSpec
from pdm_jax.sampling import inputs
from pdm_jax.sampling.params import load_params
from pdm_jax.sampling.sampler import Sampler, Samples, host_indices


def dataset_info(data: DataSpec) -> DatasetInfo:
    """The codecs and unconditional context sample mode uses.

    Those of the configured dataset's train split; for COCO without ``data.dir``, those of
    the encoders alone (``coco.dataset.encoder_info``): a converted checkpoint, the VAE and
    the CLIP text encoder are all sampling needs.
    """
    if data.source == "coco" and not data.dir:
        return coco_dataset.encoder_info(data)
    return pipeline.create_source(data, "train")[1]


def make_output_dir(out: epath.Path) -> None:
    """Creates sample mode's output folder, or refuses in one line.

    Raises:
      specs.ConfigError: the folder cannot be created or written (naming the flag).
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_check_{jax.process_index()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise specs.ConfigError(
            f"The sample output folder {out} cannot be written ({e.strerror or e}): pass a "
            "writable --config.sample.out_dir (or a writable --workdir)."
        ) from None


def _gather(samples: Samples, n: int) -> Samples:
    """Every process's slice of the ``n`` samples (``host_indices``), in order, on every process."""
    if jax.process_count() == 1:
        return samples
    rows = -(-n // jax.process_count())  # the largest slice

    def gather(a: np.ndarray | None) -> np.ndarray | None:
        if a is None:
            return None
        padded = np.concatenate([a, np.zeros((rows - len(a), *a.shape[1:]), a.dtype)])
        every = np.asarray(multihost_utils.process_allgather(padded))  # [P, rows, ...]
        sizes = [len(host_indices(n, p, jax.process_count())) for p in range(len(every))]
        return np.concatenate([part[:size] for part, size in zip(every, sizes, strict=True)])

    return Samples(
        latents=gather(samples.latents),
        images=gather(samples.images),
        maps=gather(samples.maps),
        num_invalid=gather(samples.num_invalid),
    )


def run(config: Any, workdir: str) -> epath.Path:
    """Sample mode (see the module docstring).

    Args:
      config: the run's ``RunSpec`` (or the ``ConfigDict`` it is made from).
      workdir: the training run's directory.

    Returns:
      The output directory.
    """
    run_spec = specs.as_run_spec(config)
    s, model, task = run_spec.sample, run_spec.model, run_spec.sampler.task
    # Everything the user passed is read, and the output folder made, before the
    # checkpoint loads and sampling starts: a bad input costs seconds, not the samples.
    info = dataset_info(run_spec.data)
    prompts = inputs.read_prompts(s, info)
    captions = [p for p in prompts for _ in range(s.num_samples)]
    seeds = [s.seed + j for _ in prompts for j in range(s.num_samples)]
    n, count = len(captions), jax.process_count()
    if n < count:
        raise ValueError(
            f"Sample mode splits its {n} sample(s) over the {count} processes, one at least "
            "each: pass more prompts or a larger --config.sample.num_samples."
        )
    mine = host_indices(n, jax.process_index(), count)  # each process samples its slice
    known = inputs.known_inputs(s, info, task, model.img_size, model.map_size, len(mine))
    params, step = load_params(workdir, s.step, s.use_ema, model, step_flag="--config.sample.step")
    out = epath.Path(s.out_dir or epath.Path(workdir) / f"sample_{task}_step{step}")
    make_output_dir(out)
    sampler = Sampler.for_run(run_spec, info, params, batch_size=min(s.batch_size, len(mine)))
    samples = sampler(
        [seeds[i] for i in mine], captions=[captions[i] for i in mine], task=task, **known
    )
    size = max(256, samples.images.shape[1])
    for j, k in enumerate(mine):
        visualize.save_png(out / f"{k:03d}_image.png", visualize.upscale(samples.images[j], size))
        if samples.maps is not None:
            panel = visualize.map_with_legend(
                samples.maps[j], info.category_names, info.colour_table, size=size
            )
            visualize.save_png(out / f"{k:03d}_map.png", panel)
            np.save(out / f"{k:03d}_map.npy", samples.maps[j])
    logging.info(
        "Process %d of %d wrote samples %d..%d to %s",
        jax.process_index(),
        count,
        mine[0],
        mine[-1],
        out,
    )
    samples = _gather(samples, n)
    if jax.process_index() != 0:
        return out  # process 0 writes the grid and the index of every process's files
    records = []
    for k, (caption, seed) in enumerate(zip(captions, seeds, strict=True)):
        rec = {"caption": caption, "seed": seed, "image": f"{k:03d}_image.png"}
        if samples.maps is not None:
            rec.update(map=f"{k:03d}_map.png", ids=f"{k:03d}_map.npy")
            rec["invalid_pixels"] = int(samples.num_invalid[k])
        records.append(rec)
    grid = visualize.sample_grid(
        captions, samples.images, samples.maps, info.category_names, info.colour_table
    )
    visualize.save_png(out / "grid.png", grid)
    meta = {
        "step": step,
        "task": task,
        "sampler": dataclasses.asdict(run_spec.sampler),
        "samples": records,
    }
    (out / "samples.json").write_text(json.dumps(meta, indent=2))
    logging.info("Wrote %d samples to %s", len(records), out)
    return out
