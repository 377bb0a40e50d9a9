"""``python -m pdm_jax.convert``: official state dicts in, pdm_jax checkpoints out, and back."""

import importlib
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import app, flags
from flax import traverse_util

from configs import pdm as pdm_configs
from pdm_jax import checkpointing, models, specs
from pdm_jax.convert import __main__ as cli
from pdm_jax.convert import official
from pdm_jax.convert.__main__ import convert
from pdm_jax.train import init as init_lib
from pdm_jax.weights.torch_io import load_state_dict, save_safetensors

UVIT = "configs/pdm.py:uvit,tiny=1"
TWO = "configs/pdm.py:two_stream,tiny=1,map_patch_factor=1"
_REPO = pathlib.Path(__file__).resolve().parents[2]


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


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "pdm_jax.convert", *args],
        cwd=_REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_help_runs_as_a_subprocess_and_lists_the_kinds():
    result = _run_cli("--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("python -m pdm_jax.convert pdm --input")
    for kind in cli.KINDS:
        assert f"``{kind}``" in result.stdout
    for flag in ("--input", "--output", "--config", "--model_kwargs", "--[no]use_ema"):
        assert flag in result.stdout


def test_unknown_kind_exits_2_with_a_message_naming_the_kinds(tmp_path):
    result = _run_cli("bogus", "--input", "x.pth", "--output", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "error: Unknown kind 'bogus'" in result.stderr
    assert "uvit, pdm, vae, clip_text, unet, export" in result.stderr
    assert "Traceback" not in result.stderr


def test_usage_errors_name_the_fix(tmp_path):
    out = str(tmp_path / "o")
    cases = {
        "needs --config": ["export", "--input", out, "--output", f"{out}.safetensors"],
        r"must end in \.pth": ["export", "--input", out, "--output", out, "--config", UVIT],
        "Unknown kind 'nope'": ["nope", "--input", out, "--output", out],
        "Missing the kind": ["--input", out, "--output", out],
        "needs --input and --output": ["vae"],
        "Unknown command line flag 'inputt'": ["vae", "--inputt", out, "--output", out],
        "Missing value for flag --output": ["vae", "--input", out, "--output"],
        "--nouse_ema": ["export", "--input", out, "--output", out, "--use_ema", "0"],
    }
    for message, argv in cases.items():
        with pytest.raises(app.UsageError, match=message):
            convert(argv)
    path, _, _ = _official_file(tmp_path, "uvit,tiny=1")
    with pytest.raises(app.UsageError, match="needs a uvit model config, got 'two_stream'"):
        convert(["uvit", "--input", str(path), "--output", out, "--config", TWO])


def test_flag_spellings_parse_as_before():
    base = ["export", "--input", "w", "--output", "o.pth"]
    assert cli._parse(base).use_ema is True
    assert cli._parse([*base, "--use_ema=0"]).use_ema is False
    assert cli._parse([*base, "--nouse_ema"]).use_ema is False
    args = cli._parse(["--config=c.py:x", "pdm", "--input=a", "--output", "b", "--model_kwargs={}"])
    assert (args.kind, args.input, args.output, args.config, args.model_kwargs) == (
        "pdm",
        "a",
        "b",
        "c.py:x",
        "{}",
    )


def test_importing_and_running_the_cli_defines_no_global_flags(capsys):
    before = set(flags.FLAGS)
    importlib.reload(cli)  # runs the module body again, as a fresh import does
    for name in ("input", "output", "model_kwargs", "use_ema"):
        assert name not in flags.FLAGS
    for _ in range(2):  # a fresh FlagValues per call: no DuplicateFlagError the second time
        with pytest.raises(SystemExit) as exited:
            cli.convert(["--help"])
        assert exited.value.code == 0
        with pytest.raises(app.UsageError, match="Unknown kind"):
            cli.convert(["nope", "--input", "a", "--output", "b"])
    assert "--model_kwargs" in capsys.readouterr().out
    assert set(flags.FLAGS) == before
