"""The run's configuration as typed, frozen values: ``ConfigDict`` in, ``RunSpec`` out.

The entry point (``pdm_jax.main``) turns the ``ConfigDict`` of ``configs/pdm.py`` into a
``RunSpec`` once, with :func:`from_config`, and passes it (or its parts) down: models get
a ``ModelSpec``, diffusion a ``DiffusionSpec``, data a ``DataSpec``, sampling a
``SamplerSpec``, the optimizer an ``OptimizerSpec``. No building block reads a
``ConfigDict``. Defaults live in ``configs/pdm.py`` only: every field here is required,
and a config group with a missing or unknown field is refused with its name.

Field names are the config's (``run.train.batch_size`` is ``--config.train.batch_size``),
so messages that name a flag stay true.
"""

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

from pdm_jax.data.schema import DataSpec
from pdm_jax.diffusion.reverse import SamplerOptions
from pdm_jax.diffusion.spec import DiffusionSpec
from pdm_jax.models.spec import ModelSpec


class ConfigError(ValueError):
    """A config field is missing, unknown or of the wrong type; the message names it."""


class PreflightError(ConfigError):
    """A run would fail (or waste itself) later; raised at start-up, naming the fix."""


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """The ``config.sampler`` group: DPM-Solver++ settings, the default task, x̂₀ clipping."""

    steps: int
    order: int
    method: str
    skip_type: str
    cfg_scale: float
    task: str
    clip_x0: float

    def options(self) -> SamplerOptions:
        """The solver settings of ``pdm_jax.diffusion.reverse.sample_pdm``."""
        return SamplerOptions(
            steps=self.steps,
            order=self.order,
            method=self.method,
            skip_type=self.skip_type,
            cfg_scale=self.cfg_scale,
        )


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """The ``config.optim`` group: AdamW, warm-up and decay, clipping, EMA."""

    learning_rate: float
    weight_decay: float
    b1: float
    b2: float
    warmup_steps: int
    decay: str
    final_lr_fraction: float
    decay_fraction: float
    grad_clip_norm: float
    ema_decay: float


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """The ``config.train`` group: batch, length and the periods of logs, grids and saves."""

    batch_size: int
    num_train_steps: int
    log_every_steps: int
    eval_every_steps: int
    checkpoint_every_steps: int
    num_eval_prompts: int


@dataclasses.dataclass(frozen=True)
class ShardingSpec:
    """The ``config.sharding`` group: the mesh, and the host-CPU device split."""

    mesh_shape: tuple[int, ...]
    mesh_axes: tuple[str, ...]
    cpu_devices: int


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
    """The ``config.ckpt`` group: resume/init sources, retention, the frozen stream."""

    resume_from: str
    init_from: str
    max_to_keep: int
    freeze_image_stream: bool
    allow_random_frozen_stream: bool
    use_ema_for_init: bool
    async_save: bool
    reset_data_position: bool


@dataclasses.dataclass(frozen=True)
class SampleSpec:
    """The ``config.sample`` group: what ``--mode=sample`` samples and where it writes."""

    step: int
    prompt: str
    prompts_file: str
    num_samples: int
    seed: int
    batch_size: int
    map: str
    image: str
    mask: str
    out_dir: str
    use_ema: bool


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """The ``config.eval`` group: what ``--mode=evaluate`` samples and scores."""

    num_samples: int
    step: int
    task: str
    batch_size: int
    seed: int
    use_ema: bool
    fid_stats: str
    inception: str
    inception_batch_size: int
    clip: str
    clip_batch_size: int
    mask_fraction: float
    sweep: str


