"""End-to-end tests of the real trainer (grain, orbax, clu) and sample mode, synthetic world."""

import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from configs import pdm as pdm_configs
from pdm_jax import checkpointing
from pdm_jax.data import pipeline
from pdm_jax.data.synthetic import world as synthetic_world
from pdm_jax.evaluation import demo
from pdm_jax.sampling import mode as sample_mode
from pdm_jax.train import trainer


def _config(steps=2):
    c = pdm_configs.get_config("demo,tiny=1")
    c.data.update(num_workers=0, num_threads=1, prefetch=8, num_records=256)
    c.train.update(
        num_train_steps=steps,
        log_every_steps=1,
        eval_every_steps=2,
        checkpoint_every_steps=2,
        num_eval_prompts=2,
    )
    c.sample.batch_size = 2
    c.demo.num_prompts = 3
    return c


def _scalar_tags(workdir):
    tags = set()
    for path in workdir.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            tags.update(v.tag for v in event.summary.value)
    return tags


@pytest.mark.slow
def test_two_step_run_then_sample_mode(tmp_path):
    config = _config()
    state = trainer.train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == 2
    for item in (checkpointing.STATE, checkpointing.DATA, checkpointing.CONFIG):
        assert (tmp_path / "checkpoints" / "2" / item).is_dir(), item
    saved_config = json.loads((tmp_path / "checkpoints/2/config/metadata").read_text())
    assert saved_config["model"]["embed_dim"] == config.model.embed_dim
    tags = _scalar_tags(tmp_path)
    for tag in ("image_loss", "map_loss", "grad_norm", "learning_rate", "examples_per_sec"):
        assert tag in tags, tags
    assert "steps_per_sec" in tags  # from ReportProgress
    grid = np.asarray(Image.open(tmp_path / "samples" / "step_0000002.png"))
    assert grid.ndim == 3 and grid.shape[0] > 2 * 128

    # Sample mode: latest checkpoint, EMA params, one prompt, two seeds.
    config.sample.update(prompt="big ball top-left, sky over sea", num_samples=2)
    out = sample_mode.run(config, str(tmp_path))
    meta = json.loads((out / "samples.json").read_text())
    assert meta["step"] == 2 and [s["seed"] for s in meta["samples"]] == [0, 1]
    valid = {c.id for c in synthetic_world.CATEGORIES}
    for k in range(2):
        for suffix in ("image.png", "map.png", "map.npy"):
            assert (out / f"{k:03d}_{suffix}").exists()
        ids = np.load(out / f"{k:03d}_map.npy")
        assert ids.shape == (8, 8) and set(np.unique(ids)) <= valid
    assert (out / "grid.png").exists()

    # The same seed gives the same sample whatever the batch it is in.
    config.sample.update(num_samples=1, out_dir=str(tmp_path / "again"))
    again = sample_mode.run(config, str(tmp_path))
    np.testing.assert_array_equal(np.load(again / "000_map.npy"), np.load(out / "000_map.npy"))

    # Given map (the ids just written) and inpainting with a mask PNG.
    config.sampler.task = "given_map"
    config.sample.update(map=str(out / "000_map.npy"), out_dir=str(tmp_path / "given"))
    given = sample_mode.run(config, str(tmp_path))
    np.testing.assert_array_equal(np.load(given / "000_map.npy"), np.load(out / "000_map.npy"))
    mask = np.zeros((8, 8), np.uint8)
    mask[:, 4:] = 255  # regenerate the right half
    Image.fromarray(mask).save(tmp_path / "mask.png")
    config.sampler.task = "inpaint"
    config.sample.update(mask=str(tmp_path / "mask.png"), out_dir=str(tmp_path / "inpaint"))
    inpainted = np.load(sample_mode.run(config, str(tmp_path)) / "000_map.npy")
    np.testing.assert_array_equal(inpainted[:, :4], np.load(out / "000_map.npy")[:, :4])

    # The demo figures from the same checkpoint.
    config.sampler.task = "cogenerate"
    metrics = demo.evaluate(config, str(tmp_path))
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written == metrics
    for task in ("cogenerate", "given_map"):
        for key in ("map_image_agreement", "caption_recall"):
            assert 0.0 <= written[task][key] <= 1.0
        assert 0.0 <= written[task]["mcd"] <= 2.0
        assert written[task]["thing_iou"] is None or 0.0 <= written[task]["thing_iou"] <= 1.0
    assert written["reference"]["oracle_agreement"] > 0.9
    # The tiny config's 8×8 renders blur the things' edges: its ceiling is lower (0.71)
    # than the demo's 16×16 (0.87).
    assert written["reference"]["thing_iou"] > 0.6


class _PoisonedSource:
    """A source whose latents are NaN."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __repr__(self):  # grain checks the source's repr when restoring its position
        return repr(self.source)

    def __getitem__(self, index):
        record = dict(self.source[index])
        record["latent"] = np.full_like(record["latent"], np.nan)
        return record


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    config = _config(steps=2)
    config.train.update(eval_every_steps=0, checkpoint_every_steps=1, log_every_steps=5)
    trainer.train_and_evaluate(config, str(tmp_path))
    original = pipeline.SOURCES["synthetic"]

    def poisoned(cfg, split):
        source, info = original(cfg, split)
        return _PoisonedSource(source), info

    monkeypatch.setitem(pipeline.SOURCES, "synthetic", poisoned)
    config.train.num_train_steps = 4
    with pytest.raises(trainer.NonFiniteLossError, match="at step 3") as info:
        trainer.train_and_evaluate(config, str(tmp_path))
    assert "Last good checkpoint: step 2" in str(info.value)
    assert checkpointing.locate(tmp_path)[1] == 2
