"""``python -m pdm_jax.convert``: official state dicts in, pdm_jax checkpoints out, and back."""

import jax
import numpy as np
import pytest
from flax import traverse_util

from configs import pdm as pdm_configs
from pdm_jax import checkpointing, models, specs
from pdm_jax.convert import official
from pdm_jax.convert.__main__ import convert
from pdm_jax.train import init as init_lib
from pdm_jax.weights.torch_io import load_state_dict, save_safetensors

UVIT = "configs/pdm.py:uvit,tiny=1"
TWO = "configs/pdm.py:two_stream,tiny=1,map_patch_factor=1"


def _official_file(tmp_path, variant: str, seed: int = 0):
    cfg = pdm_configs.get_config(variant).model
    params = jax.tree.map(np.asarray, models.init_params(cfg, jax.random.key(seed)))
    path = tmp_path / f"{cfg.name}.safetensors"
    save_safetensors(official.params_to_official(params, cfg), path)
    return path, params, cfg


def _assert_same(a, b):
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg="/".join(k))


def test_uvit_state_dict_to_checkpoint_and_export_round_trip(tmp_path):
    path, params, _ = _official_file(tmp_path, "uvit,tiny=1")
    out = tmp_path / "ckpt"
    convert(["uvit", "--input", str(path), "--output", str(out), "--config", UVIT])
    loaded, _ = checkpointing.load_params(out)
    _assert_same(loaded, params)
    exported = tmp_path / "back.safetensors"
    convert(["export", "--input", str(out), "--output", str(exported), "--config", UVIT])
    original, back = load_state_dict(path), load_state_dict(exported)
    assert original.keys() == back.keys()
    for name in original:
        np.testing.assert_array_equal(original[name], back[name], err_msg=name)


def test_uvit_checkpoint_initialises_the_two_stream_image_stream(tmp_path):
    path, uvit_params, _ = _official_file(tmp_path, "uvit,tiny=1", seed=3)
    out = tmp_path / "uvit_ckpt"
    convert(["uvit", "--input", str(path), "--output", str(out), "--config", UVIT])
    two_cfg = pdm_configs.get_config("two_stream,tiny=1")
    loaded, where = checkpointing.load_params(out)
    merged = init_lib.initial_params_fn(specs.from_config(two_cfg), loaded, where)(
        jax.random.key(0), loaded
    )
    flat = traverse_util.flatten_dict(merged)
    for key, value in traverse_util.flatten_dict(uvit_params).items():
        np.testing.assert_array_equal(flat[key], value, err_msg="/".join(key))
    assert ("pos_embed_mask",) in flat and ("zero_convs_1", "conv", "kernel") in flat


def test_two_stream_state_dict_converts(tmp_path):
    path, params, _ = _official_file(tmp_path, "two_stream,tiny=1,map_patch_factor=1")
    out = tmp_path / "two"
    convert(["pdm", "--input", str(path), "--output", str(out), "--config", TWO])
    _assert_same(checkpointing.load_params(out)[0], params)


def test_mismatched_state_dict_lists_missing_unexpected_and_misshaped(tmp_path):
    path, _, _ = _official_file(tmp_path, "uvit,tiny=1")
    state = load_state_dict(path)
    del state["norm.weight"]
    state["extra.weight"] = np.zeros(3, np.float32)
    state["context_embed.bias"] = np.zeros(5, np.float32)
    bad = tmp_path / "bad.safetensors"
    save_safetensors(state, bad)
    with pytest.raises(ValueError) as err:
        convert(["uvit", "--input", str(bad), "--output", str(tmp_path / "o"), "--config", UVIT])
    text = str(err.value)
    assert "missing (1)" in text and "norm.weight" in text
    assert "unexpected (1)" in text and "extra.weight" in text
    assert "mis-shaped (1)" in text and "context_embed.bias" in text


def test_missing_input_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        convert(["uvit", "--input", str(tmp_path / "nope.pth"), "--output", str(tmp_path / "o")])
