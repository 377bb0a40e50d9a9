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
import json
import logging
from typing import Any

import numpy as np
from etils import epath

from pdm_jax import sharding, specs, visualize
from pdm_jax.data import pipeline
from pdm_jax.data.coco import dataset as coco_dataset
from pdm_jax.data.schema import DatasetInfo, DataSpec
from pdm_jax.sampling import inputs
from pdm_jax.sampling.params import load_params
from pdm_jax.sampling.sampler import Sampler


def dataset_info(data: DataSpec) -> DatasetInfo:
    """The codecs and unconditional context sample mode uses.

    Those of the configured dataset's train split; for COCO without ``data.dir``, those of
    the encoders alone (``coco.dataset.encoder_info``): a converted checkpoint, the VAE and
    the CLIP text encoder are all sampling needs.
    """
    if data.source == "coco" and not data.dir:
        return coco_dataset.encoder_info(data)
    return pipeline.create_source(data, "train")[1]


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
    params, step = load_params(workdir, s.step, s.use_ema, model, step_flag="--config.sample.step")
    info = dataset_info(run_spec.data)
    prompts = inputs.read_prompts(s, info)
    captions = [p for p in prompts for _ in range(s.num_samples)]
    seeds = [s.seed + j for _ in prompts for j in range(s.num_samples)]
    known = inputs.known_inputs(s, info, task, model.img_size, model.map_size, len(captions))
    sampler = Sampler(
        model,
        run_spec.diffusion,
        run_spec.sampler,
        info,
        params,
        mesh=sharding.local_mesh(run_spec.sharding.mesh_shape, run_spec.sharding.mesh_axes),
        batch_size=min(s.batch_size, len(captions)),
    )
    samples = sampler(seeds, captions=captions, task=task, **known)
    out = epath.Path(s.out_dir or epath.Path(workdir) / f"sample_{task}_step{step}")
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
        "task": task,
        "sampler": dataclasses.asdict(run_spec.sampler),
        "samples": records,
    }
    (out / "samples.json").write_text(json.dumps(meta, indent=2))
    logging.info("Wrote %d samples to %s", len(records), out)
    return out
