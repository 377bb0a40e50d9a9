"""Tests of checkpointing: exact resume, resume order, init-from, errors, signals."""

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

from configs import pdm as pdm_configs
from pdm_jax import checkpointing, models, sharding, specs
from pdm_jax.sampling import params as sampling_params
from pdm_jax.train import init as init_lib
from pdm_jax.train import state as state_lib
from pdm_jax.train import trainer
from tests import jax_cache
from tests.train import saved_states

REPO = Path(__file__).resolve().parents[1]


def _config(arg="demo,tiny=1", steps=2):
    c = pdm_configs.get_config(arg)
    c.data.update(num_workers=0, num_threads=1, prefetch=8, num_records=256)
    c.train.update(
        num_train_steps=steps, log_every_steps=1, eval_every_steps=0, checkpoint_every_steps=2
    )
    return c


def _params_only_state(config, seed=0):
    """A state with random host parameters and no optimizer state: nothing to compile."""
    rng = np.random.default_rng(seed)
    random_tree = lambda: jax.tree.map(
        lambda a: rng.standard_normal(a.shape).astype(a.dtype),
        models.abstract_params(config.model),
    )
    return saved_states.params_only_state(random_tree(), random_tree())


def _saved_fresh_state(config, workdir, params_only=False):
    """Saves a step-0 state without training (a real one, or ``_params_only_state``)."""
    if params_only:
        state = _params_only_state(config)
    else:
        mesh = sharding.create_mesh()
        state, _ = state_lib.create_train_state(
            specs.from_config(config), jax.random.key(config.seed), mesh
        )
    saved_states.save_state(workdir, state, config)
    return state


@pytest.fixture
def persistent_compilation_cache(tmp_path):
    """A compilation cache for one test (``tests/jax_cache.py``)."""
    with jax_cache.compilation_cache_in(tmp_path / "jax_cache"):
        yield


@pytest.mark.slow
@pytest.mark.usefixtures("persistent_compilation_cache")
def test_resume_is_exact(tmp_path):
    """4 steps in one go == 2 steps, a fresh process-like restart, 2 more steps."""
    full = trainer.train_and_evaluate(_config(steps=4), str(tmp_path / "full"))
    trainer.train_and_evaluate(_config(steps=2), str(tmp_path / "split"))
    resumed = trainer.train_and_evaluate(_config(steps=4), str(tmp_path / "split"))
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
    config = _config()
    saved = _saved_fresh_state(config, tmp_path / "a")
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
    own = _saved_fresh_state(config, tmp_path / "b")
    manager = checkpointing.create_manager(checkpointing.checkpoint_dir(tmp_path / "b"))
    state, _, origin = init_lib.restore_or_initialize(
        specs.from_config(config), tmp_path / "b", mesh, manager
    )
    assert origin.startswith("resumed") and "resume_from" not in origin
    chex.assert_trees_all_equal(jax.device_get(state.params), jax.device_get(own.params))


def test_init_from_uvit_fills_the_two_stream_image_stream(tmp_path):
    uvit = _config("uvit,tiny=1")
    saved = _saved_fresh_state(uvit, tmp_path / "uvit", params_only=True)
    config = _config("two_stream,tiny=1")
    config.ckpt.init_from = str(tmp_path / "uvit")
    mesh = sharding.create_mesh()
    manager = checkpointing.create_manager(checkpointing.checkpoint_dir(tmp_path / "pdm"))
    state, _, origin = init_lib.restore_or_initialize(
        specs.from_config(config), tmp_path / "pdm", mesh, manager
    )
    assert "ckpt.init_from" in origin and int(state.step) == 0
    params = jax.device_get(state.params)
    ema = jax.device_get(checkpointing.with_frozen_params(state.ema_params, state.params))
    uvit_params = jax.device_get(saved.ema_params)
    for name, value in uvit_params.items():
        chex.assert_trees_all_equal(params[name], value)
        chex.assert_trees_all_equal(ema[name], value)  # EMA starts from the pretrained stream
        # The frozen stream keeps no EMA copy in the state: scalar placeholders.
        assert all(leaf.shape == () for leaf in jax.tree.leaves(state.ema_params[name]))
    assert set(params) - set(uvit_params)  # the map stream is there, freshly initialised
    # Saved and read back for sampling: the EMA tree comes back whole.
    saved_states.save_state(tmp_path / "pdm", state, config)
    loaded, _ = checkpointing.load_params(tmp_path / "pdm", use_ema=True)
    chex.assert_trees_all_equal(loaded, ema)
    raw, _ = checkpointing.load_params(tmp_path / "pdm", use_ema=False)
    chex.assert_trees_all_equal(raw, params)


def test_init_from_a_plain_one_stream_starts_the_token_fusion_layers_at_zero(tmp_path):
    plain = _config()
    plain.model.token_fusion = False
    saved = _saved_fresh_state(plain, tmp_path / "plain", params_only=True)
    config = _config()
    assert config.model.token_fusion  # the demo's model
    config.ckpt.init_from = str(tmp_path / "plain")
    mesh = sharding.create_mesh()
    manager = checkpointing.create_manager(checkpointing.checkpoint_dir(tmp_path / "fused"))
    state, _, origin = init_lib.restore_or_initialize(
        specs.from_config(config), tmp_path / "fused", mesh, manager
    )
    assert "ckpt.init_from" in origin
    params = jax.device_get(state.params)
    chex.assert_trees_all_equal({k: params[k] for k in saved.ema_params}, saved.ema_params)
    for name in models.TOKEN_FUSION_PARAMS:
        assert not any(np.any(v) for v in jax.tree.leaves(params[name])), name
    # Anything else missing is still refused, with the fusion layers not among the lines.
    config.model.embed_dim = 64
    config.model.num_heads = 2
    with pytest.raises(checkpointing.ConfigMismatchError) as info:
        init_lib.restore_or_initialize(specs.from_config(config), tmp_path / "other", mesh, manager)
    assert "context_embed/bias: checkpoint (32,) vs config (64,)" in str(info.value)
    assert "map_to_image" not in str(info.value)


