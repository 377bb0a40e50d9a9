"""Parameter trees: mismatches listed by path, init-from another model, old layouts."""

import chex
import jax
import numpy as np
import pytest

from pdm_jax import checkpointing, models, sharding, specs
from pdm_jax.sampling import params as sampling_params
from pdm_jax.train import init as init_lib
from pdm_jax.train import state as state_lib
from tests.checkpointing import states
from tests.train import saved_states


def test_param_mismatches_against_abstract_params():
    config = states.config()
    expected = models.abstract_params(config.model)
    assert checkpointing.param_mismatches(expected, expected) == []
    found = dict(expected)
    name = sorted(found)[0]
    del found[name]
    lines = checkpointing.param_mismatches(found, expected)
    assert lines and all(line.startswith(name) for line in lines)


def test_mismatched_config_lists_parameter_paths_and_shapes(tmp_path):
    states.saved_fresh_state(states.config(), tmp_path, params_only=True)
    config = states.config()
    config.model.embed_dim = 64
    mesh = sharding.create_mesh()
    manager = checkpointing.create_manager(checkpointing.checkpoint_dir(tmp_path))
    with pytest.raises(checkpointing.ConfigMismatchError) as info:
        init_lib.restore_or_initialize(specs.from_config(config), tmp_path, mesh, manager)
    message = str(info.value)
    assert str(tmp_path / "checkpoints" / "0") in message
    assert "context_embed/kernel: checkpoint (16, 32) vs config (16, 64)" in message


def test_init_from_uvit_fills_the_two_stream_image_stream(tmp_path):
    uvit = states.config("uvit,tiny=1")
    saved = states.saved_fresh_state(uvit, tmp_path / "uvit", params_only=True)
    config = states.config("two_stream,tiny=1")
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
    plain = states.config()
    plain.model.token_fusion = False
    saved = states.saved_fresh_state(plain, tmp_path / "plain", params_only=True)
    config = states.config()
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
    config = states.config("one_stream,tiny=1")
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
