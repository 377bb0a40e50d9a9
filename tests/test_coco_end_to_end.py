"""COCO from the standard download to scores and samples, through the commands users run.

On the fake COCO tree (``tests.data.fake_coco``, its val split copied as train) with a tiny
random VAE and CLIP text encoder: ``python -m pdm_jax.data.coco.prepare`` for both splits,
then ``python -m pdm_jax.main`` to train ``two_stream,tiny=1`` (at the COCO geometry) from
a U-ViT checkpoint with a sample grid and a checkpoint, to evaluate it and to sample it
from a raw prompt. Every command runs in the fixtures' directory with relative and
``~``-relative paths, as typed at a shell. Training gets no CLIP: the grid samples the eval
captions, whose contexts the prepared data holds.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import pdm as pdm_configs
from pdm_jax import models
from pdm_jax.models.clip import ClipTextConfig, CLIPTextModel
from pdm_jax.models.vae import AutoencoderKL
from pdm_jax.weights import components
from tests.data import fake_coco
from tests.test_main_coco import MODEL, TEXT, _random_params, _random_tree, _write_hf_clip_text
from tests.train import saved_states

REPO = Path(__file__).resolve().parents[1]
SCALE = fake_coco.VAE_SCALE
GEOMETRY = [f"--config.model.{k}={v}" for k, v in MODEL.items()]


def _run(root: Path, module: str, *args: str) -> str:
    """Runs ``python -m module args`` in ``root`` with ``HOME=root``; returns its stderr.

    The commands share a JAX compilation cache in ``root`` (programs the same in two of
    them, e.g. the VAE and CLIP encoders of the two prepared splits, compile once).
    """
    env = dict(
        os.environ,
        HOME=str(root),
        PYTHONPATH=str(REPO),
        JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
    )
    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stderr


def _fixtures(root: Path) -> None:
    """``clip/`` (Hugging Face layout), ``vae/`` (converted), ``coco/`` (train and val)."""
    vocab_size = fake_coco.write_clip_tokenizer(str(root / "clip"))
    text = CLIPTextModel(ClipTextConfig(vocab_size=vocab_size, eos_token_id=vocab_size - 1, **TEXT))
    text_params = _random_params(text, np.zeros((1, 16), np.int32), seed=1)
    _write_hf_clip_text(root / "clip", text_params, vocab_size)
    vae = AutoencoderKL(fake_coco.TINY_VAE)
    vae_params = _random_params(vae, np.zeros((1, 16, 16, 3), np.float32), seed=0)
    components.save_component(str(root / "vae"), "vae", vae_params, fake_coco.TINY_VAE)
    tree = Path(fake_coco.make_fake_coco(str(root / "coco")))
    shutil.copytree(tree / "val2017", tree / "train2017")
    ann = tree / "annotations"
    shutil.copytree(ann / "panoptic_val2017", ann / "panoptic_train2017")
    for name in ("captions_{}2017.json", "panoptic_{}2017.json"):
        shutil.copy(ann / name.format("val"), ann / name.format("train"))


@pytest.mark.slow
def test_two_stream_on_prepared_coco_trains_evaluates_and_samples(tmp_path):
    root = tmp_path
    _fixtures(root)
    for split in ("train", "val"):
        _run(
            root,
            "pdm_jax.data.coco.prepare",
            "--coco_dir=coco",
            "--output_dir=~/prepared",
            f"--split={split}",
            "--vae=vae",
            "--clip=~/clip",
            "--records_per_shard=2",
            "--batch_size=2",
            "--num_threads=1",
        )
    assert json.loads((root / "prepared" / "metadata_val.json").read_text())["counts"]

    # The image stream's U-ViT, at the COCO geometry (untrained, random weights).
    uvit = pdm_configs.get_config("uvit,tiny=1")
    uvit.model.update(**MODEL)
    params = _random_tree(models.abstract_params(uvit.model), seed=2)
    saved_states.save_state(root / "uvit", saved_states.params_only_state(params), uvit)

    common = [
        f"--config={REPO}/configs/pdm.py:two_stream,tiny=1",
        "--workdir=runs/pdm",
        "--vae=vae",
        "--config.data.dir=~/prepared",
        f"--config.data.latent_scale={SCALE}",
        "--config.data.num_workers=0",
        *GEOMETRY,
    ]
    log = _run(
        root,
        "pdm_jax.main",
        *common,
        "--config.ckpt.init_from=~/uvit",
        "--config.train.num_train_steps=2",
        "--config.train.log_every_steps=1",
        "--config.train.eval_every_steps=2",
        "--config.train.checkpoint_every_steps=2",
        "--config.train.num_eval_prompts=2",
    )
    run = root / "runs" / "pdm"
    assert f"parameters from {root}/uvit/checkpoints/0 (ckpt.init_from)" in log
    assert (run / "checkpoints" / "2" / "state").is_dir()
    assert (run / "samples" / "step_0000002.png").is_file()  # decoded by the VAE, no CLIP

    _run(
        root,
        "pdm_jax.main",
        *common,
        "--mode=evaluate",
        "--config.eval.num_samples=3",
        "--config.eval.batch_size=3",
    )
    metrics = json.loads((run / "eval" / "2" / "metrics.json").read_text())
    assert metrics["step"] == 2 and metrics["cogenerate"]["sampling"]["generated"] == 3
    assert 0 <= metrics["cogenerate"]["mcd"] <= 2
    assert len(list((run / "eval" / "2" / "samples_cogenerate").glob("00000?.png"))) == 3

    _run(
        root,
        "pdm_jax.main",
        *common,
        "--mode=sample",
        "--text_encoder=~/clip",
        "--config.sample.prompt=a dog on the wooden floor",
        "--config.sample.out_dir=out",
    )
    meta = json.loads((root / "out" / "samples.json").read_text())
    assert meta["step"] == 2 and meta["samples"][0]["caption"] == "a dog on the wooden floor"
    assert (root / "out" / "000_image.png").is_file()
    assert np.load(root / "out" / "000_map.npy").shape == (64, 64)
