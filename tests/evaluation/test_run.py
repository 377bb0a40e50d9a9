"""``--mode=evaluate`` end to end: the synthetic world on a freshly saved tiny checkpoint, and
COCO-shaped prepared data with tiny random Inception and CLIP networks."""

import json
import os
import zlib
from typing import ClassVar

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs.pdm import get_config
from pdm_jax import checkpointing, sharding, specs
from pdm_jax.data import pipeline, schema
from pdm_jax.data.coco import panoptic as coco
from pdm_jax.data.coco import prepare as prepare_coco
from pdm_jax.data.coco import source as coco_source
from pdm_jax.data.synthetic import dataset as synthetic
from pdm_jax.data.synthetic import world as world_lib
from pdm_jax.diffusion import maps
from pdm_jax.evaluation import clip_score, fid
from pdm_jax.evaluation import mcd as mcd_lib
from pdm_jax.evaluation import panoptic_quality as pq_lib
from pdm_jax.evaluation import prompts as eval_prompts
from pdm_jax.evaluation import run as evaluate
from pdm_jax.models import inception
from pdm_jax.models.clip import ClipConfig, CLIPModel, ClipTextConfig, ClipVisionConfig
from pdm_jax.sampling.sampler import Sampler
from pdm_jax.train import state as state_lib
from tests.data import fake_coco
from tests.evaluation.test_inception import random_state_dict

SYNTHETIC_METRICS = {
    "thing_iou",
    "stuff_miou",
    "mcd",
    "invalid_map_pixels",
    "map_image_agreement",
    "caption_recall",
    "image_caption_recall",
}


def _save_fresh_checkpoint(config: ml_collections.ConfigDict, workdir) -> None:
    """A freshly initialised train state saved with the trainer's checkpoint API (step 0)."""
    mesh = sharding.create_mesh((-1,), (sharding.DATA_AXIS,))
    state, _ = state_lib.create_train_state(
        specs.from_config(config), jax.random.key(config.seed), mesh
    )
    manager = checkpointing.create_manager(checkpointing.checkpoint_dir(workdir), async_save=False)
    checkpointing.save(manager, state, config=config.to_dict())
    manager.wait_until_finished()


def _files(directory) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}


