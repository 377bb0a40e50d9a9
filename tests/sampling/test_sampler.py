"""The sampler: x̂₀ clipping in every parametrisation, sharding, resident params, program cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.pdm import get_config
from pdm_jax import models, sharding, specs
from pdm_jax.data import pipeline
from pdm_jax.diffusion.schedules import discrete_sd_schedule
from pdm_jax.sampling import sampler as sampler_lib
from tests.sampling.known import inpaint_left_or_top_half, known_inputs

SCHED = discrete_sd_schedule()


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_clipped_denoiser_bounds_the_implied_data_prediction(prediction):
    rng = np.random.default_rng(0)
    x_t = jnp.asarray(rng.standard_normal((3, 4, 4, 3)), jnp.float32)
    t_model = jnp.asarray([100.0, 500.0, 900.0])
    x0 = jnp.asarray(rng.uniform(-4, 4, (3, 4, 4, 3)), jnp.float32)  # half outside ±2
    tc = (t_model / SCHED.num_timesteps)[:, None, None, None]
    alpha, sigma = SCHED.marginal_alpha(tc), SCHED.marginal_std(tc)
    eps = (x_t - alpha * x0) / sigma
    head = {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}[prediction]
    m0 = jnp.ones((3, 4, 4, 8))

    def net(params, x, m, t, c):
        return head, m0

    out, map0 = sampler_lib.clipped_denoiser(net, SCHED, 2.0, True, prediction)(
        None, x_t, m0, t_model, None
    )
    implied = {
        "eps": lambda o: (x_t - sigma * o) / alpha,
        "x0": lambda o: o,
        "v": lambda o: alpha * x_t - sigma * o,
    }[prediction](out)
    np.testing.assert_allclose(implied, np.clip(x0, -2.0, 2.0), atol=2e-4)
    np.testing.assert_array_equal(map0, m0)


def _tiny_sampler(mesh, batch_size, params=None, dtype="float32"):
    """A tiny demo PDM's sampler (2 solver steps) on ``mesh``, and its run spec."""
    config = get_config("demo,tiny=1")
    config.model.dtype = dtype
    config.data.update(num_workers=0, num_records=16)
    config.sampler.steps = 2
    run = specs.from_config(config)
    _, info = pipeline.create_source(run.data, "held_out")
    if params is None:
        params = models.init_params(run.model, jax.random.key(0))
    sampler = sampler_lib.Sampler(
        run.model, run.diffusion, run.sampler, info, params, mesh=mesh, batch_size=batch_size
    )
    return sampler, info


def test_samples_do_not_depend_on_batching_or_devices():
    # Each example is solved from key(seed): 5 captions on 8 devices (padded to 8) equal the
    # same captions one by one on a single device, bit for bit up to float rounding.
    eight = sharding.create_mesh((-1,), (sharding.DATA_AXIS,), jax.devices())
    one = sharding.create_mesh((1,), (sharding.DATA_AXIS,), jax.devices()[:1])
    sharded, info = _tiny_sampler(eight, batch_size=5)
    single, _ = _tiny_sampler(one, batch_size=2, params=jax.device_get(sharded.params))
    assert sharded.batch_size == 8 and single.batch_size == 2
    captions = list(info.eval_prompts)[:5]
    seeds = [3, 1, 4, 1, 5]
    a = sharded(seeds, captions=captions, task="cogenerate")
    b = single(seeds, captions=captions, task="cogenerate")
    assert a.latents.shape[0] == 5 and a.maps.shape[0] == 5 and a.images.dtype == np.uint8
    np.testing.assert_allclose(a.latents, b.latents, atol=1e-4)
    np.testing.assert_array_equal(a.maps, b.maps)
    # Seeds 1 and 1 give the same sample; 3 and 4 do not.
    np.testing.assert_array_equal(a.latents[1], a.latents[3])
    assert not np.allclose(a.latents[0], a.latents[2])
    # The parameters stay resident: placing them again is a no-op.
    before = sharded.params
    sharded.set_params(before)
    assert jax.tree.leaves(sharded.params)[0] is jax.tree.leaves(before)[0]
    assert jax.tree.leaves(before)[0].sharding.is_fully_replicated


