"""Where training starts: a checkpoint saved on one mesh resumes exactly on another."""

import jax
import numpy as np
import pytest

from pdm_jax import checkpointing, specs
from pdm_jax.train import init as init_lib
from tests.train import meshes


@pytest.mark.slow
def test_a_checkpoint_saved_on_one_mesh_resumes_exactly_on_others(tmp_path):
    name = "one_stream"
    config = meshes.config(name)
    saved, _ = meshes.first_step(name, (1, 8, 1))  # FSDP over 8 devices
    manager = checkpointing.create_manager(checkpointing.checkpoint_dir(tmp_path))
    checkpointing.save(manager, saved, config=config.to_dict())
    manager.wait_until_finished()
    want = jax.device_get(saved)
    # The uninterrupted run's second step.
    _, uninterrupted = meshes.run_step(saved, name, (1, 8, 1))
    for shape in ((2, 2, 2), meshes.ONE_DEVICE):
        mesh, shardings, _ = meshes.program(name, shape)
        state, got_shardings, origin = init_lib.restore_or_initialize(
            specs.from_config(config), tmp_path, mesh, manager
        )
        assert origin.startswith("resumed")
        assert jax.tree.leaves(got_shardings) == jax.tree.leaves(shardings)
        for leaf, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(shardings), strict=True):
            assert leaf.sharding == sharding
        # Parameters, EMA, Adam moments and step: bit for bit.
        got = jax.device_get(state)
        assert int(got.step) == int(want.step) == 1
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
                a, b = jax.random.key_data(a), jax.random.key_data(b)
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        # Training continues as if uninterrupted (another mesh: float32 summation order).
        _, metrics = meshes.run_step(state, name, shape)
        np.testing.assert_allclose(
            float(metrics["loss"]), float(uninterrupted["loss"]), rtol=2e-5, err_msg=str(shape)
        )
