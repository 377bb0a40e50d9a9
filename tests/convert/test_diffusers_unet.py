"""SD UNet weights: diffusers and CompVis/LDM names ↔ pdm_jax params, and the CLI."""

import json
import pathlib

import numpy as np
import pytest
from flax import traverse_util

from configs import pdm as pdm_configs
from pdm_jax import checkpointing, models
from pdm_jax.convert import diffusers_unet as du
from pdm_jax.convert.__main__ import convert
from pdm_jax.models.unet import UNetSpec, load_packaged_config
from pdm_jax.weights.torch_io import save_safetensors

DATA = pathlib.Path(__file__).resolve().parents[1] / "models" / "data"


def _fixture(name="tiny_sd1"):
    f = np.load(DATA / f"unet_{name}.npz")
    config = json.loads(str(f["config"]))
    state = {k[3:]: f[k].astype(np.float32) for k in f.files if k.startswith("sd/")}
    return config, du.model_config_from_diffusers(config), state


def test_model_config_has_the_fields_of_the_configs_unet():
    # model_config_from_diffusers writes every config.model field by hand: a field added to
    # configs/pdm.py and not there would be missing from every converted checkpoint.
    ours = du.model_config_from_diffusers(load_packaged_config("sd1"))
    theirs = pdm_configs.get_config("unet,sd=1").model
    assert set(ours.keys()) == set(theirs.keys())
    same = ("name", "img_size", "in_chans", "clip_dim", "dtype", "param_dtype", "attention")
    assert {k: ours[k] for k in same} == {k: theirs[k] for k in same}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))


