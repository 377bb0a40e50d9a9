"""The training step: one pure function, jitted once with the state donated.

Batches arrive in one schema (see ``pdm_jax.data``): ``latent`` ``[B, S, S, C]`` (sampled
and scaled), ``map`` ``[B, fS, fS]`` int32 category ids at the model's map resolution (absent
for the plain U-ViT), ``context`` ``[B, T, D]``. Randomness comes from
``fold_in(state.rng, step)`` so a resumed run draws exactly the same numbers.
"""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from pdm_jax import models, sharding
from pdm_jax.diffusion import analog_bits, losses
from pdm_jax.diffusion.schedules import VPSchedule
from pdm_jax.models.spec import ModelSpec
from pdm_jax.specs import RunSpec
from pdm_jax.train.state import TrainState, learning_rate_schedule, make_optimizer, trainable_labels


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    denoise_fn: Callable,
    tx: optax.GradientTransformation,
    schedule: VPSchedule,
    empty_context: jax.Array,
    config: RunSpec,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on the joint loss.

    Args:
      state: the train state (donated when jitted).
      batch: one global batch in the common schema.
      denoise_fn, tx, schedule, empty_context, config: bound with ``functools.partial``.

    Returns:
      The new state and scalar metrics (losses, norms, learning rate).
    """
    d = config.diffusion
    rng = jax.random.fold_in(state.rng, state.step)
    m_0 = None
    if "map" in batch:
        m_0 = analog_bits.ids_to_bits(batch["map"], config.model.num_bits, batch["latent"].dtype)

    labels = trainable_labels(config, state.params)

    def loss_fn(params):
        # Frozen leaves are constants to autodiff: XLA then skips their weight gradients
        # (a third of the frozen stream's backward pass) instead of computing and dropping them.
        params = jax.tree.map(
            lambda p, label: jax.lax.stop_gradient(p) if label == "frozen" else p, params, labels
        )
        terms = losses.pdm_loss_terms(
            denoise_fn,
            params,
            rng,
            batch["latent"],
            m_0,
            batch["context"],
            empty_context,
            schedule,
            map_noise_std=d.map_noise_std,
            map_loss_weight=d.map_loss_weight,
            p_uncond=d.p_uncond,
            use_given_map=config.model.use_given_map,
            image_prediction=d.image_prediction,
            given_map_prob=d.given_map_prob,
            given_image_prob=d.given_image_prob,
            min_snr_gamma=d.min_snr_gamma,
        )
        means = {k: jnp.mean(v) for k, v in terms.items()}
        return means["loss"], means

    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = config.optim.ema_decay
    # A frozen parameter's EMA is a placeholder of another shape (state.initial_ema): kept.
    ema_params = jax.tree.map(
        lambda e, p: decay * e + (1 - decay) * p if e.shape == p.shape else e,
        state.ema_params,
        params,
    )
    metrics = dict(
        metrics,
        grad_norm=optax.global_norm(grads),
        param_norm=optax.global_norm(params),
        update_norm=optax.global_norm(updates),
        learning_rate=learning_rate_schedule(config)(state.step),
    )
    new_state = state.replace(
        step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state
    )
    return new_state, metrics


# XLA:CPU runs its barrier expander before a late CSE pass, which merges the backward
# pass's recomputation into the forward pass and silently undoes ``jax.checkpoint`` (a
# two-stream step at batch 8 keeps ~10 GB of temporaries with or without remat). Keeping
# the optimization barriers lets remat work on CPU; GPU and TPU handle them themselves.
CPU_REMAT_OPTIONS = {"xla_disable_hlo_passes": "cse_barrier_expander"}


def compiler_options(model_cfg: ModelSpec, mesh: Mesh) -> dict[str, str] | None:
    """XLA options for a differentiated program of this model on this mesh.

    Args:
      model_cfg: ``config.model`` (its ``remat_policy`` decides).
      mesh: the devices the program runs on.

    Returns:
      ``CPU_REMAT_OPTIONS`` for rematerialised models on CPU, else ``None``.
    """
    if model_cfg.remat_policy != "none" and mesh.devices.flat[0].platform == "cpu":
        return dict(CPU_REMAT_OPTIONS)
    return None


def jit_train_step(
    config: RunSpec,
    mesh: Mesh,
    state_shardings: TrainState,
    params: Any,
    empty_context: jax.Array,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """Binds and jits ``train_step`` once: state donated, batch over ``data`` × ``fsdp``.

    Args:
      config: the run's spec.
      mesh: the device mesh.
      state_shardings: the state's shardings (``state.state_shardings``), in and out.
      params: the parameters (for the optimizer's frozen/trainable labels).
      empty_context: the unconditional text context ``[T, D]``.

    Returns:
      ``(state, batch) -> (state, metrics)``, a ``sharding.MeshProgram`` (it has ``lower``).
    """
    step_fn = functools.partial(
        train_step,
        denoise_fn=models.denoise_fn(config.model),
        tx=make_optimizer(config, params),
        schedule=config.diffusion.schedule(),
        empty_context=jnp.asarray(empty_context),
        config=config,
    )
    jitted = jax.jit(
        step_fn,
        in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
        compiler_options=compiler_options(config.model, mesh),
    )
    # Traced inside the mesh and the logical-axis rules: the models' activation
    # constraints become real sharding constraints.
    return sharding.MeshProgram(jitted, mesh)
