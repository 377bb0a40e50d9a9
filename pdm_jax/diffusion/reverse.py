"""The joint PDM sampler: DPM-Solver++ over (image latent, map) with CFG and tasks.

One function serves every task of a co-generation model (DESIGN §4):

* ``cogenerate``  — image and map from noise (map noise std = ``map_noise_std``).
* ``given_map``   — the map input is clamped to the clean map; only the image is solved.
* ``given_image`` — the image input is clamped to the clean latent; only the map is
  solved (segmentation of a given image).
* ``inpaint``     — both are solved; after every solver step the known region of x and/or
  M (``mask == 1``) is re-imposed, noised to the current t with the initial noise, and
  pasted exactly at the end.

The network's image output is ε̂ (or v̂ or x̂_0, ``image_prediction``), turned into the data
prediction ``x̂_0 = (x_t − σ_t ε̂)/α_t`` (``α_t x_t − σ_t v̂``); its map output is M̂_0
already. The model's time input is
``t · N`` (continuous t, N discrete steps), as in the official sampler.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from pdm_jax.diffusion import dpm_solver
from pdm_jax.diffusion.guidance import guided
from pdm_jax.diffusion.losses import bcast_like, check_image_prediction
from pdm_jax.diffusion.schedules import VPSchedule

Array = jax.Array
# (params, x_t, m_t, t_model, context) -> eps | (eps, map0)
ApplyFn = Callable[[Any, Array, Array | None, Array, Array], Any]

TASKS = ("cogenerate", "given_map", "given_image", "inpaint")


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
    """Static solver settings (hashable: one compiled program per distinct value)."""

    steps: int = 50
    order: int = 3
    method: str = "fast"
    skip_type: str = "time_uniform"
    cfg_scale: float = 1.0
    lower_order_final: bool = True


def to_data_prediction(
    out: Array, x_t: Array, alpha: Array, sigma: Array, image_prediction: str
) -> Array:
    """The image head's output (ε̂, v̂ or x̂_0) as the data prediction x̂_0.

    Args:
      out: the network's image output.
      x_t: the noisy latents it was given.
      alpha, sigma: α_t and σ_t, broadcastable to ``x_t``.
      image_prediction: ``"eps"``, ``"v"`` or ``"x0"``.

    Returns:
      x̂_0, shaped like ``x_t``.
    """
    if image_prediction == "x0":
        return out
    if image_prediction == "v":
        return alpha * x_t - sigma * out
    return (x_t - sigma * out) / alpha


def from_data_prediction(
    x0: Array, x_t: Array, alpha: Array, sigma: Array, image_prediction: str
) -> Array:
    """The inverse of ``to_data_prediction``: the head output that implies x̂_0 = ``x0``."""
    if image_prediction == "x0":
        return x0
    if image_prediction == "v":
        return (alpha * x_t - x0) / sigma
    return (x_t - alpha * x0) / sigma


def check_task(task: str, has_map: bool, model_name: str = "") -> None:
    """The one check of a sampling task's name against the model that samples it.

    Args:
      task: one of ``TASKS`` (``sampler.task``).
      has_map: whether the model has a map stream (every task but ``cogenerate`` needs one).
      model_name: the model's ``model.name``, for the message.

    Raises:
      ValueError: naming the flag that fixes it.
    """
    if task not in TASKS:
        raise ValueError(
            f"sampler.task={task!r} is not a sampling task: pass --config.sampler.task= "
            f"one of {TASKS}."
        )
    if task != "cogenerate" and not has_map:
        model = f"model.name={model_name!r}" if model_name else "the model"
        raise ValueError(
            f"sampler.task={task!r} needs a map stream, and {model} has none: sample it "
            "with --config.sampler.task=cogenerate."
        )


def _check_task(task, map_shape, known_x, known_m, mask_x, mask_m) -> None:
    check_task(task, has_map=map_shape is not None)
    needs = {
        "given_map": {"known_m": known_m},
        "given_image": {"known_x": known_x},
        "inpaint": {},
    }.get(task, {})
    for name, value in needs.items():
        if value is None:
            raise ValueError(f"Task {task!r} needs {name}.")
    if task == "inpaint":
        if (known_x is None) != (mask_x is None) or (known_m is None) != (mask_m is None):
            raise ValueError("Inpainting needs known_x with mask_x and/or known_m with mask_m.")
        if known_x is None and known_m is None:
            raise ValueError("Inpainting needs at least one known region (x and/or M).")


def sample_pdm(
    apply_fn: ApplyFn,
    params: Any,
    rng: Array,
    context: Array,
    empty_context: Array,
    schedule: VPSchedule,
    *,
    image_shape: tuple[int, ...],
    map_shape: tuple[int, ...] | None,
    options: SamplerOptions = SamplerOptions(),
    map_noise_std: float = 2.0,
    task: str = "cogenerate",
    known_x: Array | None = None,
    known_m: Array | None = None,
    mask_x: Array | None = None,
    mask_m: Array | None = None,
    image_prediction: str = "eps",
) -> dict[str, Array]:
    """Samples image latents (and maps) for a batch of contexts.

    Jit it with ``apply_fn``, ``schedule`` and the keyword arguments bound
    (``functools.partial``): a closed-over schedule lets the solver precompute its
    coefficient tables at trace time. Parameters, keys and arrays may be traced.

    Args:
      apply_fn: ``(params, x_t, m_t, t_model, context)`` → ε̂ or ``(ε̂, M̂_0)``.
      params: model parameters.
      rng: PRNG key for the initial noise.
      context: ``[B, T, D]``; empty_context: ``[T, D]``.
      schedule: the continuous VP view of the training schedule.
      image_shape: per-example latent shape ``(S, S, C)``.
      map_shape: per-example analog-bit map shape ``(fS, fS, bits)``, None for a U-ViT.
      options: solver and guidance settings.
      map_noise_std: std of the map's initial noise (matches training).
      task: one of ``TASKS``.
      known_x, known_m: clean latents ``[B, S, S, C]`` / analog-bit maps ``[B, fS, fS, bits]``.
      mask_x, mask_m: inpainting masks broadcastable to the known arrays, 1 = known.
      image_prediction: what the network's image output is: ``"eps"``, ``"v"`` or ``"x0"``.

    Returns:
      ``{"x": [B, S, S, C]}`` plus ``"m": [B, fS, fS, bits]`` for PDMs.
    """
    _check_task(task, map_shape, known_x, known_m, mask_x, mask_m)
    check_image_prediction(image_prediction)
    batch = context.shape[0]
    net = guided(
        lambda x, m, t, c: apply_fn(params, x, m, t, c), context, empty_context, options.cfg_scale
    )
    k_x, k_m = jax.random.split(rng)
    noise = {"x": jax.random.normal(k_x, (batch, *image_shape), jnp.float32)}
    if map_shape is not None:
        noise["m"] = map_noise_std * jax.random.normal(k_m, (batch, *map_shape), jnp.float32)

    solved = {"cogenerate": ("x", "m"), "given_map": ("x",), "given_image": ("m",)}.get(
        task, ("x", "m")
    )
    solved = tuple(k for k in solved if k in noise)
    clamped = {"x": known_x, "m": known_m}

    def data_pred(state: dict[str, Array], t: Array) -> dict[str, Array]:
        x_t = state["x"] if "x" in state else clamped["x"]
        m_t = state.get("m", clamped["m"]) if map_shape is not None else None
        t_model = jnp.broadcast_to(schedule.model_time(t), (batch,))
        out = net(x_t, m_t, t_model)
        img, map0 = out if map_shape is not None else (out, None)
        alpha, sigma = schedule.marginal_alpha(t), schedule.marginal_std(t)
        x0 = to_data_prediction(
            img, x_t, bcast_like(alpha, x_t), bcast_like(sigma, x_t), image_prediction
        )
        preds = {"x": x0, "m": map0}
        return {k: preds[k] for k in state}

    known = {"x": (known_x, mask_x), "m": (known_m, mask_m)} if task == "inpaint" else {}
    known = {k: v for k, v in known.items() if v[0] is not None}

    def reimpose(state: dict[str, Array], t: Array) -> dict[str, Array]:
        alpha, sigma = schedule.marginal_alpha(t), schedule.marginal_std(t)
        out = dict(state)
        for k, (value, mask) in known.items():
            noised = alpha * value + sigma * noise[k]
            out[k] = jnp.where(mask > 0, noised, state[k])
        return out

    state = {k: noise[k] for k in solved}
    callback = None
    if known:
        state = reimpose(state, jnp.asarray(1.0, jnp.float32))
        callback = reimpose
    result = dpm_solver.sample(
        data_pred,
        state,
        schedule,
        steps=options.steps,
        order=options.order,
        method=options.method,
        skip_type=options.skip_type,
        lower_order_final=options.lower_order_final,
        step_callback=callback,
        rng=jax.random.fold_in(rng, 2),
        noise_scale={k: map_noise_std if k == "m" else 1.0 for k in state},
    )
    for k, (value, mask) in known.items():
        result[k] = jnp.where(mask > 0, value, result[k])
    for k in ("x", "m"):
        if k not in result and clamped[k] is not None:
            result[k] = clamped[k]
    return result
