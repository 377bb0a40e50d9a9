"""Train state, optimizer and sharded initialisation.

The state (params, optimizer state, EMA params, step, RNG) is one pytree, born sharded:
its shapes come from ``jax.eval_shape``, its shardings from the models' logical axes under
``pdm_jax.sharding.LOGICAL_AXIS_RULES`` (``state_shardings``), and the initialiser is
jitted with those ``out_shardings`` so full weights never sit on one device.
Frozen parameters (the two-stream image stream) are excluded from the optimizer: they get
``optax.set_to_zero`` and carry no Adam moments.
"""

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from pdm_jax import models, sharding
from pdm_jax.models.handle import handle
from pdm_jax.models.image_stream import image_stream_mask
from pdm_jax.models.spec import TWO_STREAM_NAMES
from pdm_jax.specs import RunSpec


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes."""

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: optax.OptState
    rng: jax.Array


LR_DECAYS = ("constant", "cosine", "wsd")


def learning_rate_schedule(config: RunSpec) -> optax.Schedule:
    """Linear warm-up from 0 over ``optim.warmup_steps``, then ``optim.decay``.

    ``constant`` is the official recipe. ``cosine`` anneals from the peak to
    ``optim.final_lr_fraction`` × peak at ``train.num_train_steps``. ``wsd``
    (warm-up, stable, decay; Hägele et al. 2024) holds the peak, then decays linearly to
    ``optim.final_lr_fraction`` × peak over the last ``optim.decay_fraction`` of the steps.

    Args:
      config: the run's spec (``optim``, and ``train.num_train_steps`` for ``cosine`` and
        ``wsd``).

    Returns:
      step → learning rate.
    """
    o = config.optim
    decay = o.decay
    peak, warmup = float(o.learning_rate), max(int(o.warmup_steps), 0)
    if decay == "constant":
        after = optax.constant_schedule(peak)
    elif decay == "cosine":
        span = max(int(config.train.num_train_steps) - warmup, 1)
        after = optax.cosine_decay_schedule(peak, span, alpha=float(o.final_lr_fraction))
    elif decay == "wsd":
        if not 0.0 < float(o.decay_fraction) <= 1.0:
            raise ValueError(
                f"optim.decay_fraction={o.decay_fraction} must lie in (0, 1]: the share of the "
                "steps over which optim.decay=wsd decays the learning rate."
            )
        steps = int(config.train.num_train_steps)
        tail = max(round(float(o.decay_fraction) * steps), 1)
        stable = max(steps - tail - warmup, 0)
        final = peak * float(o.final_lr_fraction)
        after = optax.join_schedules(
            [optax.constant_schedule(peak), optax.linear_schedule(peak, final, tail)], [stable]
        )
    else:
        raise ValueError(f"Unknown optim.decay {decay!r}; choose one of {LR_DECAYS}.")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def trainable_labels(config: RunSpec, params: Any) -> Any:
    """``"train"``/``"frozen"`` label per parameter leaf."""
    if config.ckpt.freeze_image_stream and config.model.name in TWO_STREAM_NAMES:
        frozen = image_stream_mask(params)
        return jax.tree.map(lambda f: "frozen" if f else "train", frozen)
    return jax.tree.map(lambda _: "train", params)


def make_optimizer(config: RunSpec, params: Any) -> optax.GradientTransformation:
    """AdamW (official hyperparameters) on trainable leaves, nothing on frozen ones."""
    o = config.optim
    chain = []
    if o.grad_clip_norm and o.grad_clip_norm > 0:
        chain.append(optax.clip_by_global_norm(o.grad_clip_norm))
    chain.append(
        optax.adamw(
            learning_rate=learning_rate_schedule(config),
            b1=o.b1,
            b2=o.b2,
            weight_decay=o.weight_decay,
        )
    )
    return optax.multi_transform(
        {"train": optax.chain(*chain), "frozen": optax.set_to_zero()},
        trainable_labels(config, params),
    )


def initial_ema(config: RunSpec, params: Any) -> Any:
    """The EMA parameters a fresh state starts from: a copy of each trainable parameter
    and, for a frozen one (never updated, so its EMA is itself), a scalar placeholder.

    Saves a full copy of the frozen image stream (3.44 GB for SD 1.x's UNet in
    ``unet_two_stream``); ``checkpointing.with_frozen_params`` gives the full tree back.
    A frozen scalar parameter keeps a real copy, so a placeholder is always told from a
    parameter by its shape.
    """
    labels = trainable_labels(config, params)

    def one(label: str, p: jax.Array) -> jax.Array:
        if label == "frozen" and p.ndim:
            return jnp.zeros((), p.dtype)
        return jnp.copy(p)

    return jax.tree.map(one, labels, params)


def init_train_state(
    config: RunSpec,
    rng: jax.Array,
    params: Any | None = None,
) -> TrainState:
    """Builds a fresh state (un-jitted; see ``create_train_state`` for the sharded one)."""
    init_rng, state_rng = jax.random.split(rng)
    if params is None:
        params = models.init_params(config.model, init_rng)
    tx = make_optimizer(config, params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=initial_ema(config, params),
        opt_state=tx.init(params),
        rng=state_rng,
    )


def state_shardings(config: RunSpec, mesh: Mesh, abstract_state: TrainState) -> TrainState:
    """Sharding of every state leaf, from the model's logical axes.

    Parameters, EMA parameters and the Adam moments of each parameter are laid out like
    that parameter (``ModelHandle.shardings``: FSDP over ``fsdp``, heads and MLP hidden over
    ``tensor``); step, RNG, optimizer counts and the scalar EMA placeholders of frozen
    parameters are replicated.

    Args:
      config: the run's spec (its model).
      mesh: the device mesh.
      abstract_state: the state's shapes (``jax.eval_shape`` of an initialiser).

    Returns:
      A ``TrainState`` of ``NamedSharding``s.
    """
    model = handle(config.model)
    return sharding.mirror_shardings(
        abstract_state, model.abstract_params, model.shardings(mesh), mesh
    )


def create_train_state(
    config: RunSpec,
    rng: jax.Array,
    mesh: Mesh,
    init_fn: Callable[[jax.Array], TrainState] | None = None,
) -> tuple[TrainState, TrainState]:
    """Creates the state directly in its sharded layout.

    Args:
      config: the run's spec.
      rng: PRNG key.
      mesh: device mesh.
      init_fn: ``rng -> TrainState`` (default ``init_train_state``), e.g. to start from
        pretrained parameters.

    Returns:
      ``(state, shardings)`` — the sharded state and the matching sharding pytree.
    """
    init_fn = init_fn or (lambda r: init_train_state(config, r))
    abstract = jax.eval_shape(init_fn, rng)
    shardings = state_shardings(config, mesh, abstract)
    state = jax.jit(init_fn, out_shardings=shardings)(rng)
    return state, shardings
