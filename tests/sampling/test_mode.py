"""Sample mode reads what the user passed, and makes its output folder, before it samples."""

import pytest

from configs import pdm as pdm_configs
from pdm_jax import specs
from pdm_jax.sampling import mode as sample_mode


def _config(**sample):
    config = pdm_configs.get_config("demo,tiny=1")
    config.sample.update(sample)
    return specs.from_config(config)


def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(specs.ConfigError, match=r"cannot be written .*--config\.sample\.out_dir"):
        sample_mode.make_output_dir(blocker / "samples")
    made = tmp_path / "new" / "samples"
    sample_mode.make_output_dir(made)
    assert made.is_dir() and not list(made.iterdir())  # the write check leaves nothing


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"\xff\xfe\x00bad", "is not UTF-8 text"), (b"\n  \n", "has no non-empty lines")],
)
def test_a_bad_prompts_file_is_refused_before_any_checkpoint_is_read(tmp_path, content, message):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(content)
    empty_workdir = tmp_path / "run"  # no checkpoint: reading it would fail differently
    empty_workdir.mkdir()
    with pytest.raises(specs.ConfigError, match=message):
        sample_mode.run(_config(prompts_file=str(prompts)), str(empty_workdir))


def test_a_missing_map_file_is_refused_before_any_checkpoint_is_read(tmp_path):
    config = pdm_configs.get_config("demo,tiny=1")
    config.sampler.task = "given_map"
    config.sample.update(prompt="a red circle", map=str(tmp_path / "no_such_map.npy"))
    with pytest.raises(FileNotFoundError, match="no_such_map"):
        sample_mode.run(specs.from_config(config), str(tmp_path))
