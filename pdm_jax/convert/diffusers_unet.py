"""Stable Diffusion UNet weights (diffusers or CompVis/LDM names) ↔ pdm_jax parameters.

The Flax UNet mirrors the diffusers names, so conversion is a table:

* ``a.3.b`` (a ``ModuleList`` index) ↔ ``a_3/b``;
* ``Linear.weight [out, in]`` ↔ ``Dense.kernel [in, out]``;
* ``Conv2d.weight [O, I, H, W]`` ↔ ``Conv.kernel [H, W, I, O]``;
* norm ``weight`` ↔ ``scale``; biases unchanged.

SD single-file checkpoints (``.ckpt`` / ``.safetensors`` from CompVis/Stability) name the
UNet ``model.diffusion_model.*`` in the LDM layout (``input_blocks.4.1...``,
``middle_block.1...``, ``output_blocks.8.2.conv``, resnets with ``in_layers``/
``emb_layers``/``out_layers``/``skip_connection``); ``ldm_to_diffusers`` and
``diffusers_to_ldm`` rename them by a table built from the UNet config.
"""

import json
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np
from flax import traverse_util

from pdm_jax.convert.official import official_name_to_path
from pdm_jax.models import abstract_params
from pdm_jax.models.unet import UNetSpec, load_packaged_config, resolve_config
from pdm_jax.weights.torch_io import find_weights_file, load_state_dict

LDM_PREFIX = "model.diffusion_model."
WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)
_LIST = re.compile(
    r"(down_blocks|up_blocks|resnets|attentions|transformer_blocks|downsamplers|upsamplers"
    r"|to_out|net)_(\d+)"
)
# LDM ResBlock submodules -> diffusers ResnetBlock2D ones.
_RESNET_LDM = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


