"""Parity of the Flax FID Inception with pytorch-fid, pinned by golden outputs.

Fixture (``data/inception_golden.npz``, produced once with pytorch-fid 0.3.0 on torch 2.13
CPU; see ``data/README.md``):

- Weights: :func:`random_state_dict` — ``np.random.default_rng(2015)`` drawn tensor by tensor
  in the order of ``data/inception_state_dict_shapes.json`` (the names, shapes and dtypes of
  pytorch-fid's ``fid_inception_v3()`` state dict, 566 entries): conv weights
  ``N(0, 2 / fan_in)``, BN weight and running_var ``U(0.8, 1.2)``, BN bias and running_mean
  ``N(0, 0.1²)``, ``fc`` ``N(0, 0.01²)``, ``num_batches_tracked`` 0 (no draw).
- Inputs: :func:`golden_images` — ``np.random.default_rng(7)`` uint8 noise, two 48×64
  images (upsampled to 299) and one 331×317 image (downsampled, where antialiasing would
  show).
- ``features_small`` ``[2, 2048]`` / ``features_large`` ``[1, 2048]``: pytorch-fid's
  ``InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True)``
  on ``ToTensor()`` of those images, with the random state dict loaded in place of the
  downloaded checkpoint.
- ``resize_*``: ``F.interpolate(x, size, mode='bilinear', align_corners=False)`` on a
  small float input (``np.random.default_rng(3)``, ``[2, 9, 7, 3]`` → 4×11 and 23×5) and on
  a 0/1 row of 384 pixels → 299, to pin the resize alone.
- ``weights_sum`` / ``inputs_sum``: float64 sums that catch a change in numpy's generators.
"""

import json
import math
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdm_jax.models import inception

DATA = pathlib.Path(__file__).parent / "data"
WEIGHT_SEED = 2015
IMAGE_SEED = 7


def random_state_dict(seed: int = WEIGHT_SEED) -> dict[str, np.ndarray]:
    """Seeded stand-in for pytorch-fid's state dict (see the module docstring)."""
    entries = json.loads((DATA / "inception_state_dict_shapes.json").read_text())
    rng = np.random.default_rng(seed)
    state_dict = {}
    for name, shape, _ in entries:
        if name.endswith("num_batches_tracked"):
            state_dict[name] = np.zeros(shape, np.int64)
            continue
        if name.endswith("conv.weight"):
            scale = math.sqrt(2.0 / math.prod(shape[1:]))
            value = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
        elif name.endswith(("bn.weight", "bn.running_var")):
            value = rng.uniform(0.8, 1.2, shape).astype(np.float32)
        elif name.endswith(("bn.bias", "bn.running_mean")):
            value = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.1)
        else:
            value = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.01)
        state_dict[name] = value
    return state_dict


