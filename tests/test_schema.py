"""The config schema: one default and one line of doc per field, the generated reference."""

import dataclasses
import typing
from pathlib import Path

import pytest

from configs import pdm as pdm_configs
from pdm_jax import fields, specs
from pdm_jax.models.unet import UNetSpec
from pdm_jax.models.uvit import UViTSpec

REPO = Path(__file__).resolve().parents[1]
SCHEMA = {"": specs.RunSpec, **specs.GROUPS}


@pytest.mark.parametrize("group", list(SCHEMA))
def test_every_field_has_a_one_line_doc_and_its_only_default(group):
    cls = SCHEMA[group]
    declared = fields.config_fields(cls)
    assert declared, f"{cls.__name__} declares no config field"
    for f in declared:
        text = fields.doc(f)
        assert text.strip() and "\n" not in text, f"{group}.{f.name}: one line of doc"
        assert f.default is not dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    # Fields that are not config fields (DataSpec's sizes, RunSpec's groups) have no default.
    for f in dataclasses.fields(cls):
        if not fields.is_config_field(f):
            assert f.default is dataclasses.MISSING, f"{group}.{f.name} has a stray default"
            assert f.default_factory is dataclasses.MISSING


@pytest.mark.parametrize("spec", [UViTSpec, UNetSpec])
def test_model_specs_declare_no_defaults_of_their_own(spec):
    with_defaults = [
        f.name
        for f in dataclasses.fields(spec)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    ]
    assert with_defaults == []


def test_uvit_spec_fields_are_model_fields():
    model = {f.name: f.type for f in fields.config_fields(specs.GROUPS["model"])}
    for f in dataclasses.fields(UViTSpec):
        assert model[f.name] is f.type, f.name


def test_default_config_is_the_schema():
    config = specs.default_config()
    assert config.seed == fields.defaults(specs.RunSpec)["seed"]
    for group, cls in specs.GROUPS.items():
        assert config[group].to_dict() == fields.defaults(cls)
    assert set(config.keys()) == {"seed", *specs.GROUPS}


@pytest.mark.parametrize("variant", pdm_configs.VARIANTS)
def test_variants_override_schema_fields_only(variant):
    config = pdm_configs.get_config(f"{variant},tiny=1").to_dict()
    assert set(config) == {"seed", *specs.GROUPS}
    for group, cls in specs.GROUPS.items():
        hints = typing.get_type_hints(cls)
        assert set(config[group]) == {f.name for f in fields.config_fields(cls)}
        for name, value in config[group].items():
            kind = typing.get_origin(hints[name]) or hints[name]
            assert isinstance(value, kind), f"{group}.{name}={value!r}"


def test_path_fields_are_marked_in_the_schema():
    assert set(specs.path_fields()) == {
        f"{group}.{f.name}"
        for group, cls in specs.GROUPS.items()
        for f in fields.config_fields(cls)
        if fields.is_path(f)
    }
    assert "ckpt.init_from" in specs.path_fields() and "model.unet_config" not in (
        specs.path_fields()
    )


def test_configuration_reference_is_generated_from_the_schema():
    committed = (REPO / "docs" / "configuration.md").read_text()
    assert committed == specs.reference_markdown(), (
        "docs/configuration.md is stale; regenerate it with "
        "`python -m pdm_jax.specs > docs/configuration.md`."
    )
    for group, cls in SCHEMA.items():
        for f in fields.config_fields(cls):
            name = f"{group}.{f.name}" if group else f.name
            assert f"| `{name}` |" in committed


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("data,fsdp,tensor", ("data", "fsdp", "tensor")),
        (("data,fsdp,tensor",), ("data", "fsdp", "tensor")),  # --config.x=a,b,c gives this
        (["data", "fsdp", "tensor"], ("data", "fsdp", "tensor")),
        (" (data, fsdp) ", ("data", "fsdp")),
        (("data",), ("data",)),
    ],
)
def test_tuple_fields_take_comma_separated_values(given, expected):
    plain = pdm_configs.get_config("demo,tiny=1").to_dict()
    plain["sharding"]["mesh_axes"] = given
    assert specs.from_config(plain).sharding.mesh_axes == expected


def test_tuple_of_ints_takes_comma_separated_values_and_names_a_bad_item():
    plain = pdm_configs.get_config("demo,tiny=1").to_dict()
    for given in ("1,4,1", ("1,4,1",), (1, 4, 1)):
        plain["sharding"]["mesh_shape"] = given
        assert specs.from_config(plain).sharding.mesh_shape == (1, 4, 1)
    plain["sharding"]["mesh_shape"] = ("1,x,1",)
    with pytest.raises(
        specs.ConfigError,
        match=r"config\.sharding\.mesh_shape=1,x,1 must be comma-separated int values, "
        r"e\.g\. --config\.sharding\.mesh_shape=-1,1,1\.",
    ):
        specs.from_config(plain)


BOUNDED = [
    ("train", "batch_size"),
    ("train", "num_train_steps"),
    ("train", "log_every_steps"),
    ("train", "checkpoint_every_steps"),
    ("ckpt", "max_to_keep"),
    ("model", "map_patch_factor"),
    ("sample", "batch_size"),
    ("sample", "num_samples"),
    ("eval", "batch_size"),
]


@pytest.mark.parametrize(("group", "name"), BOUNDED)
@pytest.mark.parametrize("value", [0, -1])
def test_counts_below_their_minimum_are_refused_by_name(group, name, value):
    config = pdm_configs.get_config("demo,tiny=1")
    config[group][name] = value
    with pytest.raises(specs.ConfigError) as refused:
        specs.from_config(config)
    message = str(refused.value)
    assert message.startswith(f"--config.{group}.{name}={value}: must be at least 1")
    assert f"pass --config.{group}.{name}= a value of 1 or more" in message
    config[group][name] = 1  # the minimum itself is taken
    assert getattr(getattr(specs.from_config(config), group), name) == 1


def test_minimums_are_in_the_schema_and_the_reference():
    bounded = {
        (group, f.name)
        for group, cls in specs.GROUPS.items()
        for f in fields.config_fields(cls)
        if fields.minimum(f) is not None
    }
    assert bounded == set(BOUNDED)
    assert "| `ckpt.max_to_keep` | int, ≥ 1 |" in specs.reference_markdown()
