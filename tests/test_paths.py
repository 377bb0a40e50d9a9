"""Paths as users type them (relative, ``~``, ``gs://``): ``pdm_jax.paths`` and the commands."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from configs import pdm as pdm_configs
from pdm_jax import checkpointing, models, paths, specs
from pdm_jax.convert import official
from pdm_jax.convert.__main__ import convert
from pdm_jax.evaluation import fid, reference_stats
from pdm_jax.weights.torch_io import save_safetensors
from tests.data import fake_coco
from tests.evaluation.test_inception import random_state_dict
from tests.evaluation.test_reference_stats import _parse
from tests.train import saved_states

REPO = Path(__file__).resolve().parents[1]


def test_resolve_expands_home_makes_absolute_and_keeps_urls(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    assert paths.resolve("~/ckpt/uvit") == str(tmp_path / "home" / "ckpt" / "uvit")
    assert paths.resolve("workdir/demo") == str(tmp_path / "cwd" / "workdir" / "demo")
    assert paths.resolve("./a/../b") == str(tmp_path / "cwd" / "b")
    assert paths.resolve("/abs/path") == "/abs/path"
    assert paths.resolve("gs://bucket/run/~x") == "gs://bucket/run/~x"
    assert paths.resolve("s3://bucket/a") == "s3://bucket/a"
    assert paths.resolve("") == ""
    assert paths.resolve(None) is None


def test_resolve_config_paths_rewrites_every_path_field(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    config = pdm_configs.get_config("two_stream")
    config.lock()  # main's config is locked: existing fields only
    config.ckpt.init_from = "~/uvit"
    config.ckpt.resume_from = "gs://bucket/run"
    config.data.update(dir="data/coco_pdm", vae="~/vae.pth", clip="")
    config.eval.update(fid_stats="stats.npz", inception="~/inception.pth", clip="clip")
    config.sample.update(prompts_file="p.txt", map="m.npy", image="~/i.png", mask="k.png")
    config.sample.out_dir = "out"
    changed = paths.resolve_config_paths(config, specs.path_fields())
    assert config.ckpt.init_from == str(tmp_path / "uvit")
    assert config.ckpt.resume_from == "gs://bucket/run"
    assert config.data.dir == str(tmp_path / "data/coco_pdm")
    assert config.data.vae == str(tmp_path / "vae.pth") and config.data.clip == ""
    assert config.eval.fid_stats == str(tmp_path / "stats.npz")
    assert config.eval.inception == str(tmp_path / "inception.pth")
    assert config.sample.image == str(tmp_path / "i.png")
    assert config.sample.out_dir == str(tmp_path / "out")
    assert set(changed) == set(specs.path_fields()) - {"ckpt.resume_from", "data.clip"}
    assert paths.resolve_config_paths(config, specs.path_fields()) == {}  # idempotent


def test_main_trains_with_a_relative_workdir_and_a_home_relative_init_from(tmp_path):
    """The README's ``--workdir=workdir/demo`` crashed at the first checkpoint (orbax)."""
    config = pdm_configs.get_config("demo,tiny=1")
    params = jax.tree.map(
        lambda a: np.full(a.shape, 0.01, a.dtype), models.abstract_params(config.model)
    )
    saved_states.save_state(tmp_path / "init", saved_states.params_only_state(params), config)
    env = dict(os.environ, HOME=str(tmp_path), PYTHONPATH=str(REPO))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pdm_jax.main",
            f"--config={REPO}/configs/pdm.py:demo,tiny=1",
            "--workdir=workdir/demo",
            "--config.ckpt.init_from=~/init",
            "--config.train.num_train_steps=2",
            "--config.train.checkpoint_every_steps=1",
            "--config.train.eval_every_steps=0",
            "--config.demo.use_metrics=False",
            "--config.data.num_records=256",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"parameters from {tmp_path}/init/checkpoints/0 (ckpt.init_from)" in result.stderr
    root = tmp_path / "workdir" / "demo" / "checkpoints"
    assert checkpointing.locate(root) == (root, 2)
    assert (root / "1" / "state").is_dir()


def test_convert_reads_and_writes_relative_and_home_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    cfg = pdm_configs.get_config("uvit,tiny=1").model
    params = jax.tree.map(np.asarray, models.init_params(cfg, jax.random.key(0)))
    save_safetensors(official.params_to_official(params, cfg), tmp_path / "uvit.safetensors")
    uvit = f"{REPO}/configs/pdm.py:uvit,tiny=1"
    convert(["uvit", "--input", "~/uvit.safetensors", "--output", "ckpt/uvit", "--config", uvit])
    loaded, where = checkpointing.load_params(tmp_path / "ckpt" / "uvit")
    assert where == str(tmp_path / "ckpt" / "uvit" / "checkpoints" / "0")
    np.testing.assert_array_equal(loaded["pos_embed"], params["pos_embed"])
    convert(["export", "--input", "ckpt/uvit", "--output", "~/back.safetensors", "--config", uvit])
    assert (tmp_path / "back.safetensors").is_file()


def test_reference_stats_command_takes_relative_and_home_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    fake_coco.make_fake_coco(str(tmp_path / "coco"))
    np.savez(tmp_path / "inception.npz", **random_state_dict())
    out = reference_stats.run(
        _parse(
            [
                "--inception=~/inception.npz",
                "--coco_dir=coco",
                "--output=ref.npz",
                "--batch_size=8",
                "--max_images=2",
            ]
        )
    )
    assert out == str(tmp_path / "ref.npz")
    mu, sigma = fid.load_stats(out)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