def golden_images(seed: int = IMAGE_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Seeded uint8 inputs: ``[2, 48, 64, 3]`` and ``[1, 331, 317, 3]``."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (2, 48, 64, 3), dtype=np.uint8)
    large = rng.integers(0, 256, (1, 331, 317, 3), dtype=np.uint8)
    return small, large


def _weights_sum(state_dict: dict[str, np.ndarray]) -> float:
    return float(sum(v.astype(np.float64).sum() for v in state_dict.values()))


@pytest.fixture(scope="module")
def golden():
    with np.load(DATA / "inception_golden.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def state_dict():
    return random_state_dict()


@pytest.fixture(scope="module")
def variables(state_dict):
    return inception.convert_inception_state_dict(state_dict)


@pytest.mark.parametrize("name", ["resize_a", "resize_b", "resize_step"])
def test_resize_matches_torch_bilinear(golden, name):
    # resize_step (a 0/1 row, 384 -> 299) outputs the tap weights themselves: it pins the
    # fused multiply-add in ATen's source-index formula (a plain float32 product is off by
    # up to 1.5e-5 there).
    x = jnp.asarray(golden.get(f"{name}_input", golden["resize_input"]))
    want = golden[f"{name}_output"]
    got = inception.resize_bilinear_torch(x, tuple(want.shape[1:3]))
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-6)


def test_resize_is_identity_at_same_size():
    x = jnp.asarray(np.random.default_rng(0).random((1, 299, 299, 3), dtype=np.float32))
    np.testing.assert_array_equal(np.asarray(inception.resize_bilinear_torch(x, (299, 299))), x)


def test_resize_does_not_antialias():
    # Halving samples midway between two taps; an antialiasing resize (jax.image.resize)
    # spreads each bright column over 4 taps and lights up the dark outputs too.
    x = np.zeros((1, 1, 8, 1), np.float32)
    x[:, :, ::4] = 1.0  # columns 0 and 4
    got = np.asarray(inception.resize_bilinear_torch(jnp.asarray(x), (1, 4)))
    np.testing.assert_allclose(got[0, 0, :, 0], [0.5, 0.0, 0.5, 0.0], atol=1e-7)
    antialiased = np.asarray(jax.image.resize(x, (1, 1, 4, 1), "bilinear"))
    assert antialiased[0, 0, 1, 0] > 0.1


def test_pool_features_match_pytorch_fid(golden, state_dict, variables):
    small, large = golden_images()
    inputs_sum = float(small.astype(np.float64).sum() + large.astype(np.float64).sum())
    assert inputs_sum == golden["inputs_sum"], "numpy's integer generator changed: regenerate"
    assert _weights_sum(state_dict) == pytest.approx(float(golden["weights_sum"]), rel=1e-12), (
        "numpy's normal/uniform generators changed: regenerate the fixture"
    )
    feats_small = np.asarray(inception.inception_pool_features(variables, jnp.asarray(small)))
    feats_large = np.asarray(inception.inception_pool_features(variables, jnp.asarray(large)))
    assert feats_small.shape == (2, 2048) and feats_large.shape == (1, 2048)
    assert feats_small.dtype == np.float32
    assert np.abs(golden["features_small"]).mean() > 0.05  # features are not degenerate
    np.testing.assert_allclose(feats_small, golden["features_small"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(feats_large, golden["features_large"], rtol=0, atol=1e-4)


def test_converter_maps_every_tensor(state_dict, variables):
    flat = jax.tree_util.tree_leaves_with_path(variables)
    n_converted = sum(int(np.prod(leaf.shape)) for _, leaf in flat)
    n_torch = sum(v.size for k, v in state_dict.items() if not k.startswith("fc.") and v.ndim)
    assert n_converted == n_torch == 21_820_000
    kernel = variables["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"]
    torch_weight = state_dict["Mixed_6b.branch7x7_2.conv.weight"]  # [O, I, kh, kw]
    assert kernel.shape == (1, 7, 128, 128) and torch_weight.shape == (128, 128, 1, 7)
    np.testing.assert_array_equal(kernel[0, 3], torch_weight[:, :, 0, 3].T)
    np.testing.assert_array_equal(
        variables["batch_stats"]["Mixed_7c"]["branch_pool"]["bn"]["var"],
        state_dict["Mixed_7c.branch_pool.bn.running_var"],
    )


def test_converter_rejects_wrong_checkpoints(state_dict):
    missing = dict(state_dict)
    del missing["Mixed_5b.branch_pool.bn.running_mean"]
    with pytest.raises(KeyError, match=re.escape("lacks 'Mixed_5b.branch_pool.bn.running_mean'")):
        inception.convert_inception_state_dict(missing)
    extra = dict(state_dict, **{"AuxLogits.conv0.conv.weight": np.zeros(1)})
    inception.convert_inception_state_dict(extra)  # torchvision's aux head is ignored
    extra["Mixed_5b.branch9.conv.weight"] = np.zeros(1)
    with pytest.raises(KeyError, match="unrecognised keys"):
        inception.convert_inception_state_dict(extra)
    wrong = dict(state_dict, **{"Conv2d_1a_3x3.conv.weight": np.zeros((32, 3, 5, 5))})
    with pytest.raises(ValueError, match=re.escape("Conv2d_1a_3x3.conv.weight")):
        inception.convert_inception_state_dict(wrong)


def test_pool_features_reject_float_images(variables):
    with pytest.raises(TypeError, match="uint8"):
        inception.inception_pool_features(variables, jnp.zeros((1, 8, 8, 3), jnp.float32))


def test_load_inception_explains_missing_torch(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="needs PyTorch"):
        inception.load_inception(str(tmp_path / "pt_inception.pth"))


@pytest.mark.torch
def test_load_inception_reads_pth(tmp_path, state_dict, variables):
    torch = pytest.importorskip("torch")
    path = tmp_path / "pt_inception-2015-12-05.pth"
    torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, path)
    loaded = inception.load_inception(str(path))
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, variables)
