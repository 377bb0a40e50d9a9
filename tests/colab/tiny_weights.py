"""Tiny stand-ins for the weights a user keeps on Drive, for the weights notebook's smoke run.

``write_tiny_originals(directory)`` writes, in the layouts users download them in:

* ``nnet_ema.safetensors``: a two-stream PDM state dict under the official U-ViT/PDM tensor
  names (``pdm_jax.convert.official.params_to_official``, which the parity tests check
  against the official code), random fan-in scaled weights so that the prompt changes the
  sample, at the geometry of ``tests.test_main_coco.MODEL`` (32×32×4 latents, 16×32
  contexts, width 32, depth 2);
* ``clip-text/``: a Hugging Face CLIP text directory (``config.json``,
  ``model.safetensors``, BPE tokenizer files) with random weights;
* ``vae/``: a tiny KL-f8 VAE, already in the ``python -m pdm_jax.convert vae`` layout (the
  notebook's "already converted" branch).

Every array comes from the test suite's own fixture generators (``tests.data.fake_coco``,
``tests.test_main_coco``); nothing here repeats them.
"""

import json
import pathlib

import numpy as np

from pdm_jax import models
from pdm_jax.convert import official
from pdm_jax.models.clip import ClipTextConfig, CLIPTextModel
from pdm_jax.models.vae import AutoencoderKL
from pdm_jax.weights import components
from pdm_jax.weights.torch_io import save_safetensors
from tests.data import fake_coco
from tests.test_main_coco import MODEL, TEXT, _random_params, _random_tree, _write_hf_clip_text

# The official ``UViT(**kwargs)`` of the tiny two-stream PDM (what ``--model_kwargs`` takes).
OFFICIAL_KWARGS = {
    "img_size": MODEL["img_size"],
    "patch_size": 2,
    "in_chans": MODEL["in_chans"],
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
    "mlp_ratio": 4,
    "clip_dim": MODEL["clip_dim"],
    "num_clip_token": MODEL["num_clip_token"],
    "enable_panoptic": True,
    "separate": True,
}


def write_tiny_originals(directory: str | pathlib.Path) -> dict[str, str]:
    """Writes the tiny PDM, CLIP text and VAE weights into ``directory``.

    Args:
      directory: where to write (created).

    Returns:
      ``pdm`` (the official-format state dict), ``clip`` and ``vae`` (paths), and
      ``model_kwargs`` (the official constructor kwargs as JSON, for ``--model_kwargs``).
    """
    root = pathlib.Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    model_cfg = official.model_config_from_official_kwargs(OFFICIAL_KWARGS)
    params = _random_tree(models.abstract_params(model_cfg), seed=2)
    pdm = root / "nnet_ema.safetensors"
    save_safetensors(official.params_to_official(params, model_cfg), pdm)

    clip = root / "clip-text"
    vocab_size = fake_coco.write_clip_tokenizer(str(clip))
    text = CLIPTextModel(ClipTextConfig(vocab_size=vocab_size, eos_token_id=vocab_size - 1, **TEXT))
    _write_hf_clip_text(clip, _random_params(text, np.zeros((1, 16), np.int32), seed=1), vocab_size)

    vae = root / "vae"
    vae_module = AutoencoderKL(fake_coco.TINY_VAE)
    vae_params = _random_params(vae_module, np.zeros((1, 16, 16, 3), np.float32), seed=0)
    components.save_component(str(vae), "vae", vae_params, fake_coco.TINY_VAE)
    return {
        "pdm": str(pdm),
        "clip": str(clip),
        "vae": str(vae),
        "model_kwargs": json.dumps(OFFICIAL_KWARGS),
    }