def test_mismatched_config_lists_parameter_paths_and_shapes(tmp_path):
    _saved_fresh_state(_config(), tmp_path, params_only=True)
    config = _config()
    config.model.embed_dim = 64
    mesh = sharding.create_mesh()
    manager = checkpointing.create_manager(checkpointing.checkpoint_dir(tmp_path))
    with pytest.raises(checkpointing.ConfigMismatchError) as info:
        init_lib.restore_or_initialize(specs.from_config(config), tmp_path, mesh, manager)
    message = str(info.value)
    assert str(tmp_path / "checkpoints" / "0") in message
    assert "context_embed/kernel: checkpoint (16, 32) vs config (16, 64)" in message


def test_missing_checkpoints_name_the_path(tmp_path):
    with pytest.raises(checkpointing.CheckpointNotFoundError, match=str(tmp_path / "nowhere")):
        checkpointing.locate(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(checkpointing.CheckpointNotFoundError, match="No checkpoint found in"):
        checkpointing.locate(tmp_path / "empty")
    config = _config()
    config.ckpt.init_from = str(tmp_path / "nowhere")
    mesh = sharding.create_mesh()
    manager = checkpointing.create_manager(checkpointing.checkpoint_dir(tmp_path / "run"))
    with pytest.raises(checkpointing.CheckpointNotFoundError, match="nowhere"):
        init_lib.restore_or_initialize(specs.from_config(config), tmp_path / "run", mesh, manager)


def test_locate_accepts_workdir_root_and_step_directory(tmp_path):
    _saved_fresh_state(_config(), tmp_path, params_only=True)
    root = tmp_path / "checkpoints"
    assert checkpointing.locate(tmp_path) == (root, 0)
    assert checkpointing.locate(root) == (root, 0)
    assert checkpointing.locate(root / "0") == (root, 0)
    with pytest.raises(checkpointing.CheckpointNotFoundError, match=r"available steps: \[0\]"):
        checkpointing.locate(root, step=7)


def test_param_mismatches_against_abstract_params():
    config = _config()
    expected = models.abstract_params(config.model)
    assert checkpointing.param_mismatches(expected, expected) == []
    found = dict(expected)
    name = sorted(found)[0]
    del found[name]
    lines = checkpointing.param_mismatches(found, expected)
    assert lines and all(line.startswith(name) for line in lines)


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
    config = _config()
    mesh = sharding.create_mesh()
    target, _ = init_lib.abstract_train_state(specs.from_config(config), mesh)
    manager = checkpointing.create_manager(root, read_only=True)
    state = checkpointing.restore_state(manager, step, target, config.model.name)
    assert int(state.step) == step
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def _flat_attention_layout(path, x):
    """A leaf as checkpoints before the heads layout stored it: qkv [D, 3D], proj [D, D]."""
    keys = "/".join(str(e.key) for e in path if isinstance(e, jax.tree_util.DictKey))
    if keys.endswith("attn/qkv/kernel"):
        return np.reshape(x, (x.shape[0], -1))
    if keys.endswith("attn/qkv/bias"):
        return np.reshape(x, (-1,))
    if keys.endswith("attn/proj/kernel"):
        return np.reshape(x, (-1, x.shape[-1]))
    return x


def test_checkpoints_in_the_flat_attention_layout_still_load(tmp_path):
    # Written before qkv/proj were laid out by heads: same numbers, flat dims. Resuming
    # (params, EMA and Adam moments), sampling's loader and init_from reshape them.
    config = _config("one_stream,tiny=1")
    spec = specs.from_config(config)
    mesh = sharding.create_mesh((1, 4, 2))
    state, _ = state_lib.create_train_state(spec, jax.random.key(0), mesh)
    host = jax.device_get(state)
    legacy = jax.tree_util.tree_map_with_path(_flat_attention_layout, host)
    qkv = legacy.params["in_blocks_0"]["attn"]["qkv"]["kernel"]
    assert qkv.ndim == 2  # the layout under test really is the old one
    saved_states.save_state(tmp_path, legacy, config)

    target, _ = init_lib.abstract_train_state(spec, mesh)
    manager = checkpointing.create_manager(checkpointing.checkpoint_dir(tmp_path), read_only=True)
    restored = checkpointing.restore_state(manager, 0, target, "one_stream")
    chex.assert_trees_all_equal(jax.device_get(restored), host)
    kernel = restored.params["in_blocks_0"]["attn"]["qkv"]["kernel"]
    assert kernel.sharding == target.params["in_blocks_0"]["attn"]["qkv"]["kernel"].sharding

    loaded, _ = sampling_params.load_params(
        str(tmp_path), -1, False, spec.model, step_flag="--config.sample.step"
    )
    chex.assert_trees_all_equal(loaded, host.params)
    # A transpose is never taken for a split: other shape changes are still refused.
    bad = jax.tree.map(np.copy, legacy.params)
    bad["in_blocks_0"]["attn"]["proj"]["kernel"] = np.zeros((32, 16), np.float32)
    assert checkpointing.split_dim_leaves(bad, target.params) == {}
