"""Tests of the sharded train state and the jitted train step (tiny models, CPU mesh)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import pdm as pdm_configs
from pdm_jax import checkpointing, models, sharding, specs
from pdm_jax.data import pipeline
from pdm_jax.diffusion import analog_bits, losses
from pdm_jax.train import state as state_lib
from pdm_jax.train import step as step_lib
from tests.train import meshes


def _config(arg="demo,tiny=1"):
    c = pdm_configs.get_config(arg)
    c.data.update(num_workers=0, num_threads=1, prefetch=8, num_records=64)
    c.optim.learning_rate = 1e-3  # tolerances below are stated in units of this step size
    return c


@functools.cache
def _host_batch(arg="demo,tiny=1"):
    """8 synthetic-world examples in the training schema (the same for every call)."""
    config = _config(arg)
    source, info = pipeline.create_source(specs.from_config(config).data)
    batch = next(
        iter(
            pipeline.create_loader(
                source,
                specs.from_config(config).data,
                batch_size=config.train.batch_size,
                shuffle=False,
            )
        )
    )
    return batch, info.empty_context


@functools.cache
def _initial(devices=8):
    """(config, mesh, state, shardings) of the tiny demo model; initialised once per mesh."""
    config = _config()
    mesh = sharding.create_mesh((devices,), ("data",), devices=jax.devices()[:devices])
    state, shardings = state_lib.create_train_state(
        specs.from_config(config), jax.random.key(0), mesh
    )
    return config, mesh, state, shardings


def _setup(config=None, devices=8):
    """A fresh copy of the initial state (steps donate it), a jitted step and the batch."""
    default, mesh, state, shardings = _initial(devices)
    config = config or default
    batch, empty = _host_batch()
    step_fn = step_lib.jit_train_step(
        specs.from_config(config), mesh, shardings, state.params, empty
    )
    return jax.tree.map(jnp.copy, state), step_fn, sharding.shard_batch(batch, mesh)


def test_state_is_born_sharded_on_the_data_mesh():
    _, mesh, state, _ = _initial()
    assert mesh.shape == {"data": 8}
    for leaf in jax.tree.leaves(state):
        assert leaf.sharding.mesh.shape == mesh.shape and leaf.sharding.is_fully_replicated
    batch = sharding.shard_batch(_host_batch()[0], mesh)
    assert batch["latent"].sharding.spec[0] == "data"
    assert len(batch["latent"].addressable_shards) == 8


@pytest.mark.slow
def test_eight_devices_give_the_same_loss_and_update_as_one():
    results = []
    for devices in (1, 8):
        state, step_fn, batch = _setup(devices=devices)
        new_state, metrics = step_fn(state, batch)
        results.append((jax.device_get(metrics), jax.device_get(new_state.params)))
    (m1, p1), (m8, p8) = results
    for key in ("loss", "image_loss", "map_loss", "grad_norm"):
        np.testing.assert_allclose(m8[key], m1[key], rtol=2e-5, err_msg=key)
    # Adam's first step is ±lr·g/(|g| + eps) per element (lr = 1e-3 here), so a float32
    # reduction-order difference in a near-zero gradient moves that element by up to ~1e-6;
    # 5e-6 is 0.5% of one step, far below any real sharding bug (a whole step, 1e-3).
    chex.assert_trees_all_close(p8, p1, rtol=1e-5, atol=5e-6)


def test_train_step_traces_once(monkeypatch):
    monkeypatch.setattr(step_lib, "train_step", chex.assert_max_traces(step_lib.train_step, n=1))
    state, step_fn, batch = _setup()
    for k in range(3):
        perturbed = dict(batch, latent=batch["latent"] + 0.01 * k)
        state, _ = step_fn(state, perturbed)
    assert int(state.step) == 3


def _fixed_loss(config, params, batch, empty):
    """The loss on ``batch`` with fixed noise, steps and dropout (comparable across params)."""
    terms = losses.pdm_loss_terms(
        models.denoise_fn(config.model),
        params,
        jax.random.key(123),
        batch["latent"],
        analog_bits.ids_to_bits(batch["map"]),
        batch["context"],
        jnp.asarray(empty),
        specs.from_config(config).diffusion.schedule(),
        map_noise_std=config.diffusion.map_noise_std,
        p_uncond=0.0,
    )
    return float(jnp.mean(terms["loss"]))


def test_fifty_steps_on_a_fixed_batch_reduce_the_loss():
    config = _config()
    state, step_fn, batch = _setup()
    _, empty = _host_batch()
    before = _fixed_loss(config, jax.device_get(state.params), _host_batch()[0], empty)
    for _ in range(50):
        state, metrics = step_fn(state, batch)
    after = _fixed_loss(config, jax.device_get(state.params), _host_batch()[0], empty)
    assert np.isfinite(float(metrics["loss"]))
    assert after < 0.75 * before, (before, after)


def test_frozen_image_stream_gets_no_update_map_stream_does():
    config = _config("two_stream,tiny=1")
    assert config.ckpt.freeze_image_stream and config.model.name == "two_stream"
    config.model.update(in_chans=3, clip_dim=16, num_clip_token=4, map_patch_factor=1)
    mesh = sharding.create_mesh()
    state, shardings = state_lib.create_train_state(
        specs.from_config(config), jax.random.key(0), mesh
    )
    batch, empty = _host_batch()
    step_fn = step_lib.jit_train_step(
        specs.from_config(config), mesh, shardings, state.params, empty
    )
    before = jax.device_get(state.params)
    state, _ = step_fn(state, sharding.shard_batch(batch, mesh))
    after = jax.device_get(state.params)
    mask = models.image_stream_mask(before)
    flat = lambda t: traverse_util.flatten_dict(t, sep="/")
    changed = {k: not np.array_equal(flat(before)[k], v) for k, v in flat(after).items()}
    frozen = flat(mask)
    image_keys = [k for k in changed if frozen[k]]
    map_keys = [k for k in changed if not frozen[k]]
    assert image_keys and map_keys
    assert not any(changed[k] for k in image_keys), [k for k in image_keys if changed[k]]
    # The zero-initialised projections that feed the image stream learn from step one.
    used_zero_convs = [k for k in map_keys if k.startswith("zero_convs_") and k.endswith("kernel")]
    used_zero_convs = [k for k in used_zero_convs if int(k.split("/")[0].split("_")[-1]) % 2]
    assert used_zero_convs and all(changed[k] for k in used_zero_convs)
    assert all(np.all(flat(before)[k] == 0) for k in used_zero_convs)
    map_blocks = [k for k in map_keys if "zero_convs" not in k and "mask_embed_0" not in k]
    assert sum(changed[k] for k in map_blocks) > 0.9 * len(map_blocks)
    # Frozen leaves carry no Adam moments.
    assert len(jax.tree.leaves(state.opt_state)) < 2 * len(jax.tree.leaves(state.params)) + 4
    # ... and no EMA copy: a scalar placeholder, kept through the step; the trainable
    # leaves' EMA moved. with_frozen_params gives the full tree back.
    ema = flat(jax.device_get(state.ema_params))
    assert all(ema[k].shape == () for k in image_keys if flat(before)[k].ndim)
    assert all(ema[k].shape == flat(after)[k].shape for k in map_keys)
    decay = config.optim.ema_decay
    for k in map_keys:
        np.testing.assert_allclose(
            ema[k], decay * flat(before)[k] + (1 - decay) * flat(after)[k], rtol=1e-6, atol=1e-7
        )
    full = flat(checkpointing.with_frozen_params(state.ema_params, state.params))
    assert all(np.array_equal(full[k], flat(after)[k]) for k in image_keys)
    assert all(np.array_equal(full[k], ema[k]) for k in map_keys)
    placeholders = [leaf for leaf in jax.tree.leaves(state.ema_params) if leaf.shape == ()]
    assert placeholders and all(leaf.sharding.is_fully_replicated for leaf in placeholders)


def test_ema_follows_the_params():
    decay = 0.5
    config = _config()
    config.optim.ema_decay = decay
    state, step_fn, batch = _setup(config)
    p0 = jax.device_get(state.params)
    state, _ = step_fn(state, batch)
    p1, ema = jax.device_get(state.params), jax.device_get(state.ema_params)
    chex.assert_trees_all_close(
        ema, jax.tree.map(lambda a, b: decay * a + (1 - decay) * b, p0, p1), rtol=1e-6
    )


def test_remat_takes_effect_on_cpu():
    """With ``compiler_options``, XLA:CPU keeps remat's recomputation (less temp memory)."""
    mesh = sharding.create_mesh((1,), ("data",), devices=jax.devices()[:1])
    temps = {}
    for policy in ("none", "full"):
        config = _config("two_stream,tiny=1")
        config.model.remat_policy = policy
        options = step_lib.compiler_options(config.model, mesh)
        assert (options is None) == (policy == "none")
        denoise = models.denoise_fn(config.model)
        m = config.model
        x = jnp.zeros((8, m.img_size, m.img_size, m.in_chans))
        side = m.img_size * m.map_patch_factor
        mt = jnp.zeros((8, side, side, m.num_bits))
        t = jnp.full((8,), 10.0)
        ctx = jnp.zeros((8, m.num_clip_token, m.clip_dim))

        def loss(p, x=x, mt=mt, t=t, ctx=ctx, denoise=denoise):
            eps, map0 = denoise(p, x, mt, t, ctx)
            return jnp.sum(eps**2) + jnp.sum(map0**2)

        params = models.abstract_params(config.model)
        compiled = jax.jit(jax.grad(loss), compiler_options=options).lower(params).compile()
        temps[policy] = compiled.memory_analysis().temp_size_in_bytes
    assert temps["full"] < 0.7 * temps["none"], temps


