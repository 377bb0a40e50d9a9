r"""python -m pdm_jax.main --config=configs/pdm.py:two_stream --workdir=DIR --mode=evaluate \
    --config.data.dir=/data/coco_pdm --config.eval.fid_stats=/data/fid_stats_coco_val256.npz \
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
import functools
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm
from clu import metric_writers
from etils import epath
from jax.experimental import multihost_utils
from PIL import Image, PngImagePlugin

from pdm_jax import checkpointing, models, sharding
from pdm_jax.data import pipeline
from pdm_jax.diffusion import analog_bits
from pdm_jax.evaluation import clip_score, fid, reference_stats
from pdm_jax.evaluation import mcd as mcd_lib
from pdm_jax.sampling import mode as sample_mode

# ``config.eval`` fields and their defaults (used for any field the config lacks).
EVAL_DEFAULTS: dict[str, Any] = {
    "num_samples": 0,  # 0: DEFAULT_NUM_SAMPLES of the data source
    "step": -1,  # checkpoint step; -1: the latest
    "task": "cogenerate",  # cogenerate | given_map
    "batch_size": 16,  # samples per sampler call on each process
    "seed": 0,  # sample i starts from jax.random.key(seed + i)
    "use_ema": True,
    "fid_stats": "",  # reference .npz (mu, sigma), see pdm_jax.evaluation.reference_stats
    "inception": "",  # pytorch-fid Inception .pth (or .npz of its state dict); "" skips FID
    "inception_batch_size": 50,
    "clip": "",  # Hugging Face CLIP ViT-B/32 directory; "" skips the CLIP score
    "clip_batch_size": 64,
}
DEFAULT_NUM_SAMPLES = {"coco": 30_000, "synthetic": 256}
TASKS = ("cogenerate", "given_map")


def eval_settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config.eval`` over ``EVAL_DEFAULTS``, validated.

    Args:
      config: the full config (its ``eval`` group may be missing or partial).

    Returns:
      A complete ``eval`` ConfigDict (``num_samples`` resolved for the data source).
    """
    group = config.get("eval", None)
    given = {} if group is None else group.to_dict()
    unknown = sorted(set(given) - set(EVAL_DEFAULTS))
    if unknown:
        raise ValueError(f"Unknown config.eval fields {unknown}; known: {sorted(EVAL_DEFAULTS)}.")
    ev = ml_collections.ConfigDict({**EVAL_DEFAULTS, **given})
    if ev.task not in TASKS:
        raise ValueError(f"eval.task={ev.task!r} is not evaluated; choose one of {TASKS}.")
    if ev.task == "given_map" and config.model.name == "uvit":
        raise ValueError("eval.task=given_map needs a PDM (model.name one_stream or two_stream).")
    if ev.num_samples <= 0:
        ev.num_samples = DEFAULT_NUM_SAMPLES.get(config.data.source, 1000)
    if ev.inception and not ev.fid_stats:
        raise ValueError(
            "eval.inception is set but eval.fid_stats is empty: compute reference statistics "
            "with python -m pdm_jax.evaluation.reference_stats and pass --config.eval.fid_stats."
        )
    for key in ("fid_stats", "inception", "clip"):
        if ev[key] and not epath.Path(ev[key]).exists():
            raise FileNotFoundError(f"eval.{key}={ev[key]} does not exist.")
    return ev


@dataclasses.dataclass(frozen=True)
class Prompt:
    """What sample ``i`` is conditioned on and compared with.

    Attributes:
      caption: the caption sampled with.
      captions: every caption of the reference image (the CLIP score averages over them).
      context: float32 [T, D] text context of ``caption``.
      map: int32 [M, M] ground-truth ids at the model's map side, None for a U-ViT.
    """

    caption: str
    captions: tuple[str, ...]
    context: np.ndarray
    map: np.ndarray | None


class SyntheticPrompts:
    """Held-out example ``i`` of the synthetic world (its oracle is ``self.world``)."""

    def __init__(self, world: Any, with_map: bool):
        self.world, self.with_map = world, with_map

    def __getitem__(self, i: int) -> Prompt:
        example = self.world.example(i, "held_out")
        caption = self.world.caption(i, "held_out")
        ref = np.asarray(example["map"], np.int32) if self.with_map else None
        return Prompt(caption, (caption,), np.asarray(example["context"], np.float32), ref)

    def identity(self) -> dict[str, Any]:
        """What the prompts depend on (compared when resuming)."""
        return {"source": "synthetic", "world": dataclasses.asdict(self.world.config)}


