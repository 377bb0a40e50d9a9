"""Test helper: tiny models trained one step on several meshes, each program compiled once.

The tests of sharded training (``test_state_step``, ``test_init``) share these cached
states and compiled steps; compiling dominates their time on a 2-core machine.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import pdm as pdm_configs
from pdm_jax import sharding, specs
from pdm_jax.train import state as state_lib
from pdm_jax.train import step as step_lib
from tests.models import small_unet

# data × fsdp × tensor on the 8 fake CPU devices of the tests.
MESHES = ((8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2))
ONE_DEVICE = (1, 1, 1)


def config(name: str) -> ml_collections.ConfigDict:
    """The tiny ``name`` config (width 32, 2 heads: every mesh axis above divides them; the
    UNets: the two-level tiny UNet, widths 16 and 32, 4 heads)."""
    c = pdm_configs.get_config(f"{name},tiny=1")
    if name.startswith("unet"):
        small_unet.use_two_level_unet(c)
    c.optim.learning_rate = 1e-3  # tolerances are stated in units of this step size
    c.model.remat_policy = "none"  # remat does not change the numbers, only compile time
    c.ckpt.allow_random_frozen_stream = True  # two_stream from scratch, on purpose
    return c


def mesh(shape: tuple[int, ...]) -> jax.sharding.Mesh:
    """The ``(data, fsdp, tensor)`` mesh of ``shape`` on the first devices."""
    return sharding.create_mesh(shape, sharding.MESH_AXES, jax.devices()[: int(np.prod(shape))])


@functools.cache
def batch(name: str) -> dict[str, np.ndarray]:
    """A fixed global batch of 8 examples in the training schema."""
    m = config(name).model
    rng = np.random.default_rng(0)
    side = m.img_size * m.map_patch_factor
    return {
        "latent": rng.standard_normal((8, m.img_size, m.img_size, m.in_chans)).astype(np.float32),
        "map": rng.integers(0, 201, (8, side, side)).astype(np.int32),
        "context": rng.standard_normal((8, m.num_clip_token, m.clip_dim)).astype(np.float32),
    }


@functools.cache
def initial(name: str) -> state_lib.TrainState:
    """The initial state, built once on one device (copied onto each mesh by ``place``).

    The UNets' parameters are drawn on the host (``small_unet.random_params``: random weights, zero
    couplings as at initialisation): compiling their initialiser takes a minute on a
    2-core CPU, and what the tests check of them (mesh independence, the frozen image
    stream) holds from any start. ``create_train_state`` of a UNet runs in
    tests/test_main_unet.py.
    """
    spec = specs.from_config(config(name))
    if name.startswith("unet"):
        params = jax.tree.map(jnp.asarray, small_unet.random_params(spec.model, 0))
        return state_lib.init_train_state(spec, jax.random.key(0), params=params)
    state, _ = state_lib.create_train_state(spec, jax.random.key(0), mesh(ONE_DEVICE))
    return state


@functools.cache
def program(name: str, shape: tuple[int, ...]):
    """``(mesh, state shardings, jitted step)`` of ``name`` on ``shape``, compiled once."""
    spec = specs.from_config(config(name))
    m = mesh(shape)
    abstract = jax.eval_shape(lambda: initial(name))
    shardings = state_lib.state_shardings(spec, m, abstract)
    empty = np.zeros((spec.model.num_clip_token, spec.model.clip_dim), np.float32)
    return m, shardings, step_lib.jit_train_step(spec, m, shardings, initial(name).params, empty)


def place(state: state_lib.TrainState, name: str, shape: tuple[int, ...]):
    """A copy of ``state`` laid out on ``shape``'s mesh (steps donate their input)."""
    _, shardings, _ = program(name, shape)
    return jax.device_put(jax.tree.map(jnp.copy, state), shardings)


def run_step(state: state_lib.TrainState, name: str, shape: tuple[int, ...]):
    """One step of ``state`` (placed on ``shape``'s mesh first) on the fixed batch."""
    m, _, step_fn = program(name, shape)
    return step_fn(place(state, name, shape), sharding.shard_batch(batch(name), m))


@functools.cache
def first_step(name: str, shape: tuple[int, ...]):
    """``(state after one step, host metrics)`` from the initial state on ``shape``."""
    state, metrics = run_step(initial(name), name, shape)
    return state, jax.device_get(metrics)


def bytes_per_device(tree) -> int:
    """Bytes of ``tree``'s arrays held by the first device."""
    device = jax.devices()[0]
    total = 0
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            if shard.device == device:
                data = shard.data
                if jax.dtypes.issubdtype(data.dtype, jax.dtypes.prng_key):
                    data = jax.random.key_data(data)
                total += data.nbytes
    return total
