"""Config and flag errors at the command line: one line, no traceback (``pdm_jax.cli``)."""

import sys

import pytest
from absl import flags
from ml_collections import config_flags

from pdm_jax import cli
from tests.cli import REPO, run_main

CONFIG = f"--config={REPO}/configs/pdm.py:demo,tiny=1"


def _parse(monkeypatch, *args: str) -> flags.FlagValues:
    """``args`` parsed by ``cli.parse_flags`` into fresh flags (a locked config flag)."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, lock_config=True)
    flags.DEFINE_string("workdir", None, "workdir", flag_values=fv)
    argv = ["prog", *args]
    monkeypatch.setattr(sys, "argv", argv)  # ml_collections reads the overrides from there
    cli.parse_flags(argv, fv)
    return fv


def _refusal(monkeypatch, capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        _parse(monkeypatch, *args)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_tuple_fields_take_comma_separated_values(monkeypatch):
    fv = _parse(
        monkeypatch,
        CONFIG,
        "--config.sharding.mesh_axes=data,fsdp,tensor",
        "--config.sharding.mesh_shape=1,4,1",
    )
    assert fv.config.sharding.mesh_axes == ("data", "fsdp", "tensor")
    assert fv.config.sharding.mesh_shape == (1, 4, 1)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--config.train.batch_sise=4"],
            "error: --config.train.batch_sise: config.train has no field 'batch_sise' "
            "(did you mean 'batch_size'?); its fields are batch_size,",
        ),
        (["--config.trian.batch_size=4"], "error: --config.trian.batch_size: the config has no"),
        (
            ["--config.train.batch_size=abc"],
            "error: --config.train.batch_size=abc: config.train.batch_size takes an int, "
            "e.g. --config.train.batch_size=64.",
        ),
        (
            ["--config.sharding.mesh_shape=1,x,1"],
            "error: config.sharding.mesh_shape=1,x,1 must be comma-separated int values, "
            "e.g. --config.sharding.mesh_shape=-1,1,1.",
        ),
        (["--config.model.name=vqgan"], "error: Unknown model name 'vqgan'; choose one of"),
    ],
)
def test_config_errors_are_one_line(monkeypatch, capsys, args, message):
    assert _refusal(monkeypatch, capsys, CONFIG, *args).startswith(message)


def test_config_file_errors_are_one_line(monkeypatch, capsys):
    err = _refusal(monkeypatch, capsys, f"--config={REPO}/configs/pdm.py:nosuch")
    assert err.startswith("error: Unknown variant 'nosuch'; choose one of ('demo',")
    err = _refusal(monkeypatch, capsys, f"--config={REPO}/configs/pdm.py:uvit,map_patch_factor=x")
    assert err.startswith("error: Config option map_patch_factor='x' must be a positive integer")
    err = _refusal(monkeypatch, capsys, "--config=configs/nosuch.py:demo")
    assert err == (
        "error: --config: the config file does not load: [Errno 2] No such file or directory: "
        "'configs/nosuch.py'"
    )


def test_main_prints_config_errors_without_a_traceback(tmp_path):
    result = run_main(CONFIG, f"--workdir={tmp_path}", "--config.train.bogus=1")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("error: --config.train.bogus: config.train has no field 'bogus'")
    )
    assert not any(tmp_path.iterdir())
