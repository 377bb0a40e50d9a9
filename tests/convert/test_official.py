"""Official PyTorch U-ViT / PDM ↔ pdm_jax conversion, against golden official outputs.

Golden fixtures (``data/official_{uvit,one_stream,two_stream}_tiny.npz``, written by
``tests/convert/make_official_fixtures.py`` from the official ``libs/uvit_t2i.py``; its
docstring gives the seeds and the parameter refill): kwargs ``img_size=8, patch_size=2,
in_chans=4, embed_dim=16, depth=4, num_heads=2, mlp_ratio=4, clip_dim=8, num_clip_token=3``
(+ ``qkv_bias, mlp_time_embed`` for the U-ViT from baofff/U-ViT; ``enable_panoptic,
separate`` for the PDMs), every parameter randomised (zero convs included). Inputs, batch
2, NHWC: ``x [2, 8, 8, 4]``, ``m [2, 8, 8, 8]``, ``t [2]`` in [1, 1000], ``context [2, 3,
8]``; outputs ``eps [2, 8, 8, 4]``, ``map0 [2, 8, 8, 8]`` and ``eps_given``
(``use_ground_truth=True``). No torch needed.
"""

import json
import pathlib

import jax
import numpy as np
import pytest
from flax import traverse_util

from configs.pdm import get_config
from pdm_jax import models
from pdm_jax.convert import official

DATA = pathlib.Path(__file__).parent / "data"
REFERENCE = {
    "uvit": "uvit_t2i_small_baseline",
    "one_stream": "pdm_one_stream_small",
    "two_stream": "pdm_two_stream_small",
}
TOL = 1e-4


def _fixture(name):
    with np.load(DATA / f"official_{name}_tiny.npz") as f:
        data = {k: f[k] for k in f.files}
    kwargs = json.loads(str(data.pop("kwargs")))
    sd = {k[3:]: data.pop(k) for k in list(data) if k.startswith("sd/")}
    return kwargs, sd, data


@pytest.mark.parametrize("name", list(REFERENCE))
def test_layout_matches_official_state_dict(name):
    ref = json.loads((DATA / f"{REFERENCE[name]}.state_dict.json").read_text())
    cfg = official.model_config_from_official_kwargs(ref["model_kwargs"])
    assert cfg.name == name
    want = {t["name"]: tuple(t["shape"]) for t in ref["tensors"]}
    assert official.official_shapes(cfg) == want
    assert models.count_params(models.abstract_params(cfg)) == ref["num_params"]


def test_configs_give_official_layout():
    for name in REFERENCE:
        cfg = get_config(name).model
        cfg.map_patch_factor = 1
        ref = json.loads((DATA / f"{REFERENCE[name]}.state_dict.json").read_text())
        assert official.official_shapes(cfg) == {
            t["name"]: tuple(t["shape"]) for t in ref["tensors"]
        }


@pytest.mark.parametrize("name", ["uvit", "one_stream", "two_stream"])
def test_golden_official_outputs(name):
    kwargs, sd, data = _fixture(name)
    cfg = official.model_config_from_official_kwargs(kwargs)
    params = official.official_to_params(sd, cfg)
    apply = jax.jit(models.build(cfg).apply)
    if name == "uvit":
        eps = apply({"params": params}, data["x"], None, data["t"], data["context"])
        assert np.abs(eps - data["eps"]).max() <= TOL
        return
    eps, map0 = apply({"params": params}, data["x"], data["m"], data["t"], data["context"])
    assert np.abs(eps - data["eps"]).max() <= TOL
    assert np.abs(map0 - data["map0"]).max() <= TOL
    cfg.use_given_map = True
    given = jax.jit(models.build(cfg).apply)
    eps, map0 = given({"params": params}, data["x"], data["m"], data["t"], data["context"])
    assert np.abs(eps - data["eps_given"]).max() <= TOL
    np.testing.assert_array_equal(map0, data["m"])


@pytest.mark.parametrize("name", ["uvit", "two_stream"])
def test_round_trip_is_exact(name):
    kwargs, sd, _ = _fixture(name)
    cfg = official.model_config_from_official_kwargs(kwargs)
    params = official.official_to_params(sd, cfg)
    back = official.params_to_official(params, cfg)
    assert back.keys() == sd.keys()
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    again = traverse_util.flatten_dict(official.official_to_params(back, cfg))
    for path, v in traverse_util.flatten_dict(params).items():
        np.testing.assert_array_equal(again[path], v)


