"""The config schema, and the run's configuration as typed, frozen values.

Each config group is a frozen dataclass whose fields are declared once, with their default
and a one-line doc (``pdm_jax.fields.option``): ``ModelSpec`` (``pdm_jax.models.spec``),
``DiffusionSpec`` (``pdm_jax.diffusion.spec``), ``DataSpec`` (``pdm_jax.data.schema``) and
the groups below; ``RunSpec`` gathers them (:data:`GROUPS`). From this schema come

* :func:`default_config` — the ``ConfigDict`` that ``configs/pdm.py``'s variants override
  and ``--config.a.b=`` flags act on;
* :func:`path_fields` — the fields ``pdm_jax.paths`` resolves;
* :func:`reference_markdown` — ``docs/configuration.md``
  (``python -m pdm_jax.specs > docs/configuration.md``).

The entry point (``pdm_jax.main``) turns the ``ConfigDict`` into a ``RunSpec`` once, with
:func:`from_config`, and passes it (or its parts) down: models get a ``ModelSpec``,
diffusion a ``DiffusionSpec``, data a ``DataSpec``, sampling a ``SamplerSpec``, the
optimizer an ``OptimizerSpec``. No building block reads a ``ConfigDict``. A config group
with a missing or unknown field is refused with its name; a tuple field also takes
``"a,b,c"``.

Field names are the config's (``run.train.batch_size`` is ``--config.train.batch_size``),
so messages that name a flag stay true.
"""

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections

from pdm_jax import fields
from pdm_jax.data.schema import DataSpec
from pdm_jax.diffusion.reverse import SamplerOptions
from pdm_jax.diffusion.spec import DiffusionSpec
from pdm_jax.fields import ConfigError, option
from pdm_jax.models.spec import ModelSpec


