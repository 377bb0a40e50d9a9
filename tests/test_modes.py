"""The run modes (``pdm_jax.modes``): names, batches, and their checks before the shared ones."""

import pytest

from configs import pdm as pdm_configs
from pdm_jax import modes, preflight


def test_every_mode_is_named_once():
    assert list(modes.MODES) == ["train", "sample", "evaluate"]
    assert all(modes.get(name).name == name for name in modes.MODES)
    assert modes.MODES["train"].spans_processes
    assert not modes.MODES["sample"].spans_processes
    assert not modes.MODES["evaluate"].spans_processes


@pytest.mark.parametrize(("mode", "want"), [("train", 8), ("evaluate", 6), ("sample", 4)])
def test_mode_batch_size_is_the_batch_the_mode_shards(mode, want):
    config = pdm_configs.get_config("demo")
    config.train.batch_size, config.eval.batch_size, config.sample.batch_size = 8, 6, 4
    assert modes.get(mode).batch_size(config) == want


def test_mode_batch_size_rejects_unknown_modes():
    with pytest.raises(ValueError, match="Unknown mode 'serve'"):
        modes.get("serve").batch_size(pdm_configs.get_config("demo"))


def test_only_an_evaluation_sweep_replaces_the_solver_settings():
    config = pdm_configs.get_config("demo,tiny=1")
    config.eval.sweep = "multistep/2:4"
    run = preflight.preflight(config, spans_processes=False, check_solver=False)
    assert not modes.get("evaluate").uses_solver(run)
    assert modes.get("train").uses_solver(run) and modes.get("sample").uses_solver(run)
