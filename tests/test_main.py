"""Command-line errors of ``python -m pdm_jax.main``: they name the problem and the fix."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import app

from configs import pdm as pdm_configs
from pdm_jax import main, models
from tests.cli import run_main
from tests.train import saved_states


def test_unknown_variant_is_rejected(tmp_path):
    result = run_main("--config=configs/pdm.py:bogus", f"--workdir={tmp_path}")
    assert result.returncode != 0
    assert "Unknown variant 'bogus'" in result.stderr
    assert "demo" in result.stderr  # the known variants are listed


def test_sample_without_checkpoint_names_the_path(tmp_path):
    result = run_main(
        "--config=configs/pdm.py:demo,tiny=1", f"--workdir={tmp_path}", "--mode=sample"
    )
    assert result.returncode == 1
    assert f"error: No checkpoint at {tmp_path}/checkpoints" in result.stderr


def test_sample_with_mismatched_config_lists_the_shapes(tmp_path):
    config = pdm_configs.get_config("demo,tiny=1")
    params = jax.tree.map(
        lambda a: np.zeros(a.shape, a.dtype), models.abstract_params(config.model)
    )
    saved_states.save_state(tmp_path, saved_states.params_only_state(params), config)
    result = run_main(
        "--config=configs/pdm.py:demo,tiny=1",
        f"--workdir={tmp_path}",
        "--mode=sample",
        "--config.model.depth=4",
    )
    assert result.returncode == 1
    assert "does not match the config" in result.stderr
    assert "in_blocks_1/attn/qkv/kernel: missing from the checkpoint, config shape" in result.stderr


@pytest.mark.parametrize(("mode", "devices"), [("sample", 3), ("evaluate", 3)])
def test_cpu_split_follows_the_mode_batch(tmp_path, mode, devices):
    # 3 devices divide eval.batch_size=6 and sample.batch_size=6 but not the tiny
    # train.batch_size=8: splitting by the training batch would stop both modes.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # no forced count
    result = run_main(
        "--config=configs/pdm.py:demo,tiny=1",
        f"--workdir={tmp_path}",
        f"--mode={mode}",
        "--config.sharding.cpu_devices=3",
        "--config.eval.batch_size=6",
        "--config.sample.batch_size=6",
        env=env,
    )
    assert "does not divide" not in result.stderr
    listed = ", ".join(f"CpuDevice(id={i})" for i in range(devices))
    assert f"JAX devices: [{listed}] (process 0 of 1)" in result.stderr
    assert "No checkpoint at" in result.stderr


def test_inconsistent_cluster_flags_are_refused(tmp_path):
    with pytest.raises(app.UsageError, match="only apply to multi-process runs; add --distrib"):
        main.cluster_arguments(False, num_processes=2)
    with pytest.raises(app.UsageError, match="also needs --num_processes: give all three"):
        main.cluster_arguments(True, coordinator_address="127.0.0.1:1234", process_id=0)
    with pytest.raises(app.UsageError, match=r"--process_id=2 must lie in 0\.\.num_processes-1"):
        main.cluster_arguments(True, coordinator_address="h:1", num_processes=2, process_id=2)
    assert main.cluster_arguments(True) == {}  # JAX detects the cluster
    given = dict(coordinator_address="h:1", num_processes=2, process_id=1)
    assert main.cluster_arguments(True, **given) == given
    # The command refuses them before anything runs.
    result = run_main(
        "--config=configs/pdm.py:demo,tiny=1", f"--workdir={tmp_path}", "--process_id=0"
    )
    assert result.returncode == 1
    assert "--process_id only apply to multi-process runs" in result.stderr
    assert not any(tmp_path.iterdir())


def test_importing_the_command_line_modules_defines_no_flags():
    # Flags are defined when a program runs, never at import: two modules defining
    # --batch_size or --vae at import would clash in one process (a notebook, a test).
    code = (
        "from absl import flags\n"
        "before = set(flags.FLAGS)\n"
        "import pdm_jax.main, pdm_jax.benchmark, pdm_jax.data.coco.prepare\n"
        "import pdm_jax.evaluation.reference_stats, pdm_jax.convert.__main__\n"
        "ours = {'config', 'workdir', 'mode', 'vae', 'text_encoder', 'batch_size', 'what',\n"
        "        'coco_dir', 'output_dir', 'clip', 'inception', 'output', 'input', 'steps'}\n"
        "print(sorted((set(flags.FLAGS) - before) & ours))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert result.stdout.strip().splitlines()[-1] == "[]"