def test_layout_conventions():
    kwargs, sd, _ = _fixture("two_stream")
    params = official.official_to_params(sd, official.model_config_from_official_kwargs(kwargs))
    # qkv: [3D, D] (out = (K H Dh), in) -> [D, 3, H, Dh]; proj: [D, D] -> [H, Dh, D].
    qkv = params["in_blocks_1"]["attn"]["qkv"]["kernel"]
    d, heads = kwargs["embed_dim"], kwargs["num_heads"]
    assert qkv.shape == (d, 3, heads, d // heads)
    weight = sd["in_blocks.1.attn.qkv.weight"]  # [3D, D]
    for k, h, j in ((0, 0, 0), (1, heads - 1, 2), (2, 1, d // heads - 1)):
        row = k * d + h * (d // heads) + j
        np.testing.assert_array_equal(qkv[:, k, h, j], weight[row])
    proj = params["in_blocks_1"]["attn"]["proj"]["kernel"]
    np.testing.assert_array_equal(proj.reshape(d, d), sd["in_blocks.1.attn.proj.weight"].T)
    assert proj.shape == (heads, d // heads, d)
    np.testing.assert_array_equal(
        params["patch_embed"]["proj"]["kernel"], sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        params["zero_convs_3"]["conv"]["kernel"], sd["zero_convs.3.conv.weight"][:, :, 0].T
    )
    np.testing.assert_array_equal(params["norm"]["scale"], sd["norm.weight"])
    np.testing.assert_array_equal(
        params["mask_embed_0"]["proj"]["bias"], sd["mask_embed_0.proj.bias"]
    )
    assert official.path_to_official_name(("out_blocks_mask_1", "skip_linear", "kernel")) == (
        "out_blocks_mask.1.skip_linear.weight"
    )
    assert official.official_name_to_path("time_embed.2.weight", 2) == ("time_embed_2", "kernel")


def test_bad_state_dicts_list_every_problem():
    kwargs, sd, _ = _fixture("one_stream")
    cfg = official.model_config_from_official_kwargs(kwargs)
    bad = dict(sd)
    del bad["mid_block.norm1.bias"]
    bad["in_blocks.0.attn.qkv.bias"] = np.zeros(48, np.float32)
    bad["decoder_pred.weight"] = np.zeros((17, 16), np.float32)
    with pytest.raises(ValueError) as err:
        official.official_to_params(bad, cfg)
    msg = str(err.value)
    assert "missing (1):\n    mid_block.norm1.bias" in msg
    assert "unexpected (1):\n    in_blocks.0.attn.qkv.bias" in msg
    assert "mis-shaped (1):\n    decoder_pred.weight: official (17, 16)" in msg
    with pytest.raises(ValueError, match="unexpected"):
        official.official_to_params(sd, _with(cfg, name="uvit"))
    params = official.official_to_params(sd, cfg)
    params.pop("mask_embed_0")
    with pytest.raises(ValueError, match="missing"):
        official.params_to_official(params, cfg)


def _with(cfg, **overrides):
    cfg = cfg.copy_and_resolve_references()
    cfg.update(overrides)
    return cfg


def test_model_config_from_official_kwargs():
    ref = json.loads((DATA / "pdm_two_stream_small.state_dict.json").read_text())
    official_nnet = dict(ref["model_kwargs"], name="uvit_t2i", use_ground_truth=True)
    with pytest.warns(UserWarning, match="patch_factor"):
        cfg = official.model_config_from_official_kwargs(dict(official_nnet, patch_factor=2))
    assert (cfg.name, cfg.map_patch_factor, cfg.use_given_map, cfg.num_bits) == (
        "two_stream",
        1,
        True,
        8,
    )
    with pytest.raises(ValueError, match="Unknown official UViT kwargs"):
        official.model_config_from_official_kwargs(dict(official_nnet, dropout=0.1))
    with pytest.raises(ValueError, match="uvit_t2i"):
        official.model_config_from_official_kwargs(dict(official_nnet, name="uvit"))
    with pytest.raises(ValueError, match="qk_scale"):
        official.model_config_from_official_kwargs(dict(official_nnet, qk_scale=0.5))


@pytest.mark.torch
def test_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    kwargs, sd, _ = _fixture("uvit")
    cfg = official.model_config_from_official_kwargs(kwargs)
    tensors = {k: torch.from_numpy(v) for k, v in sd.items()}
    tensors["norm.weight"] = tensors["norm.weight"].to(torch.bfloat16)
    params = official.official_to_params(tensors, cfg)
    assert params["norm"]["scale"].dtype == np.float32
    np.testing.assert_array_equal(params["norm"]["scale"], tensors["norm.weight"].float().numpy())
    np.testing.assert_array_equal(params["context_embed"]["kernel"], sd["context_embed.weight"].T)
