"""``specs.from_config``: every variant converts; missing, unknown and mistyped fields are named."""

import dataclasses

import ml_collections
import pytest

from configs import pdm as pdm_configs
from pdm_jax import specs


@pytest.mark.parametrize("variant", pdm_configs.VARIANTS)
def test_every_variant_converts_and_round_trips(variant):
    config = pdm_configs.get_config(variant)
    run = specs.from_config(config)
    assert run.model.name == config.model.name
    assert run.train.batch_size == config.train.batch_size
    assert run.data.latent_size == config.model.img_size
    assert run.data.map_size == (
        0
        if config.model.name in ("uvit", "unet")
        else config.model.img_size * config.model.map_patch_factor
    )
    assert run.data.map_pooling == config.diffusion.map_pooling
    # The groups the specs carry are the config's, field for field.
    back = run.to_dict()
    for group, fields in config.to_dict().items():
        if isinstance(fields, dict):
            assert {k: back[group][k] for k in fields} == {
                k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()
            }
    assert specs.from_config(back) == run
    # Block specs are hashable: they key the sampler's compiled programs.
    hash((run.model, run.diffusion, run.sampler))


def test_as_run_spec_passes_a_spec_through():
    run = specs.from_config(pdm_configs.get_config("demo"))
    assert specs.as_run_spec(run) is run


def test_unknown_missing_and_mistyped_fields_are_named():
    config = pdm_configs.get_config("demo,tiny=1")
    unknown = ml_collections.ConfigDict(config.to_dict())
    unknown.train.batch_sise = 4
    with pytest.raises(
        specs.ConfigError, match=r"Unknown config.train field\(s\) \['batch_sise'\]"
    ):
        specs.from_config(unknown)
    missing = config.to_dict()
    del missing["optim"]["b2"]
    with pytest.raises(specs.ConfigError, match=r"config.optim lacks \['b2'\]"):
        specs.from_config(missing)
    mistyped = config.to_dict()
    mistyped["train"]["batch_size"] = "eight"
    with pytest.raises(
        specs.ConfigError, match=r"config\.train\.batch_size='eight' must be of type int"
    ):
        specs.from_config(mistyped)
    unknown_model = config.to_dict()
    unknown_model["model"]["name"] = "vqgan"
    with pytest.raises(ValueError, match="Unknown model name 'vqgan'"):
        specs.from_config(unknown_model)


def test_specs_are_frozen():
    run = specs.from_config(pdm_configs.get_config("demo"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.train.batch_size = 4  # type: ignore[misc]
    assert run.sampler.options().steps == run.sampler.steps