class PreflightError(ConfigError):
    """A run would fail (or waste itself) later; raised at start-up, naming the fix."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplerSpec:
    """The ``config.sampler`` group: DPM-Solver++ settings, the default task, x̂₀ clipping."""

    steps: int = option(50, "Solver steps.")
    order: int = option(3, "Solver order.")
    method: str = option(
        "fast",
        "fast | multistep | singlestep | singlestep_fixed: DPM-Solver++ on the probability-flow "
        "ODE; sde_multistep (orders 1–2): SDE-DPM-Solver++ (order 1 = DDPM ancestral).",
    )
    skip_type: str = option("time_uniform", "Step spacing: time_uniform | logSNR | time_quadratic.")
    cfg_scale: float = option(
        1.0, "Classifier-free guidance scale s: ε̂_c + s·(ε̂_c − ε̂_u); 0: the conditional model."
    )
    task: str = option(
        "cogenerate", "Default task: cogenerate | given_map | given_image | inpaint."
    )
    clip_x0: float = option(
        0.0, "> 0: clip the image data prediction to ±clip_x0 (bounded latents only)."
    )

    def options(self) -> SamplerOptions:
        """The solver settings of ``pdm_jax.diffusion.reverse.sample_pdm``."""
        return SamplerOptions(
            steps=self.steps,
            order=self.order,
            method=self.method,
            skip_type=self.skip_type,
            cfg_scale=self.cfg_scale,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerSpec:
    """The ``config.optim`` group: AdamW, warm-up and decay, clipping, EMA."""

    learning_rate: float = option(2e-4, "Peak AdamW learning rate.")
    weight_decay: float = option(0.03, "AdamW weight decay.")
    b1: float = option(0.9, "AdamW β₁.")
    b2: float = option(0.9, "AdamW β₂.")
    warmup_steps: int = option(5000, "Steps of linear warm-up.")
    decay: str = option(
        "constant",
        "After warm-up: constant (official) | cosine (to final_lr_fraction at the last step) | "
        "wsd (constant, then linear to final_lr_fraction over the last decay_fraction).",
    )
    final_lr_fraction: float = option(0.0, "cosine, wsd: the last step's rate / the peak rate.")
    decay_fraction: float = option(0.2, "wsd: share of the steps over which the rate decays.")
    grad_clip_norm: float = option(
        0.0, "Global gradient-norm clip; 0 disables it (the official recipe does not clip)."
    )
    ema_decay: float = option(0.9999, "Decay of the parameters' EMA.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSpec:
    """The ``config.train`` group: batch, length and the periods of logs, grids and saves."""

    batch_size: int = option(64, "Global batch.", minimum=1)
    num_train_steps: int = option(1_000_000, "Training steps.", minimum=1)
    log_every_steps: int = option(100, "Steps between metric logs.", minimum=1)
    eval_every_steps: int = option(10_000, "Steps between sample grids; 0: none.")
    checkpoint_every_steps: int = option(5_000, "Steps between checkpoints.", minimum=1)
    num_eval_prompts: int = option(8, "Captions in the sample grid written every eval_every_steps.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardingSpec:
    """The ``config.sharding`` group: the mesh, and the host-CPU device split."""

    # The batch is split over data × fsdp; tensor splits heads and MLP hidden units.
    mesh_shape: tuple[int, ...] = option(
        (-1, 1, 1),
        "Devices per mesh axis, one -1 takes the rest: -1,1,1 data parallel; 1,-1,1 FSDP; "
        "1,-1,2 FSDP with 2-way tensor parallelism.",
    )
    mesh_axes: tuple[str, ...] = option(
        ("data", "fsdp", "tensor"),
        "Mesh axis names: data (replicas), fsdp (replicas splitting parameters and optimizer "
        "state), tensor.",
    )
    # Small models run ~1.5× faster on 2 cores; GPUs/TPUs ignore it.
    cpu_devices: int = option(
        0,
        "Host CPU only: single-threaded XLA devices to split it into (0: JAX's one; -1: one "
        "per core, reduced to a divisor of the batch).",
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointSpec:
    """The ``config.ckpt`` group: resume/init sources, retention, the frozen stream."""

    # A step of the workdir's own checkpoints resumes that step when the latest cannot be read.
    resume_from: str = option(
        "", "A run's workdir, checkpoints directory or step directory to resume.", path=True
    )
    init_from: str = option(
        "",
        "Checkpoint whose parameters start the run (a plain model's fills a PDM's image stream).",
        path=True,
    )
    max_to_keep: int = option(3, "The most recent checkpoints kept.", minimum=1)
    freeze_image_stream: bool = option(False, "Train the map stream only (two-stream models).")
    allow_random_frozen_stream: bool = option(
        False,
        "Allow a two-stream run from scratch, whose frozen image stream stays random (tests, "
        "benchmarks).",
    )
    use_ema_for_init: bool = option(True, "init_from takes the EMA parameters when present.")
    async_save: bool = option(True, "Write checkpoints in the background.")
    # grain saves one position per process and cannot re-map it to another process count.
    reset_data_position: bool = option(
        False,
        "Resume without the saved data position: the data order is taken up at the "
        "checkpoint's step.",
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class SampleSpec:
    """The ``config.sample`` group: what ``--mode=sample`` samples and where it writes."""

    step: int = option(-1, "Checkpoint step; -1: the latest.")
    prompt: str = option("", "One caption (or prompts_file).")
    prompts_file: str = option("", "A file of captions, one per line.", path=True)
    num_samples: int = option(1, "Samples per prompt.", minimum=1)
    seed: int = option(0, "Sample i of a prompt uses seed + i.")
    batch_size: int = option(16, "Samples per batch.", minimum=1)
    map: str = option(
        "", "given_map, inpaint: a .npy of ids or a PNG (ids or category colours).", path=True
    )
    image: str = option("", "given_image, inpaint: an RGB PNG.", path=True)
    mask: str = option("", "inpaint: a PNG, white = regenerate, black = keep.", path=True)
    out_dir: str = option(
        "", "Output directory; empty: <workdir>/sample_<task>_step<N>.", path=True
    )
    use_ema: bool = option(True, "Sample with the EMA parameters.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalSpec:
    """The ``config.eval`` group: what ``--mode=evaluate`` samples and scores."""

    num_samples: int = option(
        0, "Samples scored; 0: 30,000 for COCO (the paper), 256 for the synthetic world."
    )
    step: int = option(-1, "Checkpoint step; -1: the latest.")
    task: str = option(
        "cogenerate",
        "cogenerate | given_map (image for the reference map) | given_image (map for the "
        "reference image: mIoU, PQ) | inpaint (a seeded box of image and map regenerated).",
    )
    batch_size: int = option(16, "Samples per batch.", minimum=1)
    seed: int = option(0, "Sample i uses seed + i.")
    use_ema: bool = option(True, "Score the EMA parameters.")
    fid_stats: str = option("", "FID reference statistics .npz (mu, sigma).", path=True)
    inception: str = option(
        "", "pytorch-fid pt_inception-2015-12-05 .pth (or .npz); empty skips FID.", path=True
    )
    inception_batch_size: int = option(50, "Images per Inception batch.")
    clip: str = option("", "CLIP ViT-B/32 directory; empty skips the CLIP score.", path=True)
    clip_batch_size: int = option(64, "Images per CLIP batch.")
    mask_fraction: float = option(0.25, "inpaint: share of the image the seeded box regenerates.")
    # Writes eval/<step>/sweep_<task>.{json,md}.
    sweep: str = option(
        "",
        "Solver sweep method[/order]:NFE,NFE;... (e.g. fast:10,20,50;sde_multistep/2:10,20), "
        "scored once per cell.",
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoSpec:
    """The ``config.demo`` group: the synthetic world's held-out figures after training."""

    use_metrics: bool = option(
        False, "After training, sample held-out prompts and write metrics.json."
    )
    num_prompts: int = option(48, "Held-out prompts sampled.")
    seed: int = option(1234, "Seed of the held-out prompts' samples.")
    # inpaint re-imposes the map noised to the current t: in-distribution for a model trained
    # on jointly noised pairs.
    given_map_task: str = option(
        "given_map",
        "How the given-map figures sample: given_map (map clamped) | inpaint (map re-imposed).",
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunSpec:
    """Everything a run reads, typed; ``to_dict()`` gives the config's JSON back."""

    seed: int = option(0, "Seed of the parameters' initialisation and of training's draws.")
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
        out["data"] = {f.name: out["data"][f.name] for f in fields.config_fields(DataSpec)}
        return out

    def replace(self, **groups: Any) -> "RunSpec":
        """A copy with whole groups replaced, e.g. ``run.replace(sampler=...)``."""
        return dataclasses.replace(self, **groups)


# The config groups, in the config's order: ``{name: spec class}``.
GROUPS: dict[str, type] = {
    f.name: f.type for f in dataclasses.fields(RunSpec) if dataclasses.is_dataclass(f.type)
}


def default_config() -> ml_collections.ConfigDict:
    """The config every variant of ``configs/pdm.py`` starts from: the schema's defaults.

    Returns:
      A new ``ConfigDict``: top-level ``seed`` and one group per :data:`GROUPS` entry.
    """
    config = ml_collections.ConfigDict(fields.defaults(RunSpec))
    for name, cls in GROUPS.items():
        config[name] = ml_collections.ConfigDict(fields.defaults(cls))
    return config


def path_fields() -> tuple[str, ...]:
    """The config fields that hold a path, as ``"group.field"`` (``pdm_jax.paths``)."""
    return tuple(
        f"{name}.{f.name}"
        for name, cls in GROUPS.items()
        for f in fields.config_fields(cls)
        if fields.is_path(f)
    )


def _split(value: Any) -> Any:
    """``"a,b,c"`` (or a one-item sequence of it, as ``--config.x=a,b,c`` gives) → its items."""
    if isinstance(value, list | tuple) and len(value) == 1 and isinstance(value[0], str):
        value = value[0] if "," in value[0] else value
    if isinstance(value, str):
        text = value.strip().strip("()[]")
        return tuple(item.strip().strip("'\"") for item in text.split(",")) if text else ()
    return value


def _convert(value: Any, annotation: Any, where: str, example: Any = None) -> Any:
    """``value`` as the field's type (ints, floats, bools, strings, tuples)."""
    item = fields.tuple_item(annotation)
    if item is not None:
        try:
            return tuple(_convert(v, item, where) for v in _split(value))
        except (ConfigError, TypeError):
            given = ",".join(map(str, value)) if isinstance(value, list | tuple) else value
            raise ConfigError(
                f"{where}={given} must be comma-separated {item.__name__} values, e.g. "
                f"--{where}={fields.spelled(example)}."
            ) from None
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
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
    """``cls`` from one config group: every config field required, no unknown fields."""
    given = dict(group)
    known = {f.name: f for f in fields.config_fields(cls)}
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ConfigError(f"Unknown config.{name} field(s) {unknown}; known: {sorted(known)}.")
    missing = sorted(set(known) - set(given))
    if missing:
        raise ConfigError(
            f"config.{name} lacks {missing}; start from configs/pdm.py or "
            "pdm_jax.specs.default_config() (they hold every default)."
        )
    hints = typing.get_type_hints(cls)
    values = {
        k: _convert(v, hints[k], f"config.{name}.{k}", known[k].default) for k, v in given.items()
    }
    for k, value in values.items():
        fields.check_minimum(known[k], value, f"config.{name}.{k}")
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
    groups = {name: c[name] for name in GROUPS}
    model = _group(ModelSpec, groups.pop("model"), "model")
    diffusion = _group(DiffusionSpec, groups.pop("diffusion"), "diffusion")
    train = _group(TrainSpec, groups.pop("train"), "train")
    data = _group(
        DataSpec,
        groups.pop("data"),
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
        seed=_convert(c["seed"], int, "config.seed"),
        model=model,
        diffusion=diffusion,
        train=train,
        data=data,
        **{name: _group(GROUPS[name], group, name) for name, group in groups.items()},
    )


def as_run_spec(config: Any) -> RunSpec:
    """``config`` itself if it is a ``RunSpec``, else :func:`from_config` of it.

    Run modes call this on their argument so that notebooks can pass the ``ConfigDict``
    of ``configs/pdm.py`` directly.
    """
    return config if isinstance(config, RunSpec) else from_config(config)


_REFERENCE_PREAMBLE = """# Configuration reference

<!-- Generated from the config schema (pdm_jax.specs); do not edit. Regenerate with
     python -m pdm_jax.specs > docs/configuration.md -->

Every field below is set with `--config.<group>.<field>=value` on the command line of
`python -m pdm_jax.main`; the variants of `configs/pdm.py` start from these defaults and
override some of them. Tuple fields take comma-separated values
(`--config.sharding.mesh_shape=1,-1,2`). Path fields may be relative, start with `~` or be
URLs (`gs://...`): they are made absolute once, at start-up.
"""


def reference_markdown() -> str:
    """The configuration reference (``docs/configuration.md``), generated from the schema.

    Returns:
      Markdown: one table per group (field, type, default, doc); path fields are marked.
    """
    return fields.reference_markdown(_REFERENCE_PREAMBLE, RunSpec, GROUPS)


if __name__ == "__main__":
    print(reference_markdown(), end="")