def test_learning_rate_schedules():
    c = _config()
    c.optim.update(learning_rate=1e-3, warmup_steps=10)
    c.train.num_train_steps = 110
    constant = state_lib.learning_rate_schedule(specs.from_config(c))
    np.testing.assert_allclose(
        [constant(s) for s in (0, 5, 10, 60, 110)], [0, 5e-4, 1e-3, 1e-3, 1e-3]
    )
    c.optim.update(decay="cosine", final_lr_fraction=0.1)
    cosine = state_lib.learning_rate_schedule(specs.from_config(c))
    # Warm-up, then 1e-3 · (0.1 + 0.9 · (1 + cos(π · (s − 10) / 100)) / 2).
    want = [
        1e-3 * (0.1 + 0.9 * (1 + np.cos(np.pi * (s - 10) / 100)) / 2) for s in (10, 35, 60, 110)
    ]
    np.testing.assert_allclose([cosine(s) for s in (5, 10, 35, 60, 110)], [5e-4, *want], rtol=1e-6)
    c.optim.update(decay="wsd", final_lr_fraction=0.0, decay_fraction=0.2)
    wsd = state_lib.learning_rate_schedule(specs.from_config(c))
    # Warm-up to step 10, the peak until step 110 − 0.2 · 110 = 88, then linear to 0 at 110.
    np.testing.assert_allclose(
        [wsd(s) for s in (5, 10, 60, 88, 99, 110, 120)],
        [5e-4, 1e-3, 1e-3, 1e-3, 5e-4, 0.0, 0.0],
        rtol=1e-6,
        atol=1e-12,
    )
    c.optim.decay_fraction = 0.0
    with pytest.raises(ValueError, match=r"optim\.decay_fraction=0\.0 must lie in"):
        state_lib.learning_rate_schedule(specs.from_config(c))
    c.optim.decay = "linear"
    with pytest.raises(ValueError, match=r"optim\.decay"):
        state_lib.learning_rate_schedule(specs.from_config(c))