def _read(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    config = get_config("demo,tiny=1")
    config.eval.update(num_samples=12, batch_size=8, seed=5)
    workdir = tmp_path_factory.mktemp("synthetic")
    _save_fresh_checkpoint(config, workdir)
    metrics = evaluate.run_evaluate(config, str(workdir))
    return config, workdir, metrics


def test_synthetic_metrics_match_a_recomputation_from_the_sample_files(synthetic_run):
    config, workdir, metrics = synthetic_run
    eval_dir = workdir / "eval" / "0"
    written = json.loads((eval_dir / "metrics.json").read_text())
    assert written["step"] == 0 and written["cogenerate"] == metrics
    assert metrics.keys() >= SYNTHETIC_METRICS
    assert metrics["num_samples"] == 12
    assert metrics["sampling"]["generated"] == 12 and metrics["sampling"]["reused"] == 0
    assert list((workdir / "eval").glob("events.out.tfevents.*")), "no TensorBoard log"

    samples = eval_dir / "samples_cogenerate"
    images = np.stack([_read(samples / f"{i:06d}.png") for i in range(12)])
    gen_maps = np.stack([_read(samples / f"{i:06d}_map.png") for i in range(12)]).astype(np.int32)
    world = synthetic.synthetic_world(specs.from_config(config).data)
    ref = world.held_out_prompts(12)
    np.testing.assert_allclose(
        metrics["mcd"], mcd_lib.mean_count_difference(ref["map"], gen_maps), rtol=1e-12
    )
    np.testing.assert_allclose(
        metrics["map_image_agreement"], np.mean(world.map_agreement(images, gen_maps)), rtol=1e-6
    )
    recall = world.caption_recall(ref["caption"], gen_maps)
    np.testing.assert_allclose(metrics["caption_recall"], np.mean(recall), rtol=1e-6)
    seg = world.segment(images, gen_maps.shape[-1])
    things = mcd_lib.category_iou_per_pair(gen_maps, seg, world_lib.THING_IDS)
    if np.all(np.isnan(things)):
        assert metrics["thing_iou"] is None
    else:
        np.testing.assert_allclose(metrics["thing_iou"], np.nanmean(things), rtol=1e-12)
    for value in metrics.values():
        if isinstance(value, float):
            assert np.isfinite(value)
    assert 0.0 <= metrics["mcd"] <= 2.0 and 0.0 <= metrics["invalid_map_pixels"] <= 1.0
    with Image.open(samples / "000007.png") as img:
        assert img.text["caption"] == ref["caption"][7]


def test_samples_equal_sample_mode_with_the_same_seeds(synthetic_run):
    # Sample i starts from key(seed + i) whatever the batch: sample mode's sampler (another
    # batch size, no sharding) must draw the same images and maps.
    config, workdir, _ = synthetic_run
    params, _ = checkpointing.load_params(str(workdir))
    _, info = pipeline.create_source(specs.from_config(config).data, "held_out")
    captions = synthetic.synthetic_world(specs.from_config(config).data).held_out_prompts(3)[
        "caption"
    ]
    run = specs.from_config(config)
    sampler = Sampler(run.model, run.diffusion, run.sampler, info, params, batch_size=3)
    out = sampler([5, 6, 7], captions=captions, task="cogenerate")
    samples = workdir / "eval" / "0" / "samples_cogenerate"
    for i in range(3):
        np.testing.assert_array_equal(_read(samples / f"{i:06d}.png"), out.images[i])
        np.testing.assert_array_equal(_read(samples / f"{i:06d}_map.png"), out.maps[i])


def test_second_run_regenerates_nothing_and_missing_samples_are_redone(synthetic_run):
    config, workdir, first = synthetic_run
    samples = workdir / "eval" / "0" / "samples_cogenerate"
    before = _files(samples)
    again = evaluate.run_evaluate(config, str(workdir))
    assert _files(samples) == before
    assert again["sampling"] == {"generated": 0, "reused": 12, "seconds": 0.0}
    assert {k: again[k] for k in SYNTHETIC_METRICS} == {k: first[k] for k in SYNTHETIC_METRICS}

    kept = {name: _read(samples / name) for name in ("000003_map.png", "000009.png")}
    (samples / "000003_map.png").unlink()
    (samples / "000009.png").unlink()
    config.eval.num_samples = 14
    try:
        third = evaluate.run_evaluate(config, str(workdir))
    finally:
        config.eval.num_samples = 12
    assert third["sampling"]["generated"] == 4  # 3, 9, and the new 12, 13
    after = _files(samples)
    assert {n for n in after if after[n] != before.get(n)} == {
        "000003.png",
        "000003_map.png",
        "000009.png",
        "000009_map.png",
        "000012.png",
        "000012_map.png",
        "000013.png",
        "000013_map.png",
    }
    for name, array in kept.items():
        np.testing.assert_array_equal(_read(samples / name), array)


def test_given_map_task_scores_the_oracle_reading_of_the_image(synthetic_run):
    config, workdir, _ = synthetic_run
    config.eval.task = "given_map"
    try:
        metrics = evaluate.run_evaluate(config, str(workdir))
    finally:
        config.eval.task = "cogenerate"
    samples = workdir / "eval" / "0" / "samples_given_map"
    assert not list(samples.glob("*_map.png"))
    images = np.stack([_read(samples / f"{i:06d}.png") for i in range(12)])
    world = synthetic.synthetic_world(specs.from_config(config).data)
    ref = world.held_out_prompts(12)
    seg = world.segment(images, ref["map"].shape[-1])
    assert {"mcd", "map_image_agreement", "caption_recall"} <= metrics.keys()
    np.testing.assert_allclose(metrics["mcd"], mcd_lib.mean_count_difference(ref["map"], seg))
    np.testing.assert_allclose(
        metrics["map_image_agreement"], mcd_lib.pixel_agreement(seg, ref["map"]), rtol=1e-6
    )
    both = json.loads((workdir / "eval" / "0" / "metrics.json").read_text())
    assert {"cogenerate", "given_map"} <= both.keys()


def test_samples_made_otherwise_are_refused(synthetic_run):
    config, workdir, _ = synthetic_run
    config.eval.seed = 6
    try:
        with pytest.raises(ValueError, match="seed"):
            evaluate.run_evaluate(config, str(workdir))
    finally:
        config.eval.seed = 5


def test_missing_checkpoint_names_the_directory(tmp_path):
    config = get_config("demo,tiny=1")
    with pytest.raises(checkpointing.CheckpointNotFoundError, match=str(tmp_path)):
        evaluate.run_evaluate(config, str(tmp_path))


def test_eval_settings_defaults_and_errors(tmp_path):
    config = get_config("demo,tiny=1")
    ev = evaluate.eval_settings(specs.from_config(config))
    assert ev.num_samples == evaluate.DEFAULT_NUM_SAMPLES["synthetic"] and ev.step == -1
    bad = get_config("demo,tiny=1")
    bad.eval = ml_collections.ConfigDict({**config.eval.to_dict(), "num_sample": 3})
    with pytest.raises(ValueError, match="num_sample"):
        evaluate.eval_settings(specs.from_config(bad))
    config.eval.inception = str(tmp_path)
    with pytest.raises(ValueError, match="fid_stats"):
        evaluate.eval_settings(specs.from_config(config))
    config.eval.inception = ""
    config.eval.clip = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        evaluate.eval_settings(specs.from_config(config))
    uvit = get_config("uvit,tiny=1")
    uvit.eval.task = "given_map"
    with pytest.raises(ValueError, match="PDM"):
        evaluate.eval_settings(specs.from_config(uvit))


# COCO-shaped data: prepare_coco output from the fake COCO tree with block-mean "VAE" moments
# and hashed "CLIP" contexts at the tiny model's sizes (8×8×4 latents, 4×16 contexts).
class _BlockMeanMoments:
    identity: ClassVar = {"path": "", "config": {"kind": "block mean"}, "params_sha256": "-"}
    scale_factor = 1.0
    latent_shape = (8, 8, 4)

    def __call__(self, images):
        x = images.reshape(len(images), 8, 32, 8, 32, 3).mean(axis=(2, 4)) / 127.5 - 1.0
        mean = np.concatenate([x, np.zeros((*x.shape[:-1], 1))], -1).astype(np.float32)
        return mean, np.full(mean.shape, -20.0, np.float32)


class _HashedContexts:
    identity: ClassVar = {"path": "", "config": {"kind": "crc32 normal"}, "params_sha256": "-"}

    def __call__(self, captions):
        rngs = [np.random.default_rng(zlib.crc32(c.encode())) for c in captions]
        return np.stack([r.standard_normal((4, 16)) for r in rngs]).astype(np.float32)


def _decode(latents: np.ndarray) -> np.ndarray:
    """8×8 latents → 32×32 uint8 images (first three channels, nearest ×4)."""
    rgb = np.clip(np.rint((latents[..., :3] + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return rgb.repeat(4, axis=-3).repeat(4, axis=-2)


def _tiny_clip_dir(directory) -> None:
    """A torch-free Hugging Face CLIP directory: config, tokenizer, random safetensors."""
    from safetensors.numpy import save_file
    from transformers import CLIPConfig

    vocab = fake_coco.write_clip_tokenizer(str(directory))
    size = {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 37}
    text = dict(size, vocab_size=vocab, max_position_embeddings=16, num_hidden_layers=1)
    vision = dict(size, image_size=32, patch_size=8, num_hidden_layers=1)
    CLIPConfig(
        text_config=dict(text, bos_token_id=vocab - 2, eos_token_id=vocab - 1),
        vision_config=vision,
        projection_dim=16,
    ).save_pretrained(str(directory))
    module = CLIPModel(
        ClipConfig(
            text=ClipTextConfig(**text, eos_token_id=vocab - 1),
            vision=ClipVisionConfig(**vision),
            projection_dim=16,
        )
    )
    shapes = jax.eval_shape(
        module.init, jax.random.key(0), np.zeros((1, 16), np.int32), np.zeros((1, 32, 32, 3))
    )["params"]
    rng, state = np.random.default_rng(0), {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        keys = [k.key for k in path]
        value = rng.standard_normal(leaf.shape) / np.sqrt(max(1, np.prod(leaf.shape[:-1])))
        if keys[-1] == "scale":
            value = np.ones(leaf.shape)
        elif keys[-1] == "kernel":
            value = value.T if value.ndim == 2 else value.transpose(3, 2, 0, 1)
        if keys[-1] in ("kernel", "scale", "embedding"):
            keys[-1] = "weight"
        name = ".".join(k.replace("layers_", "layers.") for k in keys)
        state[name] = np.array(value, np.float32)  # logit_scale stays 0-d
    save_file(state, os.path.join(directory, "model.safetensors"))


@pytest.fixture(scope="module")
def coco_setup(tmp_path_factory):
    tree = fake_coco.make_fake_coco(str(tmp_path_factory.mktemp("coco")))
    prepared = str(tmp_path_factory.mktemp("prepared"))
    prepare_coco.prepare(
        tree,
        prepared,
        "val",
        _BlockMeanMoments(),
        _HashedContexts(),
        options=prepare_coco.PrepareOptions(records_per_shard=2),
        show_progress=False,
    )
    weights = tmp_path_factory.mktemp("weights")
    np.savez(weights / "inception.npz", **random_state_dict())
    _tiny_clip_dir(weights / "clip")
    # Reference statistics with a full-rank covariance, so the FID is well conditioned.
    rng = np.random.default_rng(3)
    fid.save_stats(weights / "ref.npz", rng.random(2048), np.diag(rng.random(2048) + 0.5))
    return tree, prepared, weights


def _coco_info(source) -> schema.DatasetInfo:
    """COCO's tables with the test's stand-in text and image encoders."""
    return schema.DatasetInfo(
        empty_context=source.empty_context,
        encode_text=_HashedContexts(),
        encode_images=lambda images: _BlockMeanMoments()(images)[0],
        decode_latents=_decode,
        category_names=coco.category_names(),
        colour_table=coco.colour_table(),
        eval_prompts=(),
    )


@pytest.mark.slow
def test_coco_shaped_evaluation_with_tiny_random_networks(coco_setup, tmp_path):
    _, prepared, weights = coco_setup
    config = get_config("one_stream,tiny=1")
    config.data.update(source="coco", dir=prepared, latent_scale=1.0)
    config.eval.update(
        **{
            "num_samples": 7,
            "batch_size": 8,
            "inception": str(weights / "inception.npz"),
            "inception_batch_size": 8,
            "fid_stats": str(weights / "ref.npz"),
            "clip": str(weights / "clip"),
        }
    )
    _save_fresh_checkpoint(config, tmp_path)
    source = coco_source.coco_source_from_spec(specs.from_config(config).data, "val")
    info = _coco_info(source)
    metrics = evaluate.run_evaluate(config, str(tmp_path), info=info)
    assert {"fid", "clip_score", "mcd", "invalid_map_pixels"} <= metrics.keys()
    assert not {"map_image_agreement", "caption_recall"} & metrics.keys()  # no oracle on COCO
    assert all(np.isfinite(metrics[k]) for k in ("fid", "clip_score", "mcd"))

    # Sample i: record i mod 3 (images 1, 2, 3 in id order), caption (i div 3) mod K.
    ids = [1, 2, 3]
    samples = tmp_path / "eval" / "0" / "samples_cogenerate"
    images = np.stack([_read(samples / f"{i:06d}.png") for i in range(7)])
    gen = np.stack([_read(samples / f"{i:06d}_map.png") for i in range(7)]).astype(np.int32)
    for i in range(7):
        with Image.open(samples / f"{i:06d}.png") as img:
            assert img.text["caption"] == fake_coco.CAPTIONS[ids[i % 3]][i // 3]
    # The prepared 32×32 maps (min-pooled from 256), min-pooled again to the model's 16×16.
    stored = [maps.pool_map(fake_coco.expected_map_256(ids[i % 3]), 32, "min") for i in range(7)]
    truth = np.stack([maps.pool_map(m, 16, "min") for m in stored])
    np.testing.assert_allclose(metrics["mcd"], mcd_lib.mean_count_difference(truth, gen))

    variables = inception.convert_inception_state_dict(random_state_dict())
    features = np.asarray(inception.inception_pool_features(variables, images), np.float64)
    # Closed form for a diagonal reference covariance D: Tr((Σ D)^½) is the sum of the square
    # roots of the eigenvalues of D^½ Σ D^½ (no scipy.linalg.sqrtm involved).
    mu, sigma = fid.feature_statistics(features)
    mu_ref, sigma_ref = fid.load_stats(weights / "ref.npz")
    d = np.sqrt(np.diag(sigma_ref))
    eig = np.clip(np.linalg.eigvalsh(d[:, None] * sigma * d[None, :]), 0.0, None)
    expected_fid = (
        np.sum((mu - mu_ref) ** 2) + np.trace(sigma) + np.trace(sigma_ref) - 2 * np.sqrt(eig).sum()
    )
    np.testing.assert_allclose(metrics["fid"], expected_fid, rtol=1e-4)
    with np.load(tmp_path / "eval" / "0" / "fid_stats_cogenerate.npz") as saved:
        np.testing.assert_allclose(saved["mu"], mu, rtol=1e-5, atol=1e-6)

    from pdm_jax.weights import clip as hf_clip

    embedder = hf_clip.load_clip_embedder(weights / "clip")
    captions = [fake_coco.CAPTIONS[ids[i % 3]] for i in range(7)]
    per_image = [
        clip_score.clip_score(
            embedder.image_embeds(images[i : i + 1]), embedder.text_embeds(c)[None]
        )
        for i, c in enumerate(captions)
    ]
    np.testing.assert_allclose(metrics["clip_score"], np.mean(per_image), rtol=1e-5)


def _with_eval(config, **changes):
    """Sets ``config.eval`` fields; returns the old values (restore with ``update``)."""
    old = {k: config.eval[k] for k in changes}
    config.eval.update(**changes)
    return old


def test_given_image_task_scores_the_generated_maps_against_the_ground_truth(synthetic_run):
    config, workdir, _ = synthetic_run
    old = _with_eval(config, task="given_image", num_samples=6)
    try:
        metrics = evaluate.run_evaluate(config, str(workdir))
    finally:
        config.eval.update(**old)
    samples = workdir / "eval" / "0" / "samples_given_image"
    assert not list(samples.glob("??????.png"))  # the image is given: only maps are written
    gen = np.stack([_read(samples / f"{i:06d}_map.png") for i in range(6)]).astype(np.int32)
    ref = synthetic.synthetic_world(specs.from_config(config).data).held_out_prompts(6)
    counts = pq_lib.segmentation_counts(ref["map"], gen, world_lib.THING_IDS, world_lib.STUFF_IDS)
    expected = pq_lib.segmentation_summary(counts, world_lib.THING_IDS, world_lib.STUFF_IDS)
    for key, value in expected.items():
        if value is None:
            assert metrics[key] is None, key
        else:
            np.testing.assert_allclose(metrics[key], value, rtol=1e-12, err_msg=key)
    np.testing.assert_allclose(metrics["mcd"], mcd_lib.mean_count_difference(ref["map"], gen))
    # The map generated for the held-out latent, as sample mode's sampler draws it.
    run = specs.from_config(config)
    _, info = pipeline.create_source(run.data, "held_out")
    params, _ = checkpointing.load_params(str(workdir))
    sampler = Sampler(run.model, run.diffusion, run.sampler, info, params, batch_size=2)
    latents = ref["latent"][:2] * np.float32(run.data.latent_scale)
    out = sampler(
        [5, 6],
        captions=ref["caption"][:2],
        task="given_image",
        known_latents=latents,
        decode_images=False,
    )
    np.testing.assert_array_equal(out.maps, gen[:2])


def test_inpaint_task_keeps_the_known_region_and_scores_the_box(synthetic_run):
    config, workdir, _ = synthetic_run
    old = _with_eval(config, task="inpaint", num_samples=6, mask_fraction=0.3)
    try:
        metrics = evaluate.run_evaluate(config, str(workdir))
    finally:
        config.eval.update(**old)
    assert metrics["known_latent_max_abs_diff"] == 0.0
    assert metrics["known_map_max_abs_diff"] == 0.0
    samples = workdir / "eval" / "0" / "samples_inpaint"
    gen = np.stack([_read(samples / f"{i:06d}_map.png") for i in range(6)]).astype(np.int32)
    run = specs.from_config(config)
    ref = synthetic.synthetic_world(run.data).held_out_prompts(6)["map"]
    s, m = run.model.img_size, run.model.map_size
    boxes = np.stack(
        [eval_prompts.upscale_mask(eval_prompts.inpaint_mask(5, i, s, 0.3), m) for i in range(6)]
    )
    np.testing.assert_array_equal(gen[~boxes], ref[~boxes])  # the known map, exactly
    assert abs(boxes.mean() - 0.3) < 0.1 and 0.2 < metrics["mask_fraction"] < 0.4
    np.testing.assert_allclose(metrics["mask_fraction"], boxes.mean())
    inside = lambda a: np.where(boxes, a, 0)
    counts = pq_lib.segmentation_counts(
        inside(ref), inside(gen), world_lib.THING_IDS, world_lib.STUFF_IDS
    )
    expected = pq_lib.segmentation_summary(counts, world_lib.THING_IDS, world_lib.STUFF_IDS)
    np.testing.assert_allclose(metrics["masked_miou"], expected["miou"], rtol=1e-12)
    things = mcd_lib.category_iou_per_pair(inside(gen), inside(ref), world_lib.THING_IDS)
    if np.all(np.isnan(things)):
        assert metrics["masked_thing_iou"] is None
    else:
        np.testing.assert_allclose(metrics["masked_thing_iou"], np.nanmean(things), rtol=1e-12)
    assert {"thing_iou", "caption_recall", "masked_thing_iou_image"} <= metrics.keys()


def test_inpaint_masks_are_seeded_boxes_of_the_asked_share():
    a = eval_prompts.inpaint_mask(0, 3, 16, 0.25)
    np.testing.assert_array_equal(a, eval_prompts.inpaint_mask(0, 3, 16, 0.25))
    assert not np.array_equal(a, eval_prompts.inpaint_mask(0, 4, 16, 0.25))
    rows, cols = np.nonzero(a)
    assert a.sum() == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)  # one box
    shares = [eval_prompts.inpaint_mask(1, i, 16, 0.25).mean() for i in range(50)]
    assert abs(np.mean(shares) - 0.25) < 0.02
    with pytest.raises(ValueError, match="mask_fraction"):
        eval_prompts.inpaint_mask(0, 0, 16, 1.0)


def test_sweep_writes_a_table_with_every_cell(synthetic_run):
    config, workdir, _ = synthetic_run
    old = _with_eval(config, task="given_image", num_samples=3, sweep="sde_multistep:4,2;fast:2")
    try:
        table = evaluate.run_evaluate(config, str(workdir))
    finally:
        config.eval.update(**old)
    cells = [(r["method"], r["order"], r["nfe"]) for r in table["cells"]]
    # The cells in the order given, at the config's sampler order (the demo's: 1).
    order = config.sampler.order
    assert cells == [("sde_multistep", order, 4), ("sde_multistep", order, 2), ("fast", order, 2)]
    eval_dir = workdir / "eval" / "0"
    assert json.loads((eval_dir / "sweep_given_image.json").read_text()) == table
    md = (eval_dir / "sweep_given_image.md").read_text().splitlines()
    assert md[2].startswith("| method | order | NFE | thing_iou") and len(md) == 4 + 3
    for row in table["cells"]:
        cell = eval_dir / "sweep_given_image" / f"{row['method']}_o{row['order']}_nfe{row['nfe']}"
        written = json.loads((cell / "metrics.json").read_text())["given_image"]
        assert written["sampler"]["steps"] == row["nfe"] and written["pq"] == row["pq"]


def test_sweep_strings_are_parsed_or_refused():
    cells = evaluate.parse_sweep(" multistep/3:10,20 ; sde_multistep:5;multistep/3:10", 3)
    assert [(c.method, c.order, c.steps) for c in cells] == [
        ("multistep", 3, 10),
        ("multistep", 3, 20),
        ("sde_multistep", 2, 5),
    ]
    for bad, match in (
        ("euler:10", "unknown"),
        ("fast", "NFE"),
        ("fast:ten", "not understood"),
        ("sde_multistep/3:10", "no order 3"),
        ("multistep/3:2", "below the order"),
        (";", "names no cell"),
    ):
        with pytest.raises(ValueError, match=match):
            evaluate.parse_sweep(bad, 2)


@pytest.mark.slow
def test_coco_shaped_segmentation(coco_setup, tmp_path):
    _, prepared, _ = coco_setup
    config = get_config("one_stream,tiny=1")
    config.data.update(source="coco", dir=prepared, latent_scale=1.0)
    config.eval.update(num_samples=3, batch_size=8, task="given_image")
    _save_fresh_checkpoint(config, tmp_path)
    source = coco_source.coco_source_from_spec(specs.from_config(config).data, "val")
    info = _coco_info(source)
    metrics = evaluate.run_evaluate(config, str(tmp_path), info=info)
    samples = tmp_path / "eval" / "0" / "samples_given_image"
    gen = np.stack([_read(samples / f"{i:06d}_map.png") for i in range(3)]).astype(np.int32)
    truth = np.stack([source[i]["map"] for i in range(3)])
    categories = coco.load_categories()
    things = [c["id"] for c in categories if c["isthing"]]
    stuff = [c["id"] for c in categories if not c["isthing"]]
    expected = pq_lib.segmentation_summary(
        pq_lib.segmentation_counts(truth, gen, things, stuff), things, stuff
    )
    assert {k: metrics[k] for k in expected} == expected
    assert "map_image_agreement" not in metrics  # no oracle on COCO
