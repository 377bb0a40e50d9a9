"""prepare_coco end to end on a fake COCO tree with tiny random Flax VAE and CLIP encoders,
read back with the grain source and the trainer's pipeline."""

import json
import os
import re
import shutil

import jax
import numpy as np
import pytest

from configs.pdm import get_config
from pdm_jax import specs
from pdm_jax.data import pipeline
from pdm_jax.data.coco import encoders as coco_encoders
from pdm_jax.data.coco import panoptic as coco
from pdm_jax.data.coco import prepare as prepare_coco
from pdm_jax.data.coco import records
from pdm_jax.data.coco import source as coco_source
from pdm_jax.models.clip import ClipTextConfig, CLIPTextModel
from pdm_jax.models.vae import AutoencoderKL
from tests.data import fake_coco

SCALE = fake_coco.VAE_SCALE
OPTIONS = prepare_coco.PrepareOptions(records_per_shard=2)
TINY_VAE = fake_coco.TINY_VAE


def _random_params(module, *inputs, seed):
    """Random weights without running ``init`` (LayerNorm/GroupNorm scales 1, biases 0)."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return np.ones(leaf.shape, np.float32)
        if "bias" in name:
            return np.zeros(leaf.shape, np.float32)
        fan_in = max(1, int(np.prod(leaf.shape[:-1])))
        return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    from transformers import CLIPTokenizer

    tok_dir = str(tmp_path_factory.mktemp("tokenizer"))
    vocab_size = fake_coco.write_clip_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True)
    text_config = ClipTextConfig(
        vocab_size=vocab_size,
        max_position_embeddings=16,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        eos_token_id=vocab_size - 1,
    )
    text = CLIPTextModel(text_config)
    text_params = _random_params(text, np.zeros((1, 16), np.int32), seed=1)
    vae = AutoencoderKL(TINY_VAE)
    vae_params = _random_params(vae, np.zeros((1, 16, 16, 3), np.float32), seed=0)
    return (
        coco_encoders.VaeMoments(vae, vae_params, batch_size=2),
        coco_encoders.ClipContexts(text, text_params, tokenizer, batch_size=8),
    )


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return fake_coco.make_fake_coco(str(tmp_path_factory.mktemp("coco")))


def _prepare(tree, out, encoders, **kw):
    kw.setdefault("options", OPTIONS)
    return prepare_coco.prepare(
        tree, out, "val", *encoders, batch_size=2, show_progress=False, **kw
    )


@pytest.fixture(scope="module")
def prepared(tree, encoders, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("prepared"))
    return out, _prepare(tree, out, encoders)


def _file_bytes(out):
    names = sorted(n for n in os.listdir(out) if n.endswith(".array_record"))
    return {n: open(os.path.join(out, n), "rb").read() for n in names}


def test_metadata_counts_and_identities(prepared, encoders):
    out, result = prepared
    meta = result["metadata"]
    assert meta == records.read_metadata(out, "val")
    assert meta["counts"] == {
        "images_listed": 4,
        "records": 3,
        "skipped_no_panoptic": 1,
        "skipped_no_captions": 0,
        "skipped_bad": 0,
    }
    assert meta["skipped_no_panoptic"] == [4] and meta["bad_files"] == []
    assert [f["num_records"] for f in meta["files"]] == [2, 1]
    assert meta["num_captions"] == 5 + 5 + 6
    assert meta["latent_shape"] == [32, 32, 4] and meta["context_shape"] == [16, 32]
    assert meta["map_sizes"] == [32, 64, 128] and meta["map_pooling"] == "min"
    assert meta["vae"]["scale_factor"] == pytest.approx(SCALE)
    assert meta["vae"]["params_sha256"] == encoders[0].identity["params_sha256"]
    assert meta["text_encoder"]["config"]["hidden_size"] == 32
    assert len(meta["categories"]) == 133
    empty = np.load(os.path.join(out, records.EMPTY_CONTEXT_FILE))
    np.testing.assert_array_equal(empty, encoders[1]([""])[0])


def test_records_hold_each_images_own_maps_moments_and_contexts(prepared, tree, encoders):
    out, _ = prepared
    vae, text = encoders
    source = coco_source.CocoSource(out, "val")
    assert [source.record(i)["image_id"] for i in range(len(source))] == [1, 2, 3]
    for i, image_id in enumerate((1, 2, 3)):
        rec = source.record(i)
        assert rec["captions"] == fake_coco.CAPTIONS[image_id]
        full = fake_coco.expected_map_256(image_id)
        for side in (32, 64, 128):
            k = 256 // side
            want = full.reshape(side, k, side, k).min(axis=(1, 3))
            np.testing.assert_array_equal(rec[f"map_{side}"], want)
        image = coco.load_image(os.path.join(tree, "val2017", f"{image_id:012d}.jpg"))[0]
        mean, logvar = vae(image[None])
        np.testing.assert_allclose(rec["mean"], mean[0], atol=1e-5)
        np.testing.assert_allclose(rec["logvar"], logvar[0], atol=1e-5)
        want_ctx = text(fake_coco.CAPTIONS[image_id])
        assert rec["contexts"].dtype == np.float16
        np.testing.assert_allclose(rec["contexts"].astype(np.float32), want_ctx, atol=2e-3)
        assert np.abs(want_ctx[0] - want_ctx[1]).max() > 1e-2  # captions are distinguishable


def test_training_view_draws_reproducibly_per_epoch(prepared):
    out, _ = prepared
    source = coco_source.CocoSource(out, "val", map_size=64, seed=3)
    assert len(source) == 3
    rec = source.record(2)
    ex = source[2]
    rng = np.random.default_rng((3, 2, 0))
    eps = rng.standard_normal((32, 32, 4), dtype=np.float32)
    want = (rec["mean"] + np.exp(0.5 * rec["logvar"]) * eps) * np.float32(SCALE)
    np.testing.assert_allclose(ex["latent"], want, rtol=1e-6)
    assert ex["caption"] == rec["captions"][int(rng.integers(6))]
    np.testing.assert_array_equal(source[2]["latent"], ex["latent"])  # reproducible
    assert not np.allclose(source[2 + 3]["latent"], ex["latent"])  # epoch 1 draws anew
    seen = set()
    for epoch in range(40):
        e = source[2 + 3 * epoch]
        k = rec["captions"].index(e["caption"])
        np.testing.assert_array_equal(e["context"], rec["contexts"][k].astype(np.float32))
        np.testing.assert_array_equal(e["map"], rec["map_64"])
        seen.add(k)
    assert seen == set(range(6))
    # A side below the stored ones is min-pooled from the smallest stored multiple.
    small = coco_source.CocoSource(out, "val", map_size=16)[0]["map"]
    full = fake_coco.expected_map_256(1)
    np.testing.assert_array_equal(small, full.reshape(16, 16, 16, 16).min(axis=(1, 3)))
    assert small.dtype == np.int32
    with pytest.raises(ValueError, match="map pooling 'min', not 'mode'"):
        coco_source.CocoSource(out, "val", map_size=64, map_pooling="mode")


def _config(out):
    config = get_config("one_stream")
    config.model.update(img_size=32, in_chans=4, clip_dim=32, num_clip_token=16)
    config.data.update(dir=out, latent_scale=SCALE, num_workers=0, seed=5)
    config.train.batch_size = 8
    return config


def test_trainer_pipeline_reads_prepared_coco(prepared):
    out, _ = prepared
    config = _config(out)
    source = coco_source.coco_source_from_spec(specs.from_config(config).data, "held_out")
    loader = pipeline.create_loader(
        source, specs.from_config(config).data, batch_size=config.train.batch_size
    )
    it = iter(loader)
    batch = next(it)
    assert batch["latent"].shape == (8, 32, 32, 4) and batch["latent"].dtype == np.float32
    assert batch["map"].shape == (8, 64, 64) and batch["map"].dtype == np.int32
    assert batch["context"].shape == (8, 16, 32)
    # 8 draws from 3 images: repeated images carry fresh latent noise.
    firsts = [int(m[0, 0]) for m in batch["map"]]  # 187, 199, 17 identify images 1, 2, 3
    same = [j for j in range(1, 8) if firsts[j] == firsts[0]]
    assert same and not np.allclose(batch["latent"][0], batch["latent"][same[0]])
    state = it.get_state()
    following = next(it)
    resumed = iter(loader)
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["latent"], following["latent"])

    config.data.latent_scale = 0.18215
    with pytest.raises(ValueError, match=re.escape("--config.data.latent_scale=0.2301")):
        coco_source.coco_source_from_spec(specs.from_config(config).data, "val")
    config = _config(out)
    config.model.clip_dim = 768
    with pytest.raises(ValueError, match="context_shape"):
        coco_source.coco_source_from_spec(specs.from_config(config).data, "val")
    config = _config("")
    with pytest.raises(ValueError, match=re.escape("--config.data.dir")):
        coco_source.coco_source_from_spec(specs.from_config(config).data, "val")


class _FailingEncoder:
    """Delegates to an image encoder and raises on call number ``fail_at``."""

    def __init__(self, inner, fail_at):
        self.inner, self.fail_at, self.calls = inner, fail_at, 0
        self.identity, self.scale_factor = inner.identity, inner.scale_factor
        self.latent_shape = inner.latent_shape

    def __call__(self, images):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("simulated interruption")
        return self.inner(images)


def test_resume_after_interruption_gives_identical_files(prepared, tree, encoders, tmp_path):
    ref_out, ref = prepared
    out = str(tmp_path / "out")
    failing = _FailingEncoder(encoders[0], fail_at=2)
    with pytest.raises(KeyboardInterrupt):
        _prepare(tree, out, (failing, encoders[1]))
    assert sorted(os.listdir(out)) == [
        records.PROGRESS_DIR,
        records.EMPTY_CONTEXT_FILE,
        "val-00000-of-00002.array_record",
    ]  # the interrupted file left neither a temporary nor a marker
    assert records.existing_markers(out, "val") == ["val-00000-of-00002.array_record"]
    with pytest.raises(FileNotFoundError, match="1 of its files are finished"):
        coco_source.CocoSource(out, "val")
    result = _prepare(tree, out, encoders)
    assert result["files_skipped"] == ["val-00000-of-00002.array_record"]
    assert result["files_written"] == ["val-00001-of-00002.array_record"]
    assert _file_bytes(out) == _file_bytes(ref_out)
    assert result["metadata"] == ref["metadata"]


def test_hosts_split_the_files_and_the_last_writes_metadata(prepared, tree, encoders, tmp_path):
    ref_out, ref = prepared
    out = str(tmp_path / "out")
    second = _prepare(tree, out, encoders, shard_index=1, num_shards=2)
    assert second["files_written"] == ["val-00001-of-00002.array_record"]
    assert second["metadata"] is None
    first = _prepare(tree, out, encoders, shard_index=0, num_shards=2)
    assert first["files_written"] == ["val-00000-of-00002.array_record"]
    assert first["metadata"] == ref["metadata"]
    assert _file_bytes(out) == _file_bytes(ref_out)
    again = _prepare(tree, out, encoders)
    assert again["files_written"] == [] and len(again["files_skipped"]) == 2
    with pytest.raises(ValueError, match="other settings or encoders"):
        _prepare(tree, out, encoders, options=prepare_coco.PrepareOptions(2, map_pooling="mode"))
    with pytest.raises(ValueError, match="shard_index"):
        _prepare(tree, out, encoders, shard_index=2, num_shards=2)


def test_corrupt_inputs_stop_or_are_skipped_and_listed(encoders, tmp_path):
    tree = fake_coco.make_fake_coco(str(tmp_path / "coco"), corrupt=True)
    out = str(tmp_path / "out")
    with pytest.raises(coco.CorruptFileError, match=r"val2017/000000000005\.jpg") as err:
        _prepare(tree, out, encoders)
    assert err.value.path.endswith("000000000005.jpg")
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    shutil.rmtree(out)
    meta = _prepare(tree, out, encoders, skip_bad=True)["metadata"]
    assert meta["counts"]["skipped_bad"] == 2 and meta["counts"]["records"] == 3
    bad = {b["image_id"]: b["path"] for b in meta["bad_files"]}
    assert bad[5].endswith(os.path.join("val2017", "000000000005.jpg"))
    assert bad[6].endswith(os.path.join("panoptic_val2017", "000000000006.png"))
    assert [f["num_records"] for f in meta["files"]] == [2, 1, 0]  # image 6 was alone
    source = coco_source.CocoSource(out, "val")
    assert [source.record(i)["image_id"] for i in range(len(source))] == [1, 2, 3]
    assert json.loads(json.dumps(meta)) == records.read_metadata(out, "val")


def test_resolution_512_writes_64_latents_and_maps_f_times_64(tree, encoders, tmp_path):
    # Stable Diffusion's size: 512-px crops → 64×64 latents; maps at f × 64, f = 1, 2, 4.
    vae, text = encoders
    vae512 = coco_encoders.VaeMoments(vae.module, vae.params, batch_size=2, image_size=512)
    options = prepare_coco.PrepareOptions(records_per_shard=2, resolution=512)
    assert options.map_sizes == (64, 128, 256)
    with pytest.raises(ValueError, match=r"encoder takes 256-px images but --resolution=512"):
        _prepare(tree, str(tmp_path / "mixed"), (vae, text), options=options)
    out = str(tmp_path / "out")
    meta = _prepare(tree, out, (vae512, text), options=options)["metadata"]
    assert meta["image_size"] == 512 and meta["latent_shape"] == [64, 64, 4]
    assert meta["map_sizes"] == [64, 128, 256] and meta["counts"]["records"] == 3
    rec = coco_source.CocoSource(out, "val").record(0)
    assert rec["mean"].shape == rec["logvar"].shape == (64, 64, 4)
    for side in (64, 128, 256):
        assert rec[f"map_{side}"].shape == (side, side)
    # Each map is min-pooled from the same 512 map: the coarser ones are pools of the finer.
    fine = rec["map_256"]
    np.testing.assert_array_equal(rec["map_128"], fine.reshape(128, 2, 128, 2).min(axis=(1, 3)))
    np.testing.assert_array_equal(rec["map_64"], fine.reshape(64, 4, 64, 4).min(axis=(1, 3)))
    image = coco.load_image(os.path.join(tree, "val2017", "000000000001.jpg"), 512)[0]
    np.testing.assert_allclose(rec["mean"], vae512(image[None])[0][0], atol=1e-5)
    with pytest.raises(ValueError, match=r"--resolution=384 is not supported; choose 256 .* 512"):
        prepare_coco.PrepareOptions(resolution=384)