class CocoPrompts:
    """COCO val record ``i mod R`` with its caption ``(i div R) mod K`` (module docstring)."""

    def __init__(self, source: Any):
        """Args: source: a ``CocoSource`` in the moments view (``sample_latent=False``)."""
        self.source, self.num_records = source, len(source)
        if not self.num_records:
            raise ValueError(f"{source} has no records to take validation captions from.")

    def __getitem__(self, i: int) -> Prompt:
        rec = self.source[i % self.num_records]
        captions = tuple(rec["captions"])
        k = (i // self.num_records) % len(captions)
        ref = np.asarray(rec["map"], np.int32) if "map" in rec else None
        return Prompt(captions[k], captions, np.asarray(rec["contexts"][k], np.float32), ref)

    def identity(self) -> dict[str, Any]:
        """What the prompts depend on (compared when resuming)."""
        meta = self.source.metadata
        text = {k: v for k, v in meta.get("text_encoder", {}).items() if k != "path"}
        return {"source": "coco", "records": self.num_records, "text_encoder": text}


def eval_prompts(config: ml_collections.ConfigDict) -> tuple[Any, Any]:
    """The validation prompts of ``config.data.source`` and its oracle world (or None)."""
    with_map = config.model.name != "uvit"
    if config.data.source == "synthetic":
        world = pipeline.synthetic_world(config)
        return SyntheticPrompts(world, with_map), world
    if config.data.source == "coco":
        from pdm_jax.data.coco import source as coco_source

        return CocoPrompts(coco_source.coco_source_from_config(config, "val")), None
    raise ValueError(
        f"Evaluation reads validation captions from data.source 'coco' or 'synthetic', got "
        f"{config.data.source!r}."
    )


def host_indices(num_samples: int, process_index: int, process_count: int) -> range:
    """The contiguous slice of ``range(num_samples)`` that one process samples and scores."""
    bounds = np.linspace(0, num_samples, process_count + 1).round().astype(int)
    return range(int(bounds[process_index]), int(bounds[process_index + 1]))


def load_eval_params(
    config: ml_collections.ConfigDict, workdir: str, step: int, use_ema: bool
) -> tuple[Any, int]:
    """Host parameters of ``<workdir>/checkpoints`` at ``step`` (-1: latest), checked.

    Raises:
      CheckpointNotFoundError: naming the directory looked in.
      ConfigMismatchError: listing mismatched parameter paths and shapes.
      CorruptCheckpointError: the step cannot be read (names the ``eval.step`` to use).
    """
    root, step = checkpointing.locate(
        checkpointing.checkpoint_dir(workdir), None if step < 0 else step
    )
    params, where = checkpointing.load_params(
        root / str(step), use_ema=use_ema, fix="Rerun with --config.eval.step={step}"
    )
    lines = checkpointing.param_mismatches(params, models.abstract_params(config.model))
    if lines:
        raise checkpointing.mismatch_error(where, lines, config.model.name)
    return params, step


@functools.lru_cache(maxsize=8)
def _sample_program(
    key: str,
    task: str,
    valid_ids: tuple[int, ...],
    out_sharding: jax.sharding.NamedSharding,
):
    """Jitted ``(params, seeds [B], contexts [B,T,D], empty [T,D], maps [B,M,M]|None)``.

    ``key`` is the JSON of the ``model``, ``diffusion`` and ``sampler`` groups (cached per
    process, so repeated evaluations reuse the compiled program). Returns ``{"x": latents
    [B,S,S,C]}`` plus, for cogeneration with a PDM, ``"ids"`` [B, M, M] and ``"invalid"``
    [B]; every output is placed as ``out_sharding``.
    """
    config = ml_collections.ConfigDict(json.loads(key))
    valid_ids = np.asarray(valid_ids, np.int64)
    m = config.model
    has_map = m.name != "uvit"
    sample_fn = sample_mode.configured_sampler(config, task)

    def one(params, seed, context, empty, ids):
        known = analog_bits.ids_to_bits(ids, m.num_bits)[None] if task == "given_map" else None
        res = sample_fn(params, jax.random.key(seed), context[None], empty, known_m=known)
        out = {"x": res["x"][0]}
        if has_map and task == "cogenerate":
            out["ids"], out["invalid"] = analog_bits.decode_map(res["m"][0], valid_ids, m.num_bits)
        return out

    return jax.jit(jax.vmap(one, in_axes=(None, 0, 0, None, 0)), out_shardings=out_sharding)


def _needs_map(config: ml_collections.ConfigDict, ev: ml_collections.ConfigDict) -> bool:
    """Whether samples include a generated map (a PDM cogenerating)."""
    return config.model.name != "uvit" and ev.task == "cogenerate"


def _name(i: int, suffix: str = "") -> str:
    return f"{i:06d}{suffix}.png"


def _write_png(path: epath.Path, array: np.ndarray, text: dict[str, str]) -> None:
    """Writes a PNG atomically (temporary name, then rename) with iTXt entries."""
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_itxt(key, value)
    tmp = path.parent / f"{path.name}.tmp"
    with tmp.open("wb") as f:
        Image.fromarray(array).save(f, format="PNG", pnginfo=info)
    tmp.replace(path)


def _read_png(path: epath.Path) -> tuple[np.ndarray, dict[str, str]]:
    with path.open("rb") as f, Image.open(f) as img:
        img.load()
        return np.asarray(img), dict(img.text)


def _check_settings(samples_dir: epath.Path, settings: dict[str, Any]) -> None:
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


def _done(samples_dir: epath.Path, needs_map: bool) -> set[int]:
    """Indices whose files are complete (the image is written last)."""
    names = {p.name for p in samples_dir.iterdir()} if samples_dir.exists() else set()
    images = {int(n[:-4]) for n in names if n.endswith(".png") and n[:-4].isdigit()}
    return {i for i in images if not needs_map or _name(i, "_map") in names}


def generate_samples(
    config: ml_collections.ConfigDict,
    ev: ml_collections.ConfigDict,
    prompts: Any,
    info: pipeline.DatasetInfo,
    params: Any,
    samples_dir: epath.Path,
    mesh: jax.sharding.Mesh,
) -> tuple[int, float]:
    """Samples this process's missing indices into ``samples_dir``.

    Args:
      config: the full config.
      ev: the ``eval`` settings (``eval_settings``).
      prompts: ``SyntheticPrompts`` or ``CocoPrompts``.
      info: the dataset's codecs (``decode_latents``, ``empty_context``, categories).
      params: host parameters.
      samples_dir: where the sample files go.
      mesh: this process's devices on a ``data`` axis.

    Returns:
      ``(number generated, seconds)``.
    """
    has_map = config.model.name != "uvit"
    needs_map = _needs_map(config, ev)
    mine = host_indices(ev.num_samples, jax.process_index(), jax.process_count())
    done = _done(samples_dir, needs_map)
    todo = [i for i in mine if i not in done]
    if not todo:
        return 0, 0.0
    samples_dir.mkdir(parents=True, exist_ok=True)
    batch_sharding = sharding.batch_sharding(mesh)
    batch = -(-int(ev.batch_size) // mesh.size) * mesh.size
    key = json.dumps({k: config[k].to_dict() for k in ("model", "diffusion", "sampler")})
    valid_ids = tuple(sorted(int(i) for i in info.category_names))
    program = _sample_program(key, ev.task, valid_ids, batch_sharding)
    params = jax.device_put(params, sharding.replicated(mesh))
    empty = jax.device_put(np.asarray(info.empty_context, np.float32), sharding.replicated(mesh))
    put = lambda a: None if a is None else jax.device_put(a, batch_sharding)

    def launch(indices: list[int]):
        padded = indices + [indices[-1]] * (batch - len(indices))
        batch_prompts = [prompts[i] for i in padded]
        seeds = np.asarray([ev.seed + i for i in padded], np.uint32)
        contexts = np.stack([p.context for p in batch_prompts])  # [B, T, D]
        ids = np.stack([p.map for p in batch_prompts]) if has_map else None  # [B, M, M]
        return indices, batch_prompts, program(params, put(seeds), put(contexts), empty, put(ids))

    def finish(indices, batch_prompts, result) -> None:
        result = jax.device_get(result)
        n = len(indices)
        images = info.decode_latents(np.asarray(result["x"][:n]))  # [n, H, W, 3] uint8
        for j, i in enumerate(indices):
            if needs_map:
                ids = np.asarray(result["ids"][j]).astype(np.uint8)  # ids <= 200
                text = {"invalid_pixels": str(int(result["invalid"][j]))}
                _write_png(samples_dir / _name(i, "_map"), ids, text)
            _write_png(samples_dir / _name(i), images[j], {"caption": batch_prompts[j].caption})

    t0 = time.perf_counter()
    desc = f"sampling ({ev.task})" + (
        f" process {jax.process_index()}" if jax.process_count() > 1 else ""
    )
    pending = None
    with tqdm.tqdm(total=len(todo), unit="sample", desc=desc) as progress:
        for lo in range(0, len(todo) + batch, batch):
            launched = launch(todo[lo : lo + batch]) if lo < len(todo) else None
            if pending is not None:  # host work overlaps the next batch on the devices
                finish(*pending)
                progress.update(len(pending[0]))
            pending = launched
    return len(todo), time.perf_counter() - t0


def score_samples(
    ev: ml_collections.ConfigDict,
    prompts: Any,
    world: Any,
    samples_dir: epath.Path,
    indices: Sequence[int],
    extractor: reference_stats.InceptionFeatures | None,
    embedder: Any,
    needs_map: bool,
) -> dict[str, np.ndarray]:
    """Per-sample scores of the samples ``indices``.

    Args:
      ev: the ``eval`` settings.
      prompts: the prompts the samples were made for.
      world: the synthetic world (its oracle segmenter), or None.
      samples_dir: the sample files.
      indices: which samples.
      extractor: Inception features for FID, or None.
      embedder: a ``ClipEmbedder`` for the CLIP score, or None.
      needs_map: whether the samples have generated maps.

    Returns:
      ``{name: [n] per-sample values}`` plus ``features`` [n, 2048] for FID.
    """
    batch = extractor.batch_size if extractor is not None else int(ev.inception_batch_size)
    out: dict[str, list[np.ndarray]] = {}
    add = lambda key, value: out.setdefault(key, []).append(np.asarray(value))
    text_cache: dict[str, np.ndarray] = {}
    for lo in tqdm.tqdm(range(0, len(indices), batch), unit="batch", desc="scoring"):
        chunk = list(indices[lo : lo + batch])
        batch_prompts = [prompts[i] for i in chunk]
        images = np.stack([_read_png(samples_dir / _name(i))[0] for i in chunk])
        refs = None if batch_prompts[0].map is None else np.stack([p.map for p in batch_prompts])
        captions = [p.caption for p in batch_prompts]
        if extractor is not None:
            add("features", extractor.of_arrays(images).astype(np.float32))
        if embedder is not None:
            all_captions = [p.captions for p in batch_prompts]
            add("clip_score", _clip_scores(embedder, images, all_captions, text_cache))
        maps = None
        if needs_map:
            read = [_read_png(samples_dir / _name(i, "_map")) for i in chunk]
            maps = np.stack([ids for ids, _ in read]).astype(np.int32)
            add("mcd", mcd_lib.mean_count_difference_per_pair(refs, maps))
            add("invalid_map_pixels", [int(t["invalid_pixels"]) / ids.size for ids, t in read])
        if world is not None:
            seg = world.segment(images, None if refs is None else refs.shape[-1])  # [n, M, M]
            if maps is not None:
                add("map_image_agreement", np.mean(seg == maps, axis=(1, 2)))
                add("caption_recall", world.caption_recall(captions, maps))
                add("image_caption_recall", world.caption_recall(captions, seg))
            elif refs is not None:  # given_map: the oracle's reading of the image is the map
                add("map_image_agreement", np.mean(seg == refs, axis=(1, 2)))
                add("caption_recall", world.caption_recall(captions, seg))
                add("mcd", mcd_lib.mean_count_difference_per_pair(refs, seg))
            else:
                add("image_caption_recall", world.caption_recall(captions, seg))
    return {k: np.concatenate(v) for k, v in out.items()}


def _clip_scores(
    embedder: Any, images: np.ndarray, captions: list[tuple[str, ...]], cache: dict[str, Any]
) -> np.ndarray:
    """Per-image CLIP score over each image's captions (``[n]`` float64).

    ``cache`` maps captions to their embeddings: COCO revisits every image's captions once
    per pass over the val set, so each caption is embedded once.
    """
    new = sorted({c for cs in captions for c in cs} - cache.keys())
    if new:
        cache.update(zip(new, embedder.text_embeds(new), strict=True))
    k = max(len(c) for c in captions)
    text = np.stack([[cache[c[min(j, len(c) - 1)]] for j in range(k)] for c in captions])
    mask = np.asarray([[j < len(c) for j in range(k)] for c in captions])  # [n, K]
    return clip_score.clip_scores_per_image(embedder.image_embeds(images), text, mask)


def _gather(scores: dict[str, np.ndarray], eval_dir: epath.Path, task: str) -> dict | None:
    """Every process's scores, concatenated in index order, on process 0 (None elsewhere)."""
    if jax.process_count() == 1:
        return scores
    part = lambda p: eval_dir / f"scores_{task}_process{p}.npz"
    with part(jax.process_index()).open("wb") as f:
        np.savez(f, **scores)
    multihost_utils.sync_global_devices(f"pdm_eval_scores_{task}")
    if jax.process_index() != 0:
        return None
    parts = []
    for p in range(jax.process_count()):
        with part(p).open("rb") as f, np.load(f) as z:
            parts.append({k: z[k] for k in z.files})
    keys = {k for q in parts for k in q}  # a process without samples has no arrays
    return {k: np.concatenate([q[k] for q in parts if k in q]) for k in keys}


def summarise(
    scores: dict[str, np.ndarray], ev: ml_collections.ConfigDict, eval_dir: epath.Path
) -> dict[str, float]:
    """Means of the per-sample scores, and the FID of the features.

    Args:
      scores: every sample's scores (``score_samples`` of all processes).
      ev: the ``eval`` settings (``fid_stats``, ``task``).
      eval_dir: where the samples' own FID statistics are written.

    Returns:
      ``{metric: value}``.
    """
    metrics = {k: float(np.mean(v)) for k, v in scores.items() if k != "features"}
    if "features" in scores:
        mu, sigma = fid.feature_statistics(scores["features"])
        with (eval_dir / f"fid_stats_{ev.task}.npz").open("wb") as f:
            fid.save_stats(f, mu, sigma)
        with epath.Path(ev.fid_stats).open("rb") as f:
            reference = fid.load_stats(f)
        metrics["fid"] = fid.frechet_distance(mu, sigma, *reference)
    return metrics


def run_evaluate(config: ml_collections.ConfigDict, workdir: str, *, info: Any = None) -> dict:
    """Evaluate mode (see the module docstring).

    Args:
      config: the full config (``eval`` fields default to ``EVAL_DEFAULTS``).
      workdir: the training run's directory.
      info: the dataset's ``pipeline.DatasetInfo`` (default: from ``config.data``); it
        decodes latents to images and names the categories.

    Returns:
      The evaluated task's metrics, as written to ``metrics.json``.
    """
    ev = eval_settings(config)
    workdir = epath.Path(workdir)
    params, step = load_eval_params(config, str(workdir), int(ev.step), bool(ev.use_ema))
    if info is None:
        _, info = pipeline.create_source(config, "held_out")
    prompts, world = eval_prompts(config)
    # Load the scorers first: a bad path fails before hours of sampling.
    extractor = embedder = None
    if ev.inception:
        variables = reference_stats.load_inception_variables(ev.inception)
        extractor = reference_stats.InceptionFeatures(variables, ev.inception_batch_size)
    if ev.clip:
        from pdm_jax.weights import clip as hf_clip

        embedder = hf_clip.load_clip_embedder(ev.clip, batch_size=int(ev.clip_batch_size))
    eval_dir = workdir / "eval" / str(step)
    samples_dir = eval_dir / f"samples_{ev.task}"
    sampler = {k: v for k, v in config.sampler.to_dict().items() if k != "task"}
    settings = {
        "step": step,
        "task": ev.task,
        "seed": int(ev.seed),
        "use_ema": bool(ev.use_ema),
        "sampler": sampler,
        "model": config.model.to_dict(),
        "diffusion": config.diffusion.to_dict(),
        "prompts": prompts.identity(),
    }
    _check_settings(samples_dir, settings)
    mesh = sharding.create_mesh((-1,), (sharding.DATA_AXIS,), jax.local_devices())
    generated, sample_seconds = generate_samples(
        config, ev, prompts, info, params, samples_dir, mesh
    )
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"pdm_eval_samples_{ev.task}")
    t0 = time.perf_counter()
    mine = host_indices(ev.num_samples, jax.process_index(), jax.process_count())
    needs_map = _needs_map(config, ev)
    scores = score_samples(ev, prompts, world, samples_dir, mine, extractor, embedder, needs_map)
    scores = _gather(scores, eval_dir, ev.task)
    metrics_path = eval_dir / "metrics.json"
    if scores is not None:
        metrics = summarise(scores, ev, eval_dir)
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
