"""Tests of ``python -m pdm_jax.benchmark``, run as a user runs it."""

import json

import numpy as np

from tests.cli import run_module


def test_plan_command_makes_its_own_devices():
    # The test session has 8 devices; --devices=2 must give the plan a 2-device mesh.
    result = run_module(
        "pdm_jax.benchmark",
        "--what=plan",
        "--devices=2",
        "--batch_size=4",
        "--nocompile",
        "--config=configs/pdm.py:uvit,tiny=1",
        # Tuple fields as a user types them on the command line.
        "--config.sharding.mesh_axes=data,fsdp,tensor",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["devices"] == 2 and np.prod(list(record["mesh_shape"].values())) == 2
    assert record["batch_size"] == 4 and record["num_params"] == 42_404
    # Replicated on a data-only mesh: params, EMA and Adam's moments in float32, and more.
    assert record["state_bytes_per_device"] >= 16 * 42_404
    assert "temp_bytes_per_device" not in record  # --nocompile: the state's layout only


def test_a_config_the_run_cannot_use_is_one_line_of_error():
    result = run_module(
        "pdm_jax.benchmark",
        "--what=plan",
        "--devices=2",
        "--nocompile",
        "--config=configs/pdm.py:uvit,tiny=1",
        "--config.sharding.mesh_shape=3,2,2",
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "error: Mesh shape (3, 2, 2) needs 12 devices, but 2 are available. Set "
        "--config.sharding.mesh_shape accordingly."
    )
    assert "Traceback" not in result.stderr