# Sharded training: one step on every (data, fsdp, tensor) mesh (tests/train/meshes.py).


@pytest.mark.slow
@pytest.mark.parametrize("name", ["one_stream", "two_stream"])
def test_one_step_is_the_same_on_every_mesh(name):
    _, ref = meshes.first_step(name, meshes.MESHES[0])
    ref_params = jax.device_get(meshes.first_step(name, meshes.MESHES[0])[0].params)
    for shape in meshes.MESHES[1:]:
        state, metrics = meshes.first_step(name, shape)
        for key in ("loss", "image_loss", "map_loss", "grad_norm"):
            np.testing.assert_allclose(metrics[key], ref[key], rtol=2e-5, err_msg=f"{shape} {key}")
        # The meshes sum the same gradients in other orders (float32 rounding, ~1e-7
        # relative). Adam's first step is ±lr·g/(|g| + eps) per element (lr = 1e-3), so a
        # rounding difference in a near-zero gradient moves that element by up to ~1e-6;
        # 5e-6 is 0.5% of one step, far below a sharding bug (a whole step, 1e-3).
        chex.assert_trees_all_close(jax.device_get(state.params), ref_params, rtol=1e-5, atol=5e-6)


@pytest.mark.slow
def test_fsdp_splits_the_state_and_tensor_parallelism_splits_heads_and_hidden():
    name = "one_stream"
    replicated = meshes.bytes_per_device(meshes.initial(name))  # the whole state, 1 device
    fsdp_state, _ = meshes.first_step(name, (1, 8, 1))
    # Width 32, MLP 128, 2 heads of 16: every large tensor divides by 8; what stays whole
    # (final 3×3 convs of 4 and 8 channels, the step, the RNG) is ~1% of the state.
    assert meshes.bytes_per_device(fsdp_state) <= replicated / 6
    state, _ = meshes.first_step(name, (1, 4, 2))
    flat = traverse_util.flatten_dict(state.params, sep="/")
    mu = {
        "/".join(sharding.trailing_dict_keys(path)): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
        if any(getattr(k, "name", None) == "mu" for k in path)
    }
    want = {
        "attn/qkv/kernel": ("fsdp", None, "tensor"),  # [D, 3, H, Dh]: heads over tensor
        "attn/proj/kernel": ("tensor", None, "fsdp"),  # [H, Dh, D]
        "mlp/fc1/kernel": ("fsdp", "tensor"),  # [D, hidden]: hidden over tensor
        "mlp/fc2/kernel": ("tensor", "fsdp"),  # [hidden, D]
    }
    for block in ("in_blocks_0", "mid_block", "out_blocks_0"):
        for leaf, spec in want.items():
            key = f"{block}/{leaf}"
            assert tuple(flat[key].sharding.spec) == spec, (key, flat[key].sharding.spec)
            assert flat[key].sharding.mesh.shape == {"data": 1, "fsdp": 4, "tensor": 2}
            assert mu[key].sharding == flat[key].sharding, key  # Adam moments alike
    ema = traverse_util.flatten_dict(state.ema_params, sep="/")
    assert ema["mid_block/attn/qkv/kernel"].sharding == flat["mid_block/attn/qkv/kernel"].sharding


