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

Layout (``<task>`` is ``cogenerate`` or ``given_map``)::

    <workdir>/eval/<step>/samples_<task>/settings.json   what the samples depend on
    <workdir>/eval/<step>/samples_<task>/000123.png      image (caption in its PNG text)
    <workdir>/eval/<step>/samples_<task>/000123_map.png  generated ids, 8-bit grey PNG
    <workdir>/eval/<step>/metrics.json                   {"step": .., "<task>": {...}}
    <workdir>/eval/<step>/fid_stats_<task>.npz           mu, sigma of the samples
    <workdir>/eval/events.out.tfevents.*                 TensorBoard "<task>/<metric>"
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
from pdm_jax.evaluation import prompts as prompts_lib
from pdm_jax.evaluation import reference_stats, scoring, store
from pdm_jax.sampling.params import load_params
from pdm_jax.weights import clip as hf_clip

DEFAULT_NUM_SAMPLES = {"coco": 30_000, "synthetic": 256}
TASKS = ("cogenerate", "given_map")


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
    if ev.task == "given_map" and not config.model.has_map:
        raise ValueError("eval.task=given_map needs a PDM (model.name one_stream or two_stream).")
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
      The evaluated task's metrics, as written to ``metrics.json``.
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
    eval_dir = workdir / "eval" / str(step)
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
    store.check_settings(samples_dir, settings)
    generated, sample_seconds = store.generate_samples(
        config, ev, prompts, info, params, samples_dir
    )
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"pdm_eval_samples_{ev.task}")
    t0 = time.perf_counter()
    mine = prompts_lib.host_indices(ev.num_samples, jax.process_index(), jax.process_count())
    needs_map = store.has_generated_maps(config, ev)
    scores = scoring.score_samples(
        ev, prompts, world, samples_dir, mine, extractor, embedder, needs_map
    )
    scores = scoring.gather(scores, eval_dir, ev.task)
    metrics_path = eval_dir / "metrics.json"
    if scores is not None:
        metrics = scoring.summarise(scores, ev, eval_dir)
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
        everything = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
        everything.update({"step": step, ev.task: metrics})
        tmp = eval_dir / "metrics.json.tmp"
        tmp.write_text(json.dumps(everything, indent=2))
        tmp.replace(metrics_path)
        writer = metric_writers.create_default_writer(str(workdir / "eval"), asynchronous=False)
        writer.write_scalars(
            step, {f"{ev.task}/{k}": v for k, v in metrics.items() if isinstance(v, float)}
        )
        writer.close()
        logging.info("Evaluation at step %d (%s): %s", step, ev.task, json.dumps(metrics))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"pdm_eval_metrics_{ev.task}")
    return json.loads(metrics_path.read_text())[ev.task]
