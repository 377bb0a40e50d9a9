"""Load KL-f8 autoencoder weights (CompVis/U-ViT or diffusers naming) into ``AutoencoderKL``.

Two layouts are read:

* CompVis / U-ViT (``autoencoder_kl.pth``, or the ``first_stage_model.`` part of an SD
  ``.ckpt``): ``encoder.down.0.block.1.norm1.weight``, ``encoder.mid.attn_1.q.weight`` (1x1
  convs), ``quant_conv``, ``post_quant_conv``. These names are the Flax names after
  ``down.{i}``/``up.{i}``/``block.{j}`` -> ``down_{i}``/``up_{i}``/``block_{j}``.
* diffusers (``vae/config.json`` + ``diffusion_pytorch_model.safetensors``):
  ``encoder.down_blocks.0.resnets.1.norm1.weight``, ``mid_block.attentions.0.to_q.weight``
  (or the older ``query/key/value/proj_attn``), ``conv_shortcut``, ``conv_norm_out``. They are
  renamed to CompVis names first (decoder ``up_blocks.{i}`` is CompVis level ``n - 1 - i``).

``load_vae`` without a config uses ``VAEConfig(scale_factor=UVIT_SCALE_FACTOR)`` for single
files (the U-ViT/PDM checkpoint) and the diffusers ``config.json`` for directories.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pdm_jax.models.vae import UVIT_SCALE_FACTOR, AutoencoderKL, VAEConfig
from pdm_jax.weights import components
from pdm_jax.weights.torch_io import (
    ConversionError,
    find_weights_file,
    fit_to_template,
    flatten_paths,
    load_state_dict,
)

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
CHECKPOINT_PREFIXES = ("first_stage_model.", "vae.")
IGNORED_PREFIXES = ("loss.",)  # LDM training checkpoints carry the discriminator/LPIPS
_ATTENTION_NAMES = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}
_RESNET_NAMES = {"conv_shortcut": "nin_shortcut"}
_DIFFUSERS_KEY = re.compile(r"(down_blocks|up_blocks|mid_block)\.")


def vae_config_from_diffusers(cfg: dict[str, Any]) -> VAEConfig:
    """Builds a ``VAEConfig`` from a diffusers ``AutoencoderKL`` ``config.json`` dict.

    Args:
      cfg: the parsed JSON.

    Returns:
      The config (``scaling_factor`` becomes ``scale_factor``).
    """
    if cfg.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ConversionError(f"expected an AutoencoderKL config, got {cfg['_class_name']!r}")
    odd = [
        f"{key}={cfg[key]!r}"
        for key, ok in (
            ("down_block_types", lambda v: set(v) == {"DownEncoderBlock2D"}),
            ("up_block_types", lambda v: set(v) == {"UpDecoderBlock2D"}),
            ("act_fn", lambda v: v == "silu"),
            ("shift_factor", lambda v: v in (None, 0, 0.0)),
            ("latents_mean", lambda v: v is None),
        )
        if key in cfg and not ok(cfg[key])
    ]
    if odd:
        raise ConversionError(f"unsupported AutoencoderKL settings: {', '.join(odd)}")
    defaults = VAEConfig()
    return VAEConfig(
        in_channels=cfg.get("in_channels", defaults.in_channels),
        out_channels=cfg.get("out_channels", defaults.out_channels),
        block_out_channels=tuple(cfg.get("block_out_channels", defaults.block_out_channels)),
        layers_per_block=cfg.get("layers_per_block", defaults.layers_per_block),
        latent_channels=cfg.get("latent_channels", defaults.latent_channels),
        norm_num_groups=cfg.get("norm_num_groups", defaults.norm_num_groups),
        mid_block_add_attention=cfg.get("mid_block_add_attention", True),
        use_quant_conv=cfg.get("use_quant_conv", True),
        use_post_quant_conv=cfg.get("use_post_quant_conv", True),
        scale_factor=float(cfg.get("scaling_factor", defaults.scale_factor)),
    )


def diffusers_to_compvis_key(key: str, num_levels: int) -> str:
    """Renames one diffusers ``AutoencoderKL`` key to its CompVis name.

    Args:
      key: e.g. ``decoder.up_blocks.0.resnets.2.conv1.weight``.
      num_levels: ``len(block_out_channels)`` (the decoder's level order is reversed).

    Returns:
      e.g. ``decoder.up.3.block.2.conv1.weight`` for four levels.
    """
    part, _, rest = key.partition(".")
    rest = rest.replace("conv_norm_out.", "norm_out.")
    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)", rest):
        level, block, layer, leaf = m.groups()
        rest = f"down.{level}.block.{block}.{_RESNET_NAMES.get(layer, layer)}.{leaf}"
    elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", rest):
        rest = f"down.{m[1]}.downsample.conv.{m[2]}"
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)", rest):
        level, block, layer, leaf = m.groups()
        level = num_levels - 1 - int(level)
        rest = f"up.{level}.block.{block}.{_RESNET_NAMES.get(layer, layer)}.{leaf}"
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", rest):
        rest = f"up.{num_levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(\w+)\.(weight|bias)", rest):
        index, layer, leaf = m.groups()
        rest = f"mid.block_{int(index) + 1}.{_RESNET_NAMES.get(layer, layer)}.{leaf}"
    elif (m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)\.(weight|bias)", rest)) and (
        m[1] in _ATTENTION_NAMES
    ):
        rest = f"mid.attn_1.{_ATTENTION_NAMES[m[1]]}.{m[2]}"
    return f"{part}.{rest}"


def _strip_prefix(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    for prefix in CHECKPOINT_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def convert_state_dict(
    state: dict[str, np.ndarray], template: Any, config: VAEConfig
) -> dict[str, Any]:
    """Maps a CompVis- or diffusers-named autoencoder state dict onto Flax params.

    Args:
      state: ``{name: array}`` (either naming; ``first_stage_model.`` prefixes are removed).
      template: expected params (shapes/dtypes), e.g. from ``jax.eval_shape``.
      config: the model config (for the decoder level order of diffusers names).

    Returns:
      The params tree.
    """
    state = {k: v for k, v in _strip_prefix(state).items() if not k.startswith(IGNORED_PREFIXES)}
    if any(_DIFFUSERS_KEY.search(k) for k in state):
        levels = len(config.block_out_channels)
        state = {diffusers_to_compvis_key(k, levels): v for k, v in state.items()}
    expected = flatten_paths(template)
    converted, unplaced = {}, []
    for key, value in state.items():
        name = re.sub(r"(^|\.)(down|up|block)\.(\d+)(?=\.)", r"\1\2_\3", key)
        parent, _, leaf = name.replace(".", "/").rpartition("/")
        kernel = expected.get(f"{parent}/kernel")
        if leaf == "bias":
            converted[f"{parent}/bias"] = value
        elif leaf == "weight" and kernel is not None and len(kernel.shape) == 2:
            # Attention projections: 1x1 conv [O, I, 1, 1] or Linear [O, I] -> Dense [I, O].
            converted[f"{parent}/kernel"] = value.reshape(value.shape[0], -1).T
        elif leaf == "weight" and kernel is not None:
            converted[f"{parent}/kernel"] = np.transpose(value, (2, 3, 1, 0))
        elif leaf == "weight" and f"{parent}/scale" in expected:
            converted[f"{parent}/scale"] = value
        else:
            unplaced.append(key)
    return fit_to_template(converted, template, "AutoencoderKL", unexpected=unplaced)


def _resolve(path: str | os.PathLike, config: VAEConfig | None) -> tuple[str, VAEConfig]:
    path = os.fspath(path)
    if os.path.isfile(path):
        return path, config or VAEConfig(scale_factor=UVIT_SCALE_FACTOR)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"VAE checkpoint {path!r} does not exist; pass autoencoder_kl.pth, a weights file "
            "or a diffusers VAE directory (config.json + diffusion_pytorch_model.safetensors)"
        )
    if os.path.isfile(os.path.join(path, "vae", "config.json")):
        path = os.path.join(path, "vae")  # a diffusers pipeline root
    config_file = os.path.join(path, "config.json")
    if config is None:
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"{path!r} has no config.json; pass config=VAEConfig(...)")
        with open(config_file) as f:
            config = vae_config_from_diffusers(json.load(f))
    return find_weights_file(path, WEIGHT_FILES), config


def load_vae(
    path: str | os.PathLike,
    config: VAEConfig | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
) -> tuple[AutoencoderKL, dict[str, Any]]:
    """Loads an autoencoder from a local checkpoint.

    Args:
      path: a CompVis/U-ViT file (``autoencoder_kl.pth``, ``.safetensors``, ``.ckpt``), a
        diffusers VAE directory, a diffusers pipeline root with a ``vae/`` folder, or a
        directory written by ``python -m pdm_jax.convert vae``.
      config: architecture and ``scale_factor``; default: the directory's ``config.json``,
        or the SD architecture with ``UVIT_SCALE_FACTOR`` for single files.
      dtype: compute dtype.
      param_dtype: parameter dtype.

    Returns:
      ``(module, params)``.
    """
    if components.is_component(path):  # written by `python -m pdm_jax.convert vae`
        arch, params = components.load_component(path, "vae")
        module = AutoencoderKL(config or VAEConfig(**arch), dtype=dtype, param_dtype=param_dtype)
        return module, jax.tree.map(lambda p: jnp.asarray(p, param_dtype), params)
    weights, config = _resolve(path, config)
    module = AutoencoderKL(config, dtype=dtype, param_dtype=param_dtype)
    size = 2 * config.downsample_factor
    images = jnp.zeros((1, size, size, config.in_channels), jnp.float32)
    template = jax.eval_shape(module.init, jax.random.key(0), images)["params"]
    return module, convert_state_dict(load_state_dict(weights), template, config)
