r"""python -m pdm_jax.main --config=configs/pdm.py:two_stream --workdir=DIR --mode=evaluate \
    --vae=/ckpt/autoencoder_kl.pth --config.data.dir=/data/coco_pdm \
    --config.eval.fid_stats=/data/fid_stats_coco_val256.npz \
    --config.eval.inception=/ckpt/pt_inception-2015-12-05-6726825d.pth \
    --config.eval.clip=/ckpt/clip-vit-base-patch32

Evaluate mode: samples ``eval.num_samples`` image/map pairs for validation captions with a
checkpoint's EMA parameters, then scores them (the paper's table: FID, CLIP score, MCD).

* **Checkpoint**: ``eval.step`` (-1: the latest) of ``<workdir>/checkpoints``.
* **Prompts**: sample ``i`` of COCO (``data.source=coco``, the prepared val split of
  ``data.dir``, R records) uses record ``i mod R`` and its caption ``(i div R) mod K`` with
  its precomputed context, so 30,000 samples visit the 5,000 val images six times, each time
  with another caption; of the synthetic world, held-out example ``i`` (compositions never
  trained on). Sample ``i`` starts from ``jax.random.key(eval.seed + i)``, so a sample
  depends neither on the batching nor on the number of hosts or devices.
* **Sampling**: each process takes a contiguous slice of the indices; its batches
  (``eval.batch_size``, rounded up to its device count) are split over its devices on the
  ``data`` axis. Finished samples are files, never regenerated: an interrupted run resumes,
  and raising ``eval.num_samples`` samples only the new indices.
* **Metrics** (each process scores its slice; process 0 merges and writes):
  ``fid`` against ``eval.fid_stats`` when ``eval.inception`` names the Inception weights;
  ``clip_score`` (100·cos, averaged over the reference image's captions, then over images)
  when ``eval.clip`` names a CLIP ViT-B/32 directory; ``mcd`` of each generated map against
  the ground-truth map of its prompt; ``invalid_map_pixels``, the share of generated map
  pixels that decoded outside the category table. The synthetic world adds metrics that need
  no weights, read by its oracle segmenter: ``map_image_agreement`` (the map against the
  oracle's segmentation of the image), ``caption_recall`` (caption categories present in the
  map) and ``image_caption_recall`` (… in the image's segmentation). For ``eval.task =
  given_map`` (the image generated for the ground-truth map) the oracle's segmentation of the
  image plays the generated map's part.
* **Tasks** (``eval.task``): ``cogenerate`` (image and map from noise); ``given_map`` (the
  image for the ground-truth map); ``given_image`` (segmentation: the map for the reference
  image, scored against its ground-truth map with ``miou`` and panopticapi's ``pq``/``sq``/
  ``rq``, all and ``_things``/``_stuff``, segments being the connected components of each
  thing category, see ``panoptic_quality``; plus per-sample ``thing_iou``/``stuff_miou``;
  no image is written, so FID and CLIP do not apply); ``inpaint`` (a box of about
  ``eval.mask_fraction`` of the image, drawn from ``(eval.seed, i)``, regenerated in the
  image and the map, the rest known: ``masked_miou``, ``masked_thing_iou`` and
  ``masked_stuff_miou`` of the map against the ground truth inside the box,
  ``masked_thing_iou_image`` against the oracle's reading of the image inside the box on the
  synthetic world, and ``known_latent_max_abs_diff`` / ``known_map_max_abs_diff``, the
  largest change of a known latent or map pixel, which must be 0).
* **Solver sweep** (``eval.sweep = "method[/order]:NFE,...;..."``): the task is scored once
  per (method, NFE) cell, each cell's samples and metrics in its own directory, and the
  table of all cells is written to ``eval/<step>/sweep_<task>.json`` and ``.md``. A cell's
  order defaults to ``sampler.order`` (at most 2 for ``sde_multistep``).

Layout (``<task>`` is one of ``TASKS``)::

    <workdir>/eval/<step>/samples_<task>/settings.json   what the samples depend on
    <workdir>/eval/<step>/samples_<task>/000123.png      image (caption in its PNG text;
                                                         none for given_image)
    <workdir>/eval/<step>/samples_<task>/000123_map.png  generated ids, 8-bit grey PNG
    <workdir>/eval/<step>/metrics.json                   {"step": .., "<task>": {...}}
    <workdir>/eval/<step>/fid_stats_<task>.npz           mu, sigma of the samples
    <workdir>/eval/events.out.tfevents.*                 TensorBoard "<task>/<metric>"
    <workdir>/eval/<step>/sweep_<task>/<method>_o<order>_nfe<N>/  a sweep cell (as above)
    <workdir>/eval/<step>/sweep_<task>.json, .md         the sweep's table
"""

