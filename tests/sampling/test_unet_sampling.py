"""Every sampling task through the ``Sampler`` on the tiny one- and two-stream UNet PDMs
(the two-level tiny UNet: the tasks do not depend on the UNet's depth)."""

import jax
import numpy as np
import pytest

from configs.pdm import get_config
from pdm_jax import sharding, specs
from pdm_jax.data import pipeline
from pdm_jax.sampling import sampler as sampler_lib
from tests.models import small_unet
from tests.sampling.known import inpaint_left_or_top_half, known_inputs


@pytest.mark.slow
@pytest.mark.parametrize("name", ["unet_one_stream", "unet_two_stream"])
def test_every_task_on_a_unet_pdm_keeps_what_it_is_given(name):
    config = small_unet.use_two_level_unet(get_config(f"{name},tiny=1"))
    config.data.update(source="synthetic", num_workers=0, num_records=16)
    config.sampler.update(steps=2, order=2)
    run = specs.from_config(config)
    _, info = pipeline.create_source(run.data, "held_out")
    mesh = sharding.create_mesh((1,), (sharding.DATA_AXIS,), jax.devices()[:1])
    sampler = sampler_lib.Sampler(
        run.model,
        run.diffusion,
        run.sampler,
        info,
        small_unet.random_params(run.model, 0),
        mesh=mesh,
        batch_size=2,
    )
    side, mside, chans = run.model.img_size, sampler.map_side, run.model.in_chans
    assert mside == run.model.map_patch_factor * side
    contexts, latents, ids = known_inputs(sampler, info)

    co = sampler([0, 1], contexts=contexts, task="cogenerate")
    assert co.latents.shape == (2, side, side, chans) and co.maps.shape == (2, mside, mside)
    assert np.isfinite(co.latents).all() and set(np.unique(co.maps)) <= set(info.category_names)
    assert not np.allclose(co.latents[0], co.latents[1])

    given_map = sampler([0, 1], contexts=contexts, task="given_map", known_maps=ids)
    np.testing.assert_array_equal(given_map.maps, ids)
    assert np.isfinite(given_map.latents).all()

    given_image = sampler([0, 1], contexts=contexts, task="given_image", known_latents=latents)
    np.testing.assert_array_equal(given_image.latents, latents)
    assert given_image.maps.shape == (2, mside, mside)

    inpaint_left_or_top_half(sampler, contexts, latents, ids)
