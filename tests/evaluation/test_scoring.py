"""The synthetic world's oracle figures: thing IoU sees misplaced things that agreement hides."""

import numpy as np

from configs import pdm as pdm_configs
from pdm_jax import specs
from pdm_jax.data.synthetic import dataset as synthetic
from pdm_jax.data.synthetic import world as world_lib
from pdm_jax.evaluation import scoring


def test_thing_iou_of_renders_and_of_maps_with_their_things_moved():
    world = synthetic.synthetic_world(specs.from_config(pdm_configs.get_config("demo")).data)
    ref = world.held_out_prompts(16)
    captions, maps = list(ref["caption"]), np.asarray(ref["map"])
    renders = world.autoencoder.decode(ref["latent"])
    clean = scoring.synthetic_figures(world, captions, renders, maps, maps)
    assert np.nanmean(clean["thing_iou"]) > 0.8 and np.nanmean(clean["stuff_miou"]) > 0.8
    # Replace every thing pixel of the map by the stuff below it, then paint the things
    # back somewhere else: most pixels still agree, the things do not.
    things = np.isin(maps, world_lib.THING_IDS)
    background = maps.copy()
    bottom = maps[:, -1:, :].repeat(maps.shape[1], axis=1)
    background[things] = bottom[things]
    moved = background.copy()
    shifted = np.roll(things, maps.shape[-1] // 2, axis=-1) & ~things
    moved[shifted] = np.roll(maps, maps.shape[-1] // 2, axis=-1)[shifted]
    wrong = scoring.synthetic_figures(world, captions, renders, moved, maps)
    assert np.mean(wrong["map_image_agreement"]) > 0.75
    assert np.nanmean(wrong["thing_iou"]) < 0.2
    # Given-map figures compare the given map with the oracle's reading of the image.
    given = scoring.synthetic_figures(world, captions, renders, None, maps)
    np.testing.assert_allclose(given["thing_iou"], clean["thing_iou"])


def test_mean_over_scored_skips_samples_with_nothing_to_score():
    assert scoring.mean_over_scored(np.array([0.5, np.nan, 1.0])) == 0.75
    assert scoring.mean_over_scored(np.array([np.nan, np.nan])) is None
