"""Test helper: small configs and step-0 checkpoints for the checkpointing tests."""

import jax
import ml_collections
import numpy as np

from configs import pdm as pdm_configs
from pdm_jax import models, sharding, specs
from pdm_jax.train import state as state_lib
from tests.train import saved_states


def config(arg: str = "demo,tiny=1", steps: int = 2) -> ml_collections.ConfigDict:
    """A tiny run's config: in-process data, a log line every step, a save every 2 steps."""
    c = pdm_configs.get_config(arg)
    c.data.update(num_workers=0, num_threads=1, prefetch=8, num_records=256)
    c.train.update(
        num_train_steps=steps, log_every_steps=1, eval_every_steps=0, checkpoint_every_steps=2
    )
    return c


def params_only_state(config: ml_collections.ConfigDict, seed: int = 0) -> state_lib.TrainState:
    """A state with random host parameters and no optimizer state: nothing to compile."""
    rng = np.random.default_rng(seed)
    random_tree = lambda: jax.tree.map(
        lambda a: rng.standard_normal(a.shape).astype(a.dtype),
        models.abstract_params(config.model),
    )
    return saved_states.params_only_state(random_tree(), random_tree())


def saved_fresh_state(
    config: ml_collections.ConfigDict, workdir, params_only: bool = False
) -> state_lib.TrainState:
    """Saves a step-0 state without training (a real one, or ``params_only_state``)."""
    if params_only:
        state = params_only_state(config)
    else:
        mesh = sharding.create_mesh()
        state, _ = state_lib.create_train_state(
            specs.from_config(config), jax.random.key(config.seed), mesh
        )
    saved_states.save_state(workdir, state, config)
    return state
