"""Load Hugging Face CLIP checkpoints (local directories) into the Flax CLIP modules.

A directory holds ``config.json`` plus ``model.safetensors`` (or ``pytorch_model.bin``, which
needs the torch extra) and the tokenizer files (``vocab.json`` + ``merges.txt`` or
``tokenizer.json``). Stable Diffusion pipeline layouts (``text_encoder/`` and ``tokenizer/``
subfolders) are recognised too. Nothing is downloaded: configs and tokenizers are read with
``local_files_only=True``; transformers is used only to parse configs and to tokenize.

Conversion is the HF name with ``.layers.{i}.`` -> ``/layers_{i}/`` and ``.`` -> ``/``;
``weight`` becomes ``kernel`` (Linear: transposed; Conv2d: OIHW -> HWIO), ``scale``
(LayerNorm) or ``embedding`` (Embedding), whichever the Flax module has at that path.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pdm_jax.models.clip import (
    ClipConfig,
    CLIPModel,
    ClipTextConfig,
    CLIPTextModel,
    ClipVisionConfig,
)
from pdm_jax.models.clip_embed import ClipEmbedder, TextEncoder
from pdm_jax.weights import components
from pdm_jax.weights.torch_io import (
    ConversionError,
    find_weights_file,
    fit_to_template,
    flatten_paths,
    load_state_dict,
)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Buffers some older checkpoints carry; they are recomputed, not loaded.
BUFFER_SUFFIXES = ("embeddings.position_ids",)
TEXT_ONLY_IGNORED = ("vision_model.", "visual_projection.", "text_projection.", "logit_scale")
# transformers 5 saves a bare CLIPTextModel without the "text_model." prefix of older files.
TEXT_TOWER_ROOTS = ("embeddings.", "encoder.", "final_layer_norm.")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def _model_and_tokenizer_dirs(path: str | os.PathLike) -> tuple[str, str]:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"CLIP directory {path!r} does not exist (a local path is needed)")
    sd_text = os.path.join(path, "text_encoder")
    if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(sd_text):
        return sd_text, os.path.join(path, "tokenizer")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path!r} has no config.json; pass a Hugging Face CLIP directory")
    return path, path


def _hf_config(model_dir: str) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir, local_files_only=True)


def text_config_from_hf(hf: Any) -> ClipTextConfig:
    """Builds a ``ClipTextConfig`` from a ``transformers.CLIPTextConfig``.

    Args:
      hf: the parsed Hugging Face text config.

    Returns:
      The Flax config.
    """
    if not isinstance(hf.eos_token_id, int):
        raise ConversionError(f"eos_token_id must be one int, got {hf.eos_token_id!r}")
    return ClipTextConfig(
        vocab_size=hf.vocab_size,
        max_position_embeddings=hf.max_position_embeddings,
        hidden_size=hf.hidden_size,
        num_hidden_layers=hf.num_hidden_layers,
        num_attention_heads=hf.num_attention_heads,
        intermediate_size=hf.intermediate_size,
        hidden_act=hf.hidden_act,
        layer_norm_eps=float(hf.layer_norm_eps),
        eos_token_id=hf.eos_token_id,
    )


def vision_config_from_hf(hf: Any) -> ClipVisionConfig:
    """Builds a ``ClipVisionConfig`` from a ``transformers.CLIPVisionConfig``.

    Args:
      hf: the parsed Hugging Face vision config.

    Returns:
      The Flax config.
    """
    for name in ("image_size", "patch_size"):
        if not isinstance(getattr(hf, name), int):
            raise ConversionError(f"only square {name} is supported, got {getattr(hf, name)!r}")
    return ClipVisionConfig(
        image_size=hf.image_size,
        patch_size=hf.patch_size,
        num_channels=hf.num_channels,
        hidden_size=hf.hidden_size,
        num_hidden_layers=hf.num_hidden_layers,
        num_attention_heads=hf.num_attention_heads,
        intermediate_size=hf.intermediate_size,
        hidden_act=hf.hidden_act,
        layer_norm_eps=float(hf.layer_norm_eps),
    )


def load_text_config(path: str | os.PathLike) -> ClipTextConfig:
    """Reads the text config of a CLIP or CLIP-text directory (``config.json``)."""
    hf = _hf_config(_model_and_tokenizer_dirs(path)[0])
    return text_config_from_hf(getattr(hf, "text_config", hf))


def load_clip_config(path: str | os.PathLike) -> ClipConfig:
    """Reads the full config of a ``CLIPModel`` directory (``model_type: clip``)."""
    hf = _hf_config(_model_and_tokenizer_dirs(path)[0])
    if not hasattr(hf, "vision_config"):
        raise ConversionError(
            f"{os.fspath(path)!r} is a {hf.model_type!r} checkpoint without a vision tower; "
            "the full CLIP model needs a CLIPModel directory (model_type 'clip')"
        )
    return ClipConfig(
        text=text_config_from_hf(hf.text_config),
        vision=vision_config_from_hf(hf.vision_config),
        projection_dim=hf.projection_dim,
    )


def load_tokenizer(path: str | os.PathLike) -> Any:
    """Loads the local CLIP tokenizer (``vocab.json`` + ``merges.txt`` or ``tokenizer.json``)."""
    from transformers import CLIPTokenizer

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
    return CLIPTokenizer.from_pretrained(path, local_files_only=True)


def convert_state_dict(
    state: dict[str, np.ndarray], template: Any, what: str, ignore_prefixes: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Maps a Hugging Face CLIP state dict onto a Flax params tree.

    Args:
      state: ``{hf_name: array}``.
      template: expected params (shapes/dtypes), e.g. from ``jax.eval_shape``.
      what: model name for error messages.
      ignore_prefixes: source keys to skip (e.g. the vision tower for a text-only model).

    Returns:
      The params tree.
    """
    expected = flatten_paths(template)
    converted, unplaced = {}, []
    for key, value in state.items():
        if key.startswith(ignore_prefixes) or key.endswith(BUFFER_SUFFIXES):
            continue
        parent, _, leaf = _LAYER.sub(r"/layers_\1/", key).replace(".", "/").rpartition("/")
        if leaf == "bias":
            converted[f"{parent}/bias"] = value
        elif leaf != "weight":
            converted[key.replace(".", "/")] = value
        elif f"{parent}/kernel" in expected:
            kernel = value.T if value.ndim == 2 else np.transpose(value, (2, 3, 1, 0))
            converted[f"{parent}/kernel"] = kernel
        elif f"{parent}/scale" in expected:
            converted[f"{parent}/scale"] = value
        elif f"{parent}/embedding" in expected:
            converted[f"{parent}/embedding"] = value
        else:
            unplaced.append(key)
    return fit_to_template(converted, template, what, unexpected=unplaced)