import dataclasses
import json
import logging
import time
from typing import Any

import jax
from clu import metric_writers
from etils import epath
from jax.experimental import multihost_utils

from pdm_jax import specs
from pdm_jax.data import pipeline
from pdm_jax.diffusion import dpm_solver
from pdm_jax.diffusion.reverse import TASKS
from pdm_jax.evaluation import prompts as prompts_lib
from pdm_jax.evaluation import reference_stats, scoring, store
from pdm_jax.sampling.params import load_params
from pdm_jax.sampling.sampler import host_indices
from pdm_jax.weights import clip as hf_clip

DEFAULT_NUM_SAMPLES = {"coco": 30_000, "synthetic": 256}
PDM_TASKS = tuple(t for t in TASKS if t != "cogenerate")  # need a map stream
# Columns of the sweep's Markdown table, in this order when present.
SWEEP_COLUMNS = (
    "thing_iou",
    "stuff_miou",
    "caption_recall",
    "image_caption_recall",
    "map_image_agreement",
    "miou",
    "pq",
    "pq_things",
    "pq_stuff",
    "masked_miou",
    "masked_thing_iou",
    "masked_thing_iou_image",
    "mcd",
    "fid",
    "clip_score",
    "invalid_map_pixels",
)


@dataclasses.dataclass(frozen=True)
class SweepCell:
    """One solver setting of a sweep: DPM-Solver++ ``method``, ``order``, ``steps`` (NFE)."""

    method: str
    order: int
    steps: int

    @property
    def name(self) -> str:
        """The cell's directory name."""
        return f"{self.method}_o{self.order}_nfe{self.steps}"


def parse_sweep(text: str, default_order: int) -> list[SweepCell]:
    """Parses ``eval.sweep``: ``"method[/order]:NFE,NFE;method[/order]:NFE..."``.

    Args:
      text: the sweep string (e.g. ``"fast:10,20,50;sde_multistep/2:10,20,50"``).
      default_order: the order of cells that give none (``sampler.order``; at most 2 for
        stochastic methods, which have no order 3).

    Returns:
      The cells in the order given (duplicates dropped).

    Raises:
      ValueError: naming the malformed part, unknown method or impossible order/NFE.
    """
    fix = 'write eval.sweep as "method[/order]:NFE,NFE;..." e.g. "fast:10,20,50;multistep/2:10"'
    cells: list[SweepCell] = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        head, sep, counts = part.partition(":")
        method, _, order_text = head.strip().partition("/")
        if not sep or not counts.strip():
            raise ValueError(f"eval.sweep part {part!r} has no ':NFE,...' list; {fix}.")
        # The solver's own check decides; each call varies one setting, so the message
        # can name the part of the sweep at fault.
        if not _solver_accepts(method, 1, 1):
            raise ValueError(
                f"eval.sweep method {method!r} is unknown; choose from {dpm_solver.METHODS}."
            )
        try:
            order = int(order_text) if order_text else default_order
            if not order_text and method in dpm_solver.STOCHASTIC_METHODS:
                order = min(order, 2)
            steps = [int(n) for n in counts.split(",") if n.strip()]
        except ValueError:
            raise ValueError(f"eval.sweep part {part!r} is not understood; {fix}.") from None
        if not _solver_accepts(method, order, max(order, 1)):
            raise ValueError(f"eval.sweep part {part!r}: {method} has no order {order}.")
        for n in steps:
            if not _solver_accepts(method, order, n):
                raise ValueError(f"eval.sweep part {part!r}: NFE {n} is below the order {order}.")
            cell = SweepCell(method, order, n)
            if cell not in cells:
                cells.append(cell)
    if not cells:
        raise ValueError(f"eval.sweep={text!r} names no cell; {fix}.")
    return cells


def _solver_accepts(method: str, order: int, steps: int) -> bool:
    """Whether ``dpm_solver.check_settings`` accepts a sweep cell (with any skip type: the
    sweep sets method, order and NFE only)."""
    try:
        dpm_solver.check_settings(method, order, dpm_solver.SKIP_TYPES[0], steps)
    except ValueError:
        return False
    return True


