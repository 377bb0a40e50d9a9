"""State-dict IO: safetensors round trip, torch files, clear errors, template fitting."""

import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pdm_jax.weights.torch_io import (
    ConversionError,
    find_weights_file,
    fit_to_template,
    flatten_paths,
    load_state_dict,
    save_safetensors,
    unflatten_paths,
)


def _state():
    rng = np.random.default_rng(0)
    return {
        "a.weight": rng.normal(size=(3, 4)).astype(np.float32),
        "a.bias": rng.normal(size=(3,)).astype(np.float16),
        "b.scale": rng.normal(size=(2, 2)).astype(ml_dtypes.bfloat16),
        "step": np.array(7, np.int64),
    }


def test_safetensors_round_trip(tmp_path):
    state = _state()
    path = tmp_path / "w.safetensors"
    save_safetensors({**state, "c": jnp.ones((2,))}, path)
    loaded = load_state_dict(path)
    assert set(loaded) == {*state, "c"}
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape
        np.testing.assert_array_equal(loaded[key].astype(np.float64), value.astype(np.float64))


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors"):
        load_state_dict(tmp_path / "nope.safetensors")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ConversionError, match=r"unknown checkpoint format .*\.safetensors"):
        load_state_dict(tmp_path / "w.npz")
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    found = find_weights_file(tmp_path, ["model.safetensors", "pytorch_model.bin"])
    assert found.endswith("model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"looked for a\.bin, b\.bin"):
        find_weights_file(tmp_path, ["a.bin", "b.bin"])


def test_pth_without_torch_names_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "autoencoder_kl.pth"
    path.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(ImportError, match=r'pip install -e "\.\[torch\]"'):
        load_state_dict(path)


@pytest.mark.torch
def test_torch_files(tmp_path):
    torch = pytest.importorskip("torch")
    state = {
        "w": torch.randn(4, 3),
        "h": torch.randn(2).to(torch.bfloat16),
        "n": torch.tensor(3),
    }
    torch.save(state, tmp_path / "a.pth")
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "b.ckpt")
    for name in ("a.pth", "b.ckpt"):
        loaded = load_state_dict(tmp_path / name)
        assert set(loaded) == {"w", "h", "n"}
        np.testing.assert_array_equal(loaded["w"], state["w"].numpy())
        assert loaded["h"].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(loaded["h"].astype(np.float32), state["h"].float().numpy())
    torch.save(torch.zeros(2), tmp_path / "c.pth")
    with pytest.raises(ConversionError, match="not a state dict"):
        load_state_dict(tmp_path / "c.pth")
    torch.save({"state_dict": state, "callback": ConversionError("x")}, tmp_path / "d.ckpt")
    with pytest.raises(ConversionError, match="re-save just its state dict"):
        load_state_dict(tmp_path / "d.ckpt")


def test_flatten_round_trip():
    tree = {"a": {"b": {"kernel": 1, "bias": 2}}, "c": 3}
    flat = flatten_paths(tree)
    assert flat == {"a/b/kernel": 1, "a/b/bias": 2, "c": 3}
    assert unflatten_paths(flat) == tree


def test_fit_to_template_builds_params_and_lists_every_problem():
    template = {
        "dense": {
            "kernel": jax.ShapeDtypeStruct((4, 3), jnp.bfloat16),
            "bias": jax.ShapeDtypeStruct((3,), jnp.float32),
        },
        "norm": {"scale": jax.ShapeDtypeStruct((3,), jnp.float32)},
    }
    good = {
        "dense/kernel": np.ones((4, 3), np.float32),
        "dense/bias": np.zeros(3, np.float32),
        "norm/scale": np.full(3, 2.0, np.float16),
    }
    params = fit_to_template(good, template, "toy")
    assert params["dense"]["kernel"].dtype == jnp.bfloat16
    assert params["norm"]["scale"].dtype == jnp.float32
    np.testing.assert_array_equal(params["norm"]["scale"], 2.0)

    bad = {"dense/kernel": np.ones((3, 4)), "dense/bias": np.zeros(3), "extra/w": np.zeros(1)}
    with pytest.raises(ConversionError) as err:
        fit_to_template(bad, template, "toy", unexpected=["torch.only.key"])
    message = str(err.value)
    assert "missing (in the model, not in the checkpoint) (1):\n  norm/scale" in message
    assert "extra/w" in message and "torch.only.key" in message
    assert "dense/kernel: checkpoint (3, 4) vs model (4, 3)" in message