def load_clip_text(
    path: str | os.PathLike, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32
) -> tuple[CLIPTextModel, dict[str, Any], Any]:
    """Loads the text tower of a local HF CLIP (``CLIPTextModel`` or full ``CLIPModel``) dir.

    Args:
      path: directory with ``config.json`` and weights (or an SD pipeline root).
      dtype: compute dtype.
      param_dtype: parameter dtype.

    Returns:
      ``(module, params, tokenizer)``.
    """
    if components.is_component(path):  # written by `python -m pdm_jax.convert clip_text`
        arch, params = components.load_component(path, "clip_text")
        module = CLIPTextModel(ClipTextConfig(**arch), dtype=dtype, param_dtype=param_dtype)
        params = jax.tree.map(lambda p: jnp.asarray(p, param_dtype), params)
        return module, params, load_tokenizer(path)
    model_dir, tok_dir = _model_and_tokenizer_dirs(path)
    module = CLIPTextModel(load_text_config(model_dir), dtype=dtype, param_dtype=param_dtype)
    ids = jnp.zeros((1, module.config.max_position_embeddings), jnp.int32)
    template = jax.eval_shape(module.init, jax.random.key(0), ids)["params"]
    state = load_state_dict(find_weights_file(model_dir, WEIGHT_FILES))
    state = {
        f"text_model.{k}" if k.startswith(TEXT_TOWER_ROOTS) else k: v for k, v in state.items()
    }
    params = convert_state_dict(state, template, "CLIP text", TEXT_ONLY_IGNORED)
    return module, params, load_tokenizer(tok_dir)


def load_clip(
    path: str | os.PathLike, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32
) -> tuple[CLIPModel, dict[str, Any], Any]:
    """Loads a full local HF ``CLIPModel`` (text + vision towers and projections).

    Args:
      path: directory with ``config.json`` (model_type ``clip``), weights and tokenizer.
      dtype: compute dtype.
      param_dtype: parameter dtype.

    Returns:
      ``(module, params, tokenizer)``.
    """
    model_dir, tok_dir = _model_and_tokenizer_dirs(path)
    config = load_clip_config(model_dir)
    module = CLIPModel(config, dtype=dtype, param_dtype=param_dtype)
    ids = jnp.zeros((1, config.text.max_position_embeddings), jnp.int32)
    pixels = jnp.zeros((1, config.vision.image_size, config.vision.image_size, 3), jnp.float32)
    template = jax.eval_shape(module.init, jax.random.key(0), ids, pixels)["params"]
    state = load_state_dict(find_weights_file(model_dir, WEIGHT_FILES))
    return module, convert_state_dict(state, template, "CLIP"), load_tokenizer(tok_dir)


def load_text_encoder(
    path: str | os.PathLike, batch_size: int = 64, dtype: Any = jnp.float32
) -> TextEncoder:
    """``TextEncoder`` (captions -> ``[B, 77, D]`` contexts) from a local CLIP directory."""
    return TextEncoder(*load_clip_text(path, dtype=dtype), batch_size=batch_size)


def load_clip_embedder(path: str | os.PathLike, batch_size: int = 64) -> ClipEmbedder:
    """``ClipEmbedder`` (normalised image/text embeddings, float32) from a CLIP directory."""
    return ClipEmbedder(*load_clip(path), batch_size=batch_size)