def eval_settings(config: specs.RunSpec) -> specs.EvalSpec:
    """``config.eval``, validated, with ``num_samples`` resolved for the data source.

    Args:
      config: the run's spec.

    Returns:
      The ``eval`` spec to run with (``num_samples`` 0 becomes the source's default).
    """
    ev = config.eval
    if ev.task not in TASKS:
        raise ValueError(f"eval.task={ev.task!r} is not evaluated; choose one of {TASKS}.")
    if ev.task in PDM_TASKS and not config.model.has_map:
        raise ValueError(
            f"eval.task={ev.task} needs a PDM, a model that generates maps (one_stream, "
            "two_stream, unet_one_stream or unet_two_stream)."
        )
    if ev.task == "inpaint" and not 0.0 < ev.mask_fraction < 1.0:
        raise ValueError(f"eval.mask_fraction={ev.mask_fraction} must lie in (0, 1) for inpaint.")
    if ev.task == "given_image" and (ev.inception or ev.clip):
        raise ValueError(
            "eval.task=given_image generates maps only, so FID and the CLIP score do not apply: "
            "unset eval.inception and eval.clip."
        )
    if ev.sweep:
        parse_sweep(ev.sweep, config.sampler.order)
    if ev.num_samples <= 0:
        ev = dataclasses.replace(ev, num_samples=DEFAULT_NUM_SAMPLES.get(config.data.source, 1000))
    if ev.inception and not ev.fid_stats:
        raise ValueError(
            "eval.inception is set but eval.fid_stats is empty: compute reference statistics "
            "with python -m pdm_jax.evaluation.reference_stats and pass --config.eval.fid_stats."
        )
    for key in ("fid_stats", "inception", "clip"):
        value = getattr(ev, key)
        if value and not epath.Path(value).exists():
            raise FileNotFoundError(f"eval.{key}={value} does not exist.")
    return ev


def run_evaluate(config: Any, workdir: str, *, info: Any = None) -> dict:
    """Evaluate mode (see the module docstring).

    Args:
      config: the run's ``RunSpec`` (or the ``ConfigDict`` it is made from).
      workdir: the training run's directory.
      info: the dataset's ``pipeline.DatasetInfo`` (default: from ``config.data``); it
        decodes latents to images and names the categories.

    Returns:
      The evaluated task's metrics, as written to ``metrics.json``; with ``eval.sweep``,
      ``{"cells": [...]}``, the sweep's table (one row per cell).
    """
    config = specs.as_run_spec(config)
    ev = eval_settings(config)
    workdir = epath.Path(workdir)
    params, step = load_params(
        str(workdir), ev.step, ev.use_ema, config.model, step_flag="--config.eval.step"
    )
    if info is None:
        _, info = pipeline.create_source(config.data, "held_out")
    prompts, world = prompts_lib.eval_prompts(config)
    # Load the scorers first: a bad path fails before hours of sampling.
    extractor = embedder = None
    if ev.inception:
        variables = reference_stats.load_inception_variables(ev.inception)
        extractor = reference_stats.InceptionFeatures(variables, ev.inception_batch_size)
    if ev.clip:
        embedder = hf_clip.load_clip_embedder(ev.clip, batch_size=int(ev.clip_batch_size))
    scorers = (prompts, world, extractor, embedder)
    eval_dir = workdir / "eval" / str(step)
    if not ev.sweep:
        metrics = _evaluate(config, ev, info, params, step, scorers, eval_dir)
        if metrics is not None:
            writer = metric_writers.create_default_writer(str(workdir / "eval"), asynchronous=False)
            scalars = {f"{ev.task}/{k}": v for k, v in metrics.items() if isinstance(v, float)}
            writer.write_scalars(step, scalars)
            writer.close()
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"pdm_eval_metrics_{ev.task}")
        return json.loads((eval_dir / "metrics.json").read_text())[ev.task]
    rows = []
    for cell in parse_sweep(ev.sweep, config.sampler.order):
        sampler = dataclasses.replace(
            config.sampler, method=cell.method, order=cell.order, steps=cell.steps
        )
        cell_dir = eval_dir / f"sweep_{ev.task}" / cell.name
        metrics = _evaluate(
            config.replace(sampler=sampler), ev, info, params, step, scorers, cell_dir
        )
        if metrics is not None:
            row = {"method": cell.method, "order": cell.order, "nfe": cell.steps}
            row.update({k: v for k, v in metrics.items() if isinstance(v, float) or v is None})
            # None when every sample was reused from an earlier run (nothing was timed).
            sampled = metrics["sampling"]["generated"] > 0
            row["sampling_seconds"] = metrics["sampling"]["seconds"] if sampled else None
            rows.append(row)
    table = {"step": step, "task": ev.task, "num_samples": int(ev.num_samples), "cells": rows}
    if jax.process_index() == 0:
        (eval_dir / f"sweep_{ev.task}.json").write_text(json.dumps(table, indent=2))
        (eval_dir / f"sweep_{ev.task}.md").write_text(sweep_markdown(table))
        logging.info("Sweep table (%s):\n%s", ev.task, sweep_markdown(table))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"pdm_eval_sweep_{ev.task}")
    return json.loads((eval_dir / f"sweep_{ev.task}.json").read_text())


