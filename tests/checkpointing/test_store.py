"""Checkpoint files: exact resume, where a run starts, finding steps, signals."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

from pdm_jax import checkpointing, sharding, specs
from pdm_jax.train import init as init_lib
from pdm_jax.train import trainer
from tests import jax_cache
from tests.checkpointing import states

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def persistent_compilation_cache(tmp_path):
    """A compilation cache for one test (``tests/jax_cache.py``)."""
    with jax_cache.compilation_cache_in(tmp_path / "jax_cache"):
        yield


@pytest.mark.slow
@pytest.mark.usefixtures("persistent_compilation_cache")
def test_resume_is_exact(tmp_path):
    """4 steps in one go == 2 steps, a fresh process-like restart, 2 more steps."""
    full = trainer.train_and_evaluate(states.config(steps=4), str(tmp_path / "full"))
    trainer.train_and_evaluate(states.config(steps=2), str(tmp_path / "split"))
    resumed = trainer.train_and_evaluate(states.config(steps=4), str(tmp_path / "split"))
    assert int(resumed.step) == int(full.step) == 4
    chex.assert_trees_all_equal(jax.device_get(resumed.params), jax.device_get(full.params))
    chex.assert_trees_all_equal(jax.device_get(resumed.ema_params), jax.device_get(full.ema_params))
    chex.assert_trees_all_equal(jax.device_get(resumed.opt_state), jax.device_get(full.opt_state))
    # Step 2 of the uninterrupted run was saved while training went on (donated buffers).
    mid_full, _ = checkpointing.load_params(tmp_path / "full/checkpoints/2", use_ema=False)
    mid_split, _ = checkpointing.load_params(tmp_path / "split/checkpoints/2", use_ema=False)
    chex.assert_trees_all_equal(mid_full, mid_split)
    # The data order continued where it stopped: same iterator position after 4 steps.
    data = "checkpoints/4/data/process_0-of-1.json"
    assert (tmp_path / "full" / data).read_text() == (tmp_path / "split" / data).read_text()


def test_resume_order_workdir_then_resume_from_then_init_from(tmp_path):
    config = states.config()
    saved = states.saved_fresh_state(config, tmp_path / "a")
    mesh = sharding.create_mesh()
    # resume_from another run when the workdir is empty.
    config.ckpt.resume_from = str(tmp_path / "a")
    manager = checkpointing.create_manager(checkpointing.checkpoint_dir(tmp_path / "b"))
    state, _, origin = init_lib.restore_or_initialize(
        specs.from_config(config), tmp_path / "b", mesh, manager
    )
    assert "ckpt.resume_from" in origin
    chex.assert_trees_all_equal(jax.device_get(state.params), jax.device_get(saved.params))
    # The workdir's own checkpoint wins over resume_from.
    config.seed = 5
    own = states.saved_fresh_state(config, tmp_path / "b")
    manager = checkpointing.create_manager(checkpointing.checkpoint_dir(tmp_path / "b"))
    state, _, origin = init_lib.restore_or_initialize(
        specs.from_config(config), tmp_path / "b", mesh, manager
    )
    assert origin.startswith("resumed") and "resume_from" not in origin
    chex.assert_trees_all_equal(jax.device_get(state.params), jax.device_get(own.params))


def test_missing_checkpoints_name_the_path(tmp_path):
    with pytest.raises(checkpointing.CheckpointNotFoundError, match=str(tmp_path / "nowhere")):
        checkpointing.locate(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(checkpointing.CheckpointNotFoundError, match="No checkpoint found in"):
        checkpointing.locate(tmp_path / "empty")
    config = states.config()
    config.ckpt.init_from = str(tmp_path / "nowhere")
    mesh = sharding.create_mesh()
    manager = checkpointing.create_manager(checkpointing.checkpoint_dir(tmp_path / "run"))
    with pytest.raises(checkpointing.CheckpointNotFoundError, match="nowhere"):
        init_lib.restore_or_initialize(specs.from_config(config), tmp_path / "run", mesh, manager)


def test_locate_accepts_workdir_root_and_step_directory(tmp_path):
    states.saved_fresh_state(states.config(), tmp_path, params_only=True)
    root = tmp_path / "checkpoints"
    assert checkpointing.locate(tmp_path) == (root, 0)
    assert checkpointing.locate(root) == (root, 0)
    assert checkpointing.locate(root / "0") == (root, 0)
    with pytest.raises(checkpointing.CheckpointNotFoundError, match=r"available steps: \[0\]"):
        checkpointing.locate(root, step=7)


def test_data_position_of_another_process_count_names_the_option(tmp_path):
    step_dir = tmp_path / "checkpoints" / "6"
    (step_dir / checkpointing.DATA).mkdir(parents=True)
    checkpointing.check_data_topology(step_dir)  # no iterator state saved: nothing to map
    for p in range(2):
        (step_dir / checkpointing.DATA / f"process_{p}-of-2.json").write_text("{}")
    with pytest.raises(checkpointing.ConfigMismatchError) as e:
        checkpointing.check_data_topology(step_dir)
    message = str(e.value)
    assert "a run with 2 process(es)" in message and "this run has 1" in message
    assert "--config.ckpt.reset_data_position=True" in message
    (step_dir / checkpointing.DATA / "process_0-of-1.json").write_text("{}")
    checkpointing.check_data_topology(step_dir)


def test_signal_guard_defers_sigterm_and_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    with init_lib.SignalGuard() as guard:
        assert not guard.requested
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.time() + 5
        while not guard.requested and time.time() < deadline:
            time.sleep(0.01)
        assert guard.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.slow
def test_sigterm_mid_run_leaves_a_restorable_checkpoint(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "pdm_jax.main",
        "--config=configs/pdm.py:demo,tiny=1",
        f"--workdir={tmp_path}",
        "--config.train.num_train_steps=100000",
        "--config.train.checkpoint_every_steps=100000",
        "--config.train.eval_every_steps=0",
        "--config.train.log_every_steps=1",
        "--config.data.num_workers=0",
        "--config.data.num_records=256",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    logged = threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if "examples_per_sec" in line:
                logged.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert logged.wait(timeout=400), "".join(lines[-30:])
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=300)
    finally:
        proc.kill()
    assert rc == 128 + signal.SIGTERM, "".join(lines[-30:])
    root, step = checkpointing.locate(tmp_path)
    assert step >= 1
    config = states.config()
    mesh = sharding.create_mesh()
    target, _ = init_lib.abstract_train_state(specs.from_config(config), mesh)
    manager = checkpointing.create_manager(root, read_only=True)
    state = checkpointing.restore_state(manager, step, target, config.model.name)
    assert int(state.step) == step
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
