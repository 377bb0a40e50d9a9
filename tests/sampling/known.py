"""Inputs for the sampling tasks that take something known, and the inpainting check."""

import numpy as np


def known_inputs(sampler, info, n: int = 2, seed: int = 0):
    """``(contexts, latents, ids)`` for ``n`` samples: captions of the eval prompts, random
    latents and random category maps of the sampler's sizes."""
    side, mside = sampler.model.img_size, sampler.map_side
    rng = np.random.default_rng(seed)
    contexts = np.asarray(info.encode_text(list(info.eval_prompts)[:n]))
    latents = rng.standard_normal((n, side, side, sampler.model.in_chans)).astype(np.float32)
    ids = rng.choice(sorted(info.category_names), (n, mside, mside)).astype(np.int32)
    return contexts, latents, ids


def inpaint_left_or_top_half(sampler, contexts, latents, ids):
    """Inpaints the right half of the latents and the bottom half of the maps; asserts the
    known halves come back bit for bit, the regenerated half does not, and returns the
    samples."""
    n, side, mside = len(ids), sampler.model.img_size, sampler.map_side
    mask_x = np.zeros((n, side, side, 1), np.float32)
    mask_x[:, :, : side // 2] = 1.0
    mask_m = np.zeros((n, mside, mside, 1), np.float32)
    mask_m[:, : mside // 2] = 1.0
    out = sampler(
        list(range(n)),
        contexts=contexts,
        task="inpaint",
        known_latents=latents,
        known_maps=ids,
        mask_x=mask_x,
        mask_m=mask_m,
    )
    np.testing.assert_array_equal(out.latents[:, :, : side // 2], latents[:, :, : side // 2])
    np.testing.assert_array_equal(out.maps[:, : mside // 2], ids[:, : mside // 2])
    assert not np.allclose(out.latents[:, :, side // 2 :], latents[:, :, side // 2 :])
    return out