def sweep_markdown(table: dict[str, Any]) -> str:
    """The sweep table as Markdown: one row per cell, the metrics as columns.

    Args:
      table: ``{"task", "step", "num_samples", "cells": [{"method", "order", "nfe", ...}]}``.

    Returns:
      The Markdown text (a caption line, then the table of the ``SWEEP_COLUMNS`` present,
      the known-region checks and the sampling seconds, compilation included; "–" where the
      samples were reused from an earlier run).
    """
    rows = table["cells"]
    found = {k for r in rows for k in r}
    # The JSON keeps every figure; the Markdown shows the headline ones.
    columns = [c for c in (*SWEEP_COLUMNS, *scoring.MAX_KEYS, "sampling_seconds") if c in found]
    show = lambda v: "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = [
        f"Solver sweep, task {table['task']}, step {table['step']}, "
        f"{table['num_samples']} samples per cell.",
        "",
        "| method | order | NFE | " + " | ".join(columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for r in rows:
        cells = [r["method"], r["order"], r["nfe"], *(r.get(c) for c in columns)]
        lines.append("| " + " | ".join(show(v) for v in cells) + " |")
    return "\n".join(lines) + "\n"


def _evaluate(
    config: specs.RunSpec,
    ev: specs.EvalSpec,
    info: Any,
    params: Any,
    step: int,
    scorers: tuple[Any, Any, Any, Any],
    eval_dir: epath.Path,
) -> dict[str, Any] | None:
    """Samples and scores ``ev.task`` with ``config.sampler`` into ``eval_dir``.

    Returns:
      The metrics written to ``eval_dir/metrics.json`` (process 0; None elsewhere).
    """
    prompts, world, extractor, embedder = scorers
    samples_dir = eval_dir / f"samples_{ev.task}"
    sampler = {k: v for k, v in dataclasses.asdict(config.sampler).items() if k != "task"}
    settings = {
        "step": step,
        "task": ev.task,
        "seed": int(ev.seed),
        "use_ema": bool(ev.use_ema),
        "sampler": sampler,
        "model": dataclasses.asdict(config.model),
        "diffusion": dataclasses.asdict(config.diffusion),
        "prompts": prompts.identity(),
    }
    if ev.task == "inpaint":
        settings["mask_fraction"] = float(ev.mask_fraction)
    store.check_settings(samples_dir, settings)
    generated, sample_seconds = store.generate_samples(
        config, ev, prompts, info, params, samples_dir
    )
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"pdm_eval_samples_{ev.task}_{eval_dir.name}")
    t0 = time.perf_counter()
    mine = host_indices(ev.num_samples, jax.process_index(), jax.process_count())
    needs_map = store.has_generated_maps(config, ev)
    scores = scoring.score_samples(
        ev,
        prompts,
        world,
        samples_dir,
        mine,
        extractor,
        embedder,
        needs_map,
        latent_side=config.model.img_size,
    )
    scores = scoring.gather(scores, eval_dir, ev.task)
    if scores is None:
        return None
    tables = (prompts.thing_ids, prompts.stuff_ids) if needs_map else None
    metrics = scoring.summarise(scores, ev, eval_dir, tables)
    if ev.task == "inpaint":
        exact = metrics["known_latent_max_abs_diff"] == 0 and metrics["known_map_max_abs_diff"] == 0
        if not exact:
            logging.error(
                "Inpainting changed known pixels (latent %s, map %s): the known region must "
                "be re-imposed exactly.",
                metrics["known_latent_max_abs_diff"],
                metrics["known_map_max_abs_diff"],
            )
    metrics.update(
        num_samples=int(ev.num_samples),
        sampler=sampler,
        sampling={
            "generated": generated,
            "reused": len(mine) - generated,
            "seconds": round(sample_seconds, 1),
        },
        scoring_seconds=round(time.perf_counter() - t0, 1),
    )
    metrics_path = eval_dir / "metrics.json"
    everything = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    everything.update({"step": step, ev.task: metrics})
    eval_dir.mkdir(parents=True, exist_ok=True)
    tmp = eval_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(everything, indent=2))
    tmp.replace(metrics_path)
    logging.info("Evaluation at step %d (%s): %s", step, ev.task, json.dumps(metrics))
    return metrics