def model_config_from_diffusers(config_dict: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """``config.model`` of a plain ``unet`` for a diffusers UNet ``config.json``.

    Args:
      config_dict: the parsed diffusers ``UNet2DConditionModel`` config.

    Returns:
      A ConfigDict with every ``config.model`` field: ``name="unet"``, the config as
      ``unet_config`` JSON, ``img_size`` = ``sample_size``, ``in_chans``, ``clip_dim`` =
      ``cross_attention_dim``, float32, no remat; the U-ViT-only fields at their defaults.

    Raises:
      ValueError: for settings the port does not implement (``UNetSpec.from_diffusers``).
    """
    spec = UNetSpec.from_diffusers(config_dict)
    c = ml_collections.ConfigDict()
    c.name = "unet"
    c.img_size = spec.sample_size
    c.patch_size = 1
    c.in_chans = spec.in_channels
    c.embed_dim = 512
    c.depth = 12
    c.num_heads = 8
    c.mlp_ratio = 4.0
    c.qkv_bias = False
    c.mlp_time_embed = False
    c.clip_dim = spec.cross_attention_dim
    c.num_clip_token = 77
    c.num_bits = 8
    c.map_patch_factor = 1
    c.use_given_map = False
    c.dtype = "float32"
    c.param_dtype = "float32"
    c.remat_policy = "none"
    c.attention = "auto"
    c.pos_embed_init = "trunc_normal"
    c.token_fusion = False
    c.unet_config = spec.source
    c.map_width_multiplier = 1.0
    return c


def unet_spec(model_cfg: Any) -> UNetSpec:
    """The ``UNetSpec`` of a UNet ``config.model`` (``unet_config``)."""
    return UNetSpec.from_diffusers(resolve_config(model_cfg.unet_config))


def _check_plain(model_cfg: Any) -> None:
    if model_cfg.name != "unet":
        raise ValueError(
            f"diffusers UNet weights describe a plain 'unet' model, not {model_cfg.name!r}: "
            "convert to a 'unet' checkpoint and pass it as --config.ckpt.init_from."
        )


def diffusers_name_to_path(name: str, ndim: int) -> tuple[str, ...]:
    """Our parameter path for a diffusers UNet tensor name (``a.3.b.weight`` → ``a_3/b/kernel``)."""
    return official_name_to_path(name, ndim)


def path_to_diffusers_name(path: tuple[str, ...]) -> str:
    """The diffusers tensor name of one of our parameter paths."""
    parts = [_LIST.sub(r"\1.\2", p) if _LIST.fullmatch(p) else p for p in path]
    if parts[-1] in ("kernel", "scale"):
        parts[-1] = "weight"
    return ".".join(parts)


def _to_numpy(value: Any) -> np.ndarray:
    """numpy array of a state-dict value (torch tensors detached, widened to float32)."""
    if hasattr(value, "detach"):
        return value.detach().cpu().float().numpy()
    return np.asarray(value)


def _from_torch(arr: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and arr.ndim == 4:
        return arr.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if leaf == "kernel" and arr.ndim == 2:
        return arr.T
    return arr


def _to_torch(arr: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and arr.ndim == 4:
        return arr.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    if leaf == "kernel" and arr.ndim == 2:
        return arr.T
    return arr


def _raise_mismatch(what: str, missing: list[str], unexpected: list[str], bad: list[str]) -> None:
    if not (missing or unexpected or bad):
        return
    lines = [f"{what}:"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", bad)):
        if items:
            lines += [f"  {title} ({len(items)}):"] + [f"    {i}" for i in items[:50]]
            lines += [f"    ... and {len(items) - 50} more"] * (len(items) > 50)
    raise ValueError("\n".join(lines))


def diffusers_to_params(state_dict: Mapping[str, Any], model_cfg: Any) -> dict[str, Any]:
    """Converts a diffusers ``UNet2DConditionModel`` state dict to our parameter tree.

    Args:
      state_dict: diffusers tensor name → numpy array (or torch tensor).
      model_cfg: ``config.model`` of a ``unet`` (e.g. ``model_config_from_diffusers``).

    Returns:
      Nested dict of numpy arrays in the model's ``param_dtype``.

    Raises:
      ValueError: listing every missing, unexpected and mis-shaped tensor by its diffusers
        name (a config that does not match the weights).
    """
    _check_plain(model_cfg)
    expected = traverse_util.flatten_dict(abstract_params(model_cfg))
    out, unexpected, bad, bad_paths = {}, [], [], set()
    for name, value in state_dict.items():
        arr = _to_numpy(value)
        path = diffusers_name_to_path(name, arr.ndim)
        if path not in expected:
            unexpected.append(name)
            continue
        converted = _from_torch(arr, path[-1])
        want = expected[path]
        if converted.shape != tuple(want.shape):
            torch_shape = _to_torch(np.empty(want.shape, np.bool_), path[-1]).shape
            bad.append(f"{name}: checkpoint {arr.shape}, model needs {torch_shape}")
            bad_paths.add(path)
            continue
        out[path] = np.asarray(converted, dtype=want.dtype)
    missing = [path_to_diffusers_name(p) for p in expected if p not in out and p not in bad_paths]
    _raise_mismatch(
        "The UNet weights do not fit the UNet config (check that config.json belongs to "
        "these weights: block_out_channels, attention_head_dim, cross_attention_dim, "
        "use_linear_projection)",
        missing,
        unexpected,
        bad,
    )
    return traverse_util.unflatten_dict(out)


def params_to_diffusers(params: Mapping[str, Any], model_cfg: Any) -> dict[str, np.ndarray]:
    """Converts our UNet parameters to a diffusers state dict (numpy arrays).

    Args:
      params: parameter tree of the ``unet`` described by ``model_cfg``.
      model_cfg: its ``config.model``.

    Returns:
      diffusers tensor name → numpy array (PyTorch layouts).

    Raises:
      ValueError: if ``params`` lacks, adds or mis-shapes any of the model's parameters.
    """
    _check_plain(model_cfg)
    expected = traverse_util.flatten_dict(abstract_params(model_cfg))
    flat = traverse_util.flatten_dict(dict(params))
    _raise_mismatch(
        "The parameters do not fit the UNet config",
        ["/".join(p) for p in expected if p not in flat],
        ["/".join(p) for p in flat if p not in expected],
        [
            f"{'/'.join(p)}: {np.shape(v)} vs model {tuple(expected[p].shape)}"
            for p, v in flat.items()
            if p in expected and np.shape(v) != tuple(expected[p].shape)
        ],
    )
    return {path_to_diffusers_name(p): _to_torch(np.asarray(v), p[-1]) for p, v in flat.items()}


def ldm_table(spec: UNetSpec) -> dict[str, str]:
    """LDM module prefix → diffusers module prefix, for every module of the UNet.

    Resnet prefixes map to themselves' diffusers names; their inner names are renamed
    by ``_RESNET_LDM`` (see ``ldm_to_diffusers``).

    Args:
      spec: the UNet topology.

    Returns:
      e.g. ``{"input_blocks.1.1": "down_blocks.0.attentions.0", "out.2": "conv_out", ...}``.
    """
    n_layers = spec.layers_per_block
    t = {
        "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2",
        "input_blocks.0.0": "conv_in",
        "middle_block.0": "mid_block.resnets.0",
        "middle_block.1": "mid_block.attentions.0",
        "middle_block.2": "mid_block.resnets.1",
        "out.0": "conv_norm_out",
        "out.2": "conv_out",
    }
    last = spec.num_levels - 1
    for i, kind in enumerate(spec.down_block_types):
        for j in range(n_layers):
            n = i * (n_layers + 1) + j + 1
            t[f"input_blocks.{n}.0"] = f"down_blocks.{i}.resnets.{j}"
            if kind.startswith("CrossAttn"):
                t[f"input_blocks.{n}.1"] = f"down_blocks.{i}.attentions.{j}"
        if i < last:
            t[f"input_blocks.{(i + 1) * (n_layers + 1)}.0.op"] = (
                f"down_blocks.{i}.downsamplers.0.conv"
            )
    for i, kind in enumerate(spec.up_block_types):
        attn = kind.startswith("CrossAttn")
        for j in range(n_layers + 1):
            n = i * (n_layers + 1) + j
            t[f"output_blocks.{n}.0"] = f"up_blocks.{i}.resnets.{j}"
            if attn:
                t[f"output_blocks.{n}.1"] = f"up_blocks.{i}.attentions.{j}"
            if i < last and j == n_layers:
                t[f"output_blocks.{n}.{2 if attn else 1}.conv"] = f"up_blocks.{i}.upsamplers.0.conv"
    return t


def _rename(name: str, table: Mapping[str, str], inner: Mapping[str, str]) -> str | None:
    """``name`` with its longest table prefix replaced (and resnet inner names renamed)."""
    parts = name.split(".")
    for k in (4, 3, 2):
        head = ".".join(parts[:k])
        if head in table and len(parts) > k:
            rest = ".".join(parts[k:])
            for old, new in inner.items():
                if rest.startswith(old + ".") and ".resnets." in table[head] + ".":
                    rest = new + rest[len(old) :]
                    break
            return f"{table[head]}.{rest}"
    return None


def ldm_to_diffusers(state_dict: Mapping[str, Any], spec: UNetSpec) -> dict[str, Any]:
    """Renames the UNet of an SD single-file checkpoint (``model.diffusion_model.*``).

    Args:
      state_dict: the whole checkpoint (other keys — VAE, text encoder, EMA — are skipped).
      spec: the UNet topology (from the matching diffusers config).

    Returns:
      diffusers tensor name → array.

    Raises:
      ValueError: when the checkpoint has no ``model.diffusion_model.*`` tensor, or one
        the table cannot place (named).
    """
    table = ldm_table(spec)
    out, unplaced = {}, []
    for key, value in state_dict.items():
        if not key.startswith(LDM_PREFIX):
            continue
        name = _rename(key[len(LDM_PREFIX) :], table, _RESNET_LDM)
        if name is None:
            unplaced.append(key)
        else:
            out[name] = value
    if not out and not unplaced:
        raise ValueError(
            f"No {LDM_PREFIX}* tensor in the checkpoint: not an SD single-file checkpoint "
            "(give a diffusers unet/ directory instead)."
        )
    if unplaced:
        raise ValueError(
            "SD single-file tensors with no place in the UNet config (wrong SD version?): "
            + ", ".join(unplaced[:20])
        )
    return out


def diffusers_to_ldm(state_dict: Mapping[str, Any], spec: UNetSpec) -> dict[str, Any]:
    """The inverse of ``ldm_to_diffusers``: diffusers names → ``model.diffusion_model.*``.

    Raises:
      ValueError: naming a tensor the table cannot place.
    """
    table = {v: k for k, v in ldm_table(spec).items()}
    inner = {v: k for k, v in _RESNET_LDM.items()}
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        name = None
        for k in (5, 4, 3, 2, 1):
            head = ".".join(parts[:k])
            if head in table and len(parts) > k:
                rest = ".".join(parts[k:])
                if ".resnets." in head + ".":
                    first = rest.split(".")[0]
                    rest = inner.get(first, first) + rest[len(first) :]
                name = f"{table[head]}.{rest}"
                break
        if name is None:
            raise ValueError(f"diffusers tensor {key!r} has no LDM name in this UNet config.")
        out[LDM_PREFIX + name] = value
    return out


def infer_sd_version(state_dict: Mapping[str, Any]) -> str:
    """``sd1`` or ``sd2`` for an SD single-file checkpoint, from its cross-attention width.

    Raises:
      ValueError: when the checkpoint is neither (give a diffusers config instead).
    """
    key = LDM_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    if key not in state_dict:
        raise ValueError(
            f"Cannot tell the SD version: {key} is missing. Pass the model config "
            "(--config=configs/pdm.py:unet,sd=1|2) or convert a diffusers unet/ directory."
        )
    width = int(np.shape(state_dict[key])[1])
    versions = {768: "sd1", 1024: "sd2"}
    if width not in versions:
        raise ValueError(
            f"{key} has context width {width}, neither SD 1.x (768) nor SD 2.x (1024); pass "
            "--config with a matching unet_config."
        )
    return versions[width]


def read_unet(path: str, model_cfg: Any | None = None) -> tuple[dict[str, Any], Any]:
    """Reads a diffusers ``unet/`` directory or an SD single-file checkpoint.

    Args:
      path: a directory with ``config.json`` and ``diffusion_pytorch_model.safetensors``
        (or ``.bin``), or a ``.ckpt`` / ``.safetensors`` with ``model.diffusion_model.*``.
      model_cfg: the target ``config.model``; default: from the directory's
        ``config.json``, or the packaged SD 1.x/2.x config the single file matches.

    Returns:
      ``(params, model_cfg)``.

    Raises:
      FileNotFoundError: no weights file in the directory.
      ValueError: weights that do not fit the config (naming the tensors).
    """
    p = pathlib.Path(path)
    if p.is_dir():
        if model_cfg is None:
            config_file = p / "config.json"
            if not config_file.is_file():
                raise FileNotFoundError(
                    f"{p} has no config.json (a diffusers unet/ directory has)."
                )
            model_cfg = model_config_from_diffusers(json.loads(config_file.read_text()))
        state = load_state_dict(find_weights_file(p, WEIGHT_FILES))
    else:
        whole = load_state_dict(str(p))
        if model_cfg is None:
            model_cfg = model_config_from_diffusers(load_packaged_config(infer_sd_version(whole)))
        state = ldm_to_diffusers(whole, unet_spec(model_cfg))
    return diffusers_to_params(state, model_cfg), model_cfg


def write_diffusers(output_dir: str, params: Mapping[str, Any], model_cfg: Any) -> str:
    """Writes ``config.json`` and ``diffusion_pytorch_model.safetensors`` (no torch needed).

    Args:
      output_dir: the ``unet/`` directory to create.
      params: the UNet parameters.
      model_cfg: its ``config.model``.

    Returns:
      ``output_dir``.
    """
    from safetensors.numpy import save_file

    state = params_to_diffusers(params, model_cfg)
    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = unet_spec(model_cfg).to_diffusers()
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(
        {k: np.ascontiguousarray(v) for k, v in state.items()},
        str(out / WEIGHT_FILES[0]),
    )
    return str(out)