@pytest.mark.slow
def test_bfloat16_compute_trains_with_float32_state():
    config = _config()
    config.model.dtype = "bfloat16"  # compute; param_dtype stays float32
    _, _, initial, _ = _initial()
    state, step_fn, batch = _setup(config)
    _, f32_step, _ = _setup()
    _, f32_metrics = f32_step(jax.tree.map(jnp.copy, initial), batch)
    state, metrics = step_fn(state, batch)
    # Parameters, EMA, Adam's moments and the update stay float32; so do loss and norms.
    for leaf in jax.tree.leaves((state.params, state.ema_params, state.opt_state)):
        assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
    assert all(v.dtype == jnp.float32 for v in metrics.values())
    # The loss is E|ε̂ − ε|² ≈ E|ε|² + E|ε̂|² − 2E⟨ε̂, ε⟩ with ε ~ N(0, 1) drawn in float32 and
    # a freshly initialised model's ε̂ small: bfloat16's rounding of ε̂ (8 significant
    # bits, ~0.4% relative after a few rounded stages) moves it by ~1e-5 relative (measured
    # 1.4e-5 loss, 5e-5 map loss). 1e-3 leaves ×20 margin and still catches a loss or its
    # mean kept in bfloat16 (spacing 2⁻⁷ ≈ 0.8% at 1.57). The gradient norm sees the
    # rounding directly (measured 0.3%): 2%.
    for key in ("loss", "image_loss", "map_loss"):
        np.testing.assert_allclose(metrics[key], f32_metrics[key], rtol=1e-3, err_msg=key)
    np.testing.assert_allclose(metrics["grad_norm"], f32_metrics["grad_norm"], rtol=2e-2)
    _, empty = _host_batch()
    before = _fixed_loss(config, jax.device_get(initial.params), _host_batch()[0], empty)
    for _ in range(49):
        state, metrics = step_fn(state, batch)
    after = _fixed_loss(config, jax.device_get(state.params), _host_batch()[0], empty)
    assert np.isfinite(float(metrics["loss"]))
    assert after < 0.75 * before, (before, after)