def test_one_compiled_program_per_spec():
    mesh = sharding.create_mesh((-1,), (sharding.DATA_AXIS,), jax.devices())
    sampler, info = _tiny_sampler(mesh, batch_size=8)
    other, _ = _tiny_sampler(mesh, batch_size=8, params=jax.device_get(sampler.params))
    spec = lambda s, task, known: sampler_lib.ProgramSpec(
        s.model, s.diffusion, s.sampler, task, s.valid_ids, s.mesh, known
    )
    none = (False,) * 4
    # Two samplers of the same run share one program; another task is another program.
    assert sampler_lib.program(spec(sampler, "cogenerate", none)) is sampler_lib.program(
        spec(other, "cogenerate", none)
    )
    given = (False, True, False, False)
    assert sampler_lib.program(spec(sampler, "given_map", given)) is not sampler_lib.program(
        spec(sampler, "cogenerate", none)
    )
    with pytest.raises(ValueError, match=r"sampler\.task='paint' is not a sampling task"):
        sampler([0], captions=["x"], task="paint")
    with pytest.raises(ValueError, match="either captions or contexts"):
        sampler([0], task="cogenerate")
    # Given-map sampling keeps the map it was given.
    ref = np.asarray(info.encode_text(["a"]))  # any context
    ids = np.full((1, sampler.map_side, sampler.map_side), sorted(info.category_names)[1])
    out = sampler([0], contexts=ref, task="given_map", known_maps=ids)
    np.testing.assert_array_equal(out.maps, ids)


def test_samples_on_a_data_fsdp_mesh_equal_one_device():
    # (data 4, fsdp 2): parameters split over fsdp (resident, not replicated), examples
    # over data × fsdp; the one-device program is the one the test above compiled.
    mesh = sharding.create_mesh((4, 2, 1), sharding.MESH_AXES, jax.devices())
    one = sharding.create_mesh((1,), (sharding.DATA_AXIS,), jax.devices()[:1])
    sharded, info = _tiny_sampler(mesh, batch_size=5)
    single, _ = _tiny_sampler(one, batch_size=2, params=jax.device_get(sharded.params))
    assert sharded.batch_size == 8
    qkv = sharded.params["in_blocks_0"]["attn"]["qkv"]["kernel"]  # [D, 3, H, Dh]
    assert tuple(qkv.sharding.spec) == ("fsdp",) and qkv.sharding.mesh == mesh
    assert qkv.addressable_shards[0].data.shape == (qkv.shape[0] // 2, *qkv.shape[1:])
    captions = list(info.eval_prompts)[:5]
    seeds = [3, 1, 4, 1, 5]
    a = sharded(seeds, captions=captions, task="cogenerate")
    b = single(seeds, captions=captions, task="cogenerate")
    np.testing.assert_allclose(a.latents, b.latents, atol=1e-4)
    np.testing.assert_array_equal(a.maps, b.maps)


@pytest.mark.slow
def test_bfloat16_model_keeps_known_regions_exact():
    # The network computes in bfloat16; the solver's state, the re-imposed known parts and
    # the outputs stay float32, so the given parts come back bit for bit.
    mesh = sharding.create_mesh((-1,), (sharding.DATA_AXIS,), jax.devices())
    sampler, info = _tiny_sampler(mesh, batch_size=8, dtype="bfloat16")
    contexts, latents, ids = known_inputs(sampler, info)
    given = sampler([0, 1], contexts=contexts, task="given_map", known_maps=ids)
    np.testing.assert_array_equal(given.maps, ids)
    assert given.latents.dtype == np.float32 and np.isfinite(given.latents).all()
    out = inpaint_left_or_top_half(sampler, contexts, latents, ids)
    assert out.latents.dtype == np.float32


def test_host_slices_partition_the_indices():
    for n, p in ((0, 3), (5, 8), (30_000, 7), (12, 1)):
        slices = [sampler_lib.host_indices(n, i, p) for i in range(p)]
        assert [i for s in slices for i in s] == list(range(n))
        assert max(map(len, slices)) - min(map(len, slices)) <= 1