@pytest.mark.parametrize("name", ["tiny_sd1", "tiny_sd2"])
def test_round_trips_are_exact(name):
    _, cfg, state = _fixture(name)
    params = du.diffusers_to_params(state, cfg)
    _assert_same(du.params_to_diffusers(params, cfg), state)
    again = du.diffusers_to_params(du.params_to_diffusers(params, cfg), cfg)
    _assert_same(traverse_util.flatten_dict(again), traverse_util.flatten_dict(params))
    # Layouts: Linear [out, in] -> kernel [in, out]; Conv2d OIHW -> HWIO.
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    np.testing.assert_array_equal(
        params["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]["kernel"],
        state[q].T,
    )
    np.testing.assert_array_equal(
        params["conv_in"]["kernel"], state["conv_in.weight"].transpose(2, 3, 1, 0)
    )


def test_ldm_names_match_the_sd_single_file_layout():
    """Spot checks against SD 1.x's ``model.diffusion_model.*`` names, and the full count."""
    spec = UNetSpec.from_diffusers(load_packaged_config("sd1"))
    table = du.ldm_table(spec)
    assert table["input_blocks.1.1"] == "down_blocks.0.attentions.0"
    assert table["input_blocks.3.0.op"] == "down_blocks.0.downsamplers.0.conv"
    assert table["input_blocks.11.0"] == "down_blocks.3.resnets.1"
    assert table["output_blocks.2.1.conv"] == "up_blocks.0.upsamplers.0.conv"
    assert table["output_blocks.5.2.conv"] == "up_blocks.1.upsamplers.0.conv"
    assert table["output_blocks.11.1"] == "up_blocks.3.attentions.2"
    assert "output_blocks.11.2.conv" not in table
    cfg = du.model_config_from_diffusers(load_packaged_config("sd1"))
    flat = traverse_util.flatten_dict(models.abstract_params(cfg))
    names = {du.path_to_diffusers_name(p): v for p, v in flat.items()}
    ldm = du.diffusers_to_ldm(names, spec)
    assert len(ldm) == 686  # the UNet tensors of v1-5-pruned.ckpt
    for key in (
        "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
        "model.diffusion_model.middle_block.1.transformer_blocks.0.ff.net.0.proj.weight",
        "model.diffusion_model.output_blocks.8.2.conv.bias",
        "model.diffusion_model.time_embed.2.weight",
        "model.diffusion_model.out.2.bias",
        "model.diffusion_model.output_blocks.0.0.emb_layers.1.weight",
    ):
        assert key in ldm, key
    assert du.ldm_to_diffusers(ldm, spec).keys() == names.keys()


@pytest.mark.parametrize("name", ["tiny_sd1", "tiny_sd2"])
def test_ldm_round_trip(name):
    config, _, state = _fixture(name)
    spec = UNetSpec.from_diffusers(config)
    ldm = du.diffusers_to_ldm(state, spec)
    assert all(k.startswith("model.diffusion_model.") for k in ldm)
    ldm["first_stage_model.decoder.conv_in.weight"] = np.zeros(1)  # other parts are skipped
    _assert_same(du.ldm_to_diffusers(ldm, spec), state)


def test_mismatch_errors_name_the_tensor():
    _, cfg, state = _fixture("tiny_sd1")
    _, cfg2, _ = _fixture("tiny_sd2")
    with pytest.raises(ValueError, match=r"attn2\.to_k\.weight: checkpoint \(16, 24\)"):
        du.diffusers_to_params(state, cfg2)
    missing = dict(state)
    del missing["conv_out.bias"]
    with pytest.raises(ValueError, match=r"missing \(1\):\n    conv_out\.bias"):
        du.diffusers_to_params(missing, cfg)
    with pytest.raises(ValueError, match=r"unexpected \(1\):\n    extra\.weight"):
        du.diffusers_to_params({**state, "extra.weight": np.zeros(3)}, cfg)
    with pytest.raises(ValueError, match=r"No model\.diffusion_model"):
        du.ldm_to_diffusers(
            {"cond_stage_model.x": np.zeros(1)},
            UNetSpec.from_diffusers(load_packaged_config("tiny_sd1")),
        )
    with pytest.raises(ValueError, match="Cannot tell the SD version"):
        du.infer_sd_version({})


def test_cli_unet_from_directory_and_single_file_and_export(tmp_path):
    config, cfg, state = _fixture("tiny_sd1")
    params = du.diffusers_to_params(state, cfg)
    src = du.write_diffusers(str(tmp_path / "unet"), params, cfg)
    convert(["unet", "--input", src, "--output", str(tmp_path / "ck")])
    loaded, _ = checkpointing.load_params(tmp_path / "ck")
    _assert_same(traverse_util.flatten_dict(loaded), traverse_util.flatten_dict(params))

    single = tmp_path / "model.safetensors"
    save_safetensors(du.diffusers_to_ldm(state, UNetSpec.from_diffusers(config)), single)
    convert(
        [
            "unet",
            "--input",
            str(single),
            "--output",
            str(tmp_path / "ck1"),
            "--config",
            "configs/pdm.py:unet,tiny=1",
        ]
    )
    loaded1, _ = checkpointing.load_params(tmp_path / "ck1")
    _assert_same(traverse_util.flatten_dict(loaded1), traverse_util.flatten_dict(params))

    out = convert(["export", "--input", str(tmp_path / "ck"), "--output", str(tmp_path / "back")])
    from safetensors.numpy import load_file

    _assert_same(load_file(f"{out}/diffusion_pytorch_model.safetensors"), state)
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == {
        "_class_name": "UNet2DConditionModel",
        **{k: v for k, v in config.items() if not k.startswith("_")},
    }


@pytest.mark.torch
def test_ldm_names_agree_with_diffusers_single_file_converter():
    """diffusers' own LDM → diffusers converter reads our LDM names back to its names."""
    pytest.importorskip("torch")
    sfu = pytest.importorskip("diffusers.loaders.single_file_utils")
    for name in ("tiny_sd1", "tiny_sd2"):
        config, _, state = _fixture(name)
        ldm = du.diffusers_to_ldm(state, UNetSpec.from_diffusers(config))
        back = sfu.convert_ldm_unet_checkpoint(ldm, config)
        _assert_same({k: np.asarray(v) for k, v in back.items()}, state)
