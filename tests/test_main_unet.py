"""``python -m pdm_jax.main`` on a tiny UNet PDM: train, evaluate, sample; init_from errors."""

import json

import jax
import numpy as np
import pytest

from configs import pdm as pdm_configs
from pdm_jax import models
from pdm_jax.models import unet
from tests.cli import run_main
from tests.train import saved_states


@pytest.mark.slow
def test_tiny_unet_pdm_trains_then_evaluates_and_samples(tmp_path):
    common = (
        "--config=configs/pdm.py:demo_unet,tiny=1",
        f"--workdir={tmp_path}",
        "--config.sampler.steps=2",
        "--config.sampler.order=1",
    )
    train = run_main(
        *common,
        "--config.train.num_train_steps=2",
        "--config.train.checkpoint_every_steps=2",
        "--config.train.eval_every_steps=100",
        "--config.demo.use_metrics=False",
    )
    assert train.returncode == 0, train.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "2").is_dir()

    evaluate = run_main(
        *common, "--mode=evaluate", "--config.eval.num_samples=4", "--config.eval.batch_size=4"
    )
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "2" / "metrics.json").read_text())
    assert metrics["step"] == 2 and metrics["cogenerate"]["num_samples"] == 4
    assert np.isfinite(metrics["cogenerate"]["mcd"])

    out = tmp_path / "samples"
    sample = run_main(
        *common,
        "--mode=sample",
        "--config.sample.prompt=big ball top-left",
        "--config.sample.num_samples=2",
        "--config.sample.batch_size=2",
        f"--config.sample.out_dir={out}",
    )
    assert sample.returncode == 0, sample.stderr[-3000:]
    side = 8  # demo_unet_tiny: 8×8 latents, map factor 1
    maps = [np.load(out / f"00{i}_map.npy") for i in range(2)]
    assert all(m.shape == (side, side) for m in maps)


def test_init_from_a_unet_of_another_width_names_the_tensors(tmp_path):
    plain = pdm_configs.get_config("unet,tiny=1")
    params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), models.abstract_params(plain.model))
    saved_states.save_state(tmp_path / "sd1", saved_states.params_only_state(params), plain)
    wider = json.loads((unet.CONFIG_DIR / "tiny_sd1.json").read_text())
    wider["block_out_channels"] = [16, 32, 32]
    result = run_main(
        "--config=configs/pdm.py:unet_one_stream,tiny=1",
        f"--workdir={tmp_path / 'run'}",
        f"--config.model.unet_config={json.dumps(wider)}",
        f"--config.ckpt.init_from={tmp_path / 'sd1'}",
        "--config.data.source=synthetic",
        "--config.data.num_workers=0",
        "--config.train.num_train_steps=1",
    )
    assert result.returncode == 1
    assert "The UNet checkpoint does not fit the image stream" in result.stderr
    assert (
        "down_blocks_1/resnets_0/conv1/kernel: shape (3, 3, 16, 32) in params vs "
        "(3, 3, 16, 16) in the UNet checkpoint" in result.stderr
    )
    assert not list((tmp_path / "run").glob("checkpoints/[0-9]*"))  # stopped before step 0