@dataclasses.dataclass(frozen=True)
class DemoSpec:
    """The ``config.demo`` group: the synthetic world's held-out figures after training."""

    use_metrics: bool
    num_prompts: int
    seed: int
    given_map_task: str


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Everything a run reads, typed; ``to_dict()`` gives the config's JSON back."""

    seed: int
    model: ModelSpec
    diffusion: DiffusionSpec
    sampler: SamplerSpec
    optim: OptimizerSpec
    train: TrainSpec
    data: DataSpec
    sharding: ShardingSpec
    ckpt: CheckpointSpec
    sample: SampleSpec
    eval: EvalSpec
    demo: DemoSpec

    def to_dict(self) -> dict[str, Any]:
        """The config groups as plain dicts (the data spec without its derived sizes)."""
        out = dataclasses.asdict(self)
        out["data"] = {k: out["data"][k] for k in _DATA_CONFIG_FIELDS}
        return out

    def replace(self, **groups: Any) -> "RunSpec":
        """A copy with whole groups replaced, e.g. ``run.replace(sampler=...)``."""
        return dataclasses.replace(self, **groups)


# The DataSpec fields that come from config.data (the others derive from other groups).
_DATA_CONFIG_FIELDS = (
    "source",
    "dir",
    "num_workers",
    "num_threads",
    "prefetch",
    "seed",
    "latent_scale",
    "num_records",
    "vae",
    "clip",
)


def _convert(value: Any, annotation: Any, where: str) -> Any:
    """``value`` as the field's type (ints, floats, bools, strings, tuples)."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        (item,) = {a for a in typing.get_args(annotation) if a is not Ellipsis}
        return tuple(_convert(v, item, where) for v in value)
    if origin in (typing.Union, types.UnionType):
        return value
    if annotation is bool:
        if not isinstance(value, bool | int):
            raise ConfigError(f"{where}={value!r} must be a boolean.")
        return bool(value)
    if annotation in (int, float, str):
        try:
            return annotation(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}={value!r} must be of type {annotation.__name__}.") from None
    return value


def _group(cls: type, group: Mapping[str, Any], name: str, **derived: Any) -> Any:
    """``cls`` from one config group: every field required, no unknown fields."""
    given = dict(group)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - set(fields))
    if unknown:
        raise ConfigError(f"Unknown config.{name} field(s) {unknown}; known: {sorted(fields)}.")
    missing = sorted(set(fields) - set(given) - set(derived))
    if missing:
        raise ConfigError(
            f"config.{name} lacks {missing}; start from configs/pdm.py (its get_config holds "
            "every default)."
        )
    hints = typing.get_type_hints(cls)
    values = {k: _convert(v, hints[k], f"config.{name}.{k}") for k, v in given.items()}
    return cls(**values, **derived)


def from_config(config: Any) -> RunSpec:
    """The ``RunSpec`` of a ``configs/pdm.py`` config (a ``ConfigDict`` or a plain dict).

    Args:
      config: the full config.

    Returns:
      The typed, frozen spec.

    Raises:
      ConfigError: naming a missing, unknown or mistyped field.
    """
    c = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    model = _group(ModelSpec, c["model"], "model")
    diffusion = _group(DiffusionSpec, c["diffusion"], "diffusion")
    train = _group(TrainSpec, c["train"], "train")
    data = _group(
        DataSpec,
        c["data"],
        "data",
        latent_size=model.img_size,
        latent_channels=model.in_chans,
        map_size=model.map_size,
        num_clip_token=model.num_clip_token,
        clip_dim=model.clip_dim,
        map_pooling=diffusion.map_pooling,
        num_eval_prompts=train.num_eval_prompts,
    )
    return RunSpec(
        seed=int(c["seed"]),
        model=model,
        diffusion=diffusion,
        sampler=_group(SamplerSpec, c["sampler"], "sampler"),
        optim=_group(OptimizerSpec, c["optim"], "optim"),
        train=train,
        data=data,
        sharding=_group(ShardingSpec, c["sharding"], "sharding"),
        ckpt=_group(CheckpointSpec, c["ckpt"], "ckpt"),
        sample=_group(SampleSpec, c["sample"], "sample"),
        eval=_group(EvalSpec, c["eval"], "eval"),
        demo=_group(DemoSpec, c["demo"], "demo"),
    )


def as_run_spec(config: Any) -> RunSpec:
    """``config`` itself if it is a ``RunSpec``, else :func:`from_config` of it.

    Run modes call this on their argument so that notebooks can pass the ``ConfigDict``
    of ``configs/pdm.py`` directly.
    """
    return config if isinstance(config, RunSpec) else from_config(config)
