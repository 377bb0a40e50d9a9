r"""python -m pdm_jax.main --config=configs/pdm.py:demo --workdir=workdir/demo

The demo's figures: after training ``demo``, sample the synthetic world's held-out prompts
(compositions never seen in training) with the EMA parameters and write
``<workdir>/metrics.json``:

* ``cogenerate``: image and map from noise.
  ``thing_iou`` / ``stuff_miou`` — per sample, the mean IoU of the thing / stuff categories
  between the generated map and the oracle's segmentation of the generated image (are the
  things where the map puts them); ``map_image_agreement`` — pixel accuracy of the same
  pair (dominated by the large stuff regions); ``caption_recall`` — share of the caption's
  categories present in the generated map; ``mcd`` — mean category difference of the
  generated map against the reference map of the same prompt; ``image_caption_recall`` —
  caption recall of the oracle's segmentation of the generated image.
* ``given_map``: the image generated for the prompt's reference map.
  ``thing_iou``, ``stuff_miou``, ``map_image_agreement`` — oracle segmentation of the
  image vs the given map; ``caption_recall`` and ``mcd`` of that segmentation.
* ``reference``: the same figures for the clean renders of the prompts (the ceiling).

Grids of the first prompts go to ``<workdir>/demo_<task>.png``.
"""

import dataclasses
import json
import logging
import time
from typing import Any

import numpy as np
from etils import epath

from pdm_jax import specs, visualize
from pdm_jax.data import pipeline
from pdm_jax.data.synthetic import dataset as synthetic
from pdm_jax.evaluation import scoring
from pdm_jax.sampling.params import load_params
from pdm_jax.sampling.sampler import Sampler

_GRID_ROWS = 8


# How the demo samples its given-map figures: the map clamped (``given_map``), or re-imposed
# at the current noise level after every step (``inpaint`` with the whole map known).
GIVEN_MAP_TASKS = ("given_map", "inpaint")


def check_config(config: specs.RunSpec) -> None:
    """The demo metrics can be computed for this run (checked before it trains).

    Raises:
      ValueError: naming the setting and its fix.
    """
    if config.data.source != "synthetic":
        raise ValueError(
            f"Demo metrics need the synthetic world (data.source='synthetic'), got "
            f"{config.data.source!r}; set --config.demo.use_metrics=False for other data."
        )
    if not config.model.has_map:
        raise ValueError(
            f"Demo metrics need a PDM (a model with a map stream), got model.name="
            f"{config.model.name!r}; set --config.demo.use_metrics=False for it."
        )
    if config.demo.given_map_task not in GIVEN_MAP_TASKS:
        raise ValueError(
            f"demo.given_map_task={config.demo.given_map_task!r} is not a way to sample the "
            f"given-map figures; choose one of {GIVEN_MAP_TASKS}."
        )


def _means(figures: dict[str, np.ndarray]) -> dict[str, float]:
    return {k: scoring.mean_over_scored(v) for k, v in figures.items()}


def evaluate(config: Any, workdir: str) -> dict[str, Any]:
    """Computes the demo metrics from the workdir's latest checkpoint and writes them.

    Args:
      config: the ``demo`` run's ``RunSpec`` (or its ``ConfigDict``; synthetic data).
      workdir: the trained run's directory.

    Returns:
      The metrics written to ``<workdir>/metrics.json``.
    """
    config = specs.as_run_spec(config)
    check_config(config)
    t0 = time.perf_counter()
    workdir = epath.Path(workdir)
    world = synthetic.synthetic_world(config.data)
    _, info = pipeline.create_source(config.data, "held_out")
    params, step = load_params(
        str(workdir), -1, True, config.model, step_flag="--mode=evaluate --config.eval.step"
    )
    n = int(config.demo.num_prompts)
    ref = world.held_out_prompts(n)
    captions, ref_maps = list(ref["caption"]), ref["map"]
    seeds = [int(config.demo.seed) + i for i in range(n)]
    # The trainer's grid batch size: the compiled cogenerate sampler is reused.
    batch = min(n, int(config.train.num_eval_prompts))
    metrics: dict[str, Any] = {"step": step, "num_prompts": n, "split": "held_out"}

    sampler = Sampler.for_run(config, info, params, batch_size=batch)
    cog = sampler(seeds, captions=captions, task="cogenerate")
    figures = scoring.synthetic_figures(world, captions, cog.images, cog.maps, ref_maps)
    metrics["cogenerate"] = _means(figures)
    metrics["cogenerate"]["invalid_map_pixels"] = int(np.sum(cog.num_invalid))

    if config.demo.given_map_task == "inpaint":
        # The whole map known, re-imposed at the current noise level after every step: the
        # jointly trained model then sees (x_t, M_t) at one t, as in training.
        mask_m = np.ones((*ref_maps.shape, 1), np.float32)
        given = sampler(
            seeds, captions=captions, task="inpaint", known_maps=ref_maps, mask_m=mask_m
        )
    else:
        given = sampler(seeds, captions=captions, task="given_map", known_maps=ref_maps)
    # The oracle's reading of the image plays the generated map's part.
    figures = scoring.synthetic_figures(world, captions, given.images, None, ref_maps)
    metrics["given_map"] = _means(figures)
    # The ceiling: the oracle's reading of the clean reference renders against their maps.
    renders = world.autoencoder.decode(ref["latent"])
    reference = scoring.synthetic_figures(world, captions, renders, None, ref_maps)
    metrics["reference"] = {
        "oracle_agreement": float(np.mean(world.map_agreement(renders, ref_maps))),
        "thing_iou": scoring.mean_over_scored(reference["thing_iou"]),
        "stuff_miou": scoring.mean_over_scored(reference["stuff_miou"]),
    }
    metrics["sampler"] = dataclasses.asdict(config.sampler)
    metrics["eval_seconds"] = round(time.perf_counter() - t0, 1)

    rows = slice(0, min(n, _GRID_ROWS))
    for task, images, maps in (
        ("cogenerate", cog.images, cog.maps),
        ("given_map", given.images, ref_maps),
    ):
        grid = visualize.sample_grid(
            captions[rows], images[rows], maps[rows], info.category_names, info.colour_table
        )
        visualize.save_png(workdir / f"demo_{task}.png", grid)
    (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    logging.info("Demo metrics (held-out prompts): %s", json.dumps(metrics))
    return metrics
