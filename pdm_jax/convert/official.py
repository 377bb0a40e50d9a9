"""Official PyTorch U-ViT / PDM state dicts ↔ pdm_jax parameters.

The Flax modules mirror the official names, so conversion is a table:

* ``a.3.b`` (an ``nn.ModuleList`` index) ↔ ``a_3/b``;
* ``Linear.weight [out, in]`` ↔ ``Dense.kernel [in, out]`` (transposed); the attention
  projections keep their heads as kernel axes: ``attn.qkv.weight [3D, D]`` ↔
  ``attn/qkv/kernel [D, 3, H, Dh]`` (the official ``(K H D)`` order) and
  ``attn.proj.weight [D, D]`` ↔ ``attn/proj/kernel [H, Dh, D]``; ``qkv.bias [3D]`` ↔
  ``[3, H, Dh]``;
* ``Conv2d.weight [O, I, H, W]`` ↔ ``Conv.kernel [H, W, I, O]``;
* ``zero_convs.j.conv.weight`` (``Conv1d``, ``[O, I, 1]``) ↔ ``zero_convs_j/conv/kernel [I, O]``;
* ``LayerNorm.weight`` ↔ ``scale``; biases and ``pos_embed*`` unchanged.

Only map patch factor f = 1 exists in official checkpoints (the official model ignores
its ``patch_factor`` key), so ``model_config_from_official_kwargs`` always gives f = 1.
"""

import re
import warnings
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np
from flax import traverse_util

from pdm_jax.models import abstract_params

_LIST = re.compile(
    r"(in_blocks_mask|out_blocks_mask|in_blocks|out_blocks|zero_convs|time_embed)_(\d+)"
)
_KNOWN_KWARGS = {
    "name",
    "img_size",
    "patch_size",
    "in_chans",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "qkv_bias",
    "qk_scale",
    "mlp_time_embed",
    "use_checkpoint",
    "clip_dim",
    "num_clip_token",
    "conv",
    "skip",
    "num_panoptic_class",
    "enable_panoptic",
    "use_ground_truth",
    "separate",
    "patch_factor",
}


def _kind(path: tuple[str, ...], ndim: int) -> str:
    """How a tensor is laid out: linear | conv1d | conv2d | bias | copy.

    Args:
      path: our parameter path.
      ndim: rank of our parameter.
    """
    leaf = path[-1]
    if leaf == "bias":
        return "bias"
    if leaf != "kernel" and leaf != "weight":
        return "copy"
    if path[0].startswith("zero_convs_"):
        return "conv1d"
    if ndim == 4 and "attn" not in path:
        return "conv2d"
    return "linear"


def _linear_in_dims(path: tuple[str, ...]) -> int:
    """Leading kernel axes that are the ``Linear``'s input (``attn/proj``: heads, head dim)."""
    return 2 if path[-3:-1] == ("attn", "proj") else 1


def official_name_to_path(name: str, ndim: int) -> tuple[str, ...]:
    """Our parameter path for an official tensor name.

    Args:
      name: official state-dict key, e.g. ``out_blocks.2.skip_linear.weight``.
      ndim: rank of the official tensor (a rank-1 ``weight`` is a LayerNorm scale).

    Returns:
      Path tuple, e.g. ``("out_blocks_2", "skip_linear", "kernel")``.
    """
    parts: list[str] = []
    for part in name.split("."):
        if part.isdigit() and parts:
            parts[-1] = f"{parts[-1]}_{part}"
        else:
            parts.append(part)
    if parts[-1] == "weight":
        parts[-1] = "scale" if ndim == 1 else "kernel"
    return tuple(parts)


def path_to_official_name(path: tuple[str, ...]) -> str:
    """Official state-dict key for one of our parameter paths (inverse of the above)."""
    parts = [_LIST.sub(r"\1.\2", p) if _LIST.fullmatch(p) else p for p in path]
    if parts[-1] in ("kernel", "scale"):
        parts[-1] = "weight"
    return ".".join(parts)


def _from_official(arr: np.ndarray, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    """An official tensor in our layout; ``shape`` is ours (a misfit is left unreshaped)."""
    fits = arr.size == int(np.prod(shape))
    if kind == "linear" and arr.ndim == 2:
        return arr.T.reshape(shape) if fits else arr.T
    if kind == "bias" and arr.ndim == 1 and fits:
        return arr.reshape(shape)
    if kind == "conv1d" and arr.ndim == 3 and arr.shape[2] == 1:
        return arr[:, :, 0].T
    if kind == "conv2d":
        return arr.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    return arr


def _to_official(arr: np.ndarray, kind: str, in_dims: int = 1) -> np.ndarray:
    """One of our parameters in the official layout (``in_dims``: a kernel's input axes)."""
    if kind == "linear":
        return arr.reshape(int(np.prod(arr.shape[:in_dims])), -1).T
    if kind == "bias":
        return arr.reshape(-1)
    if kind == "conv1d":
        return arr.T[:, :, None]
    if kind == "conv2d":
        return arr.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    return arr


def _official_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The official shape of our parameter ``path`` of ``shape``."""
    kind = _kind(path, len(shape))
    return _to_official(np.empty(shape, np.bool_), kind, _linear_in_dims(path)).shape


def _to_numpy(value: Any) -> np.ndarray:
    """numpy view of an array-like; torch tensors are detached and bf16 widened."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def official_shapes(model_cfg: Any) -> dict[str, tuple[int, ...]]:
    """The official state-dict layout (name → shape) equivalent to ``model_cfg``.

    Args:
      model_cfg: ``config.model``.

    Returns:
      Dict from official tensor name to shape, for every parameter of the model.
    """
    flat = traverse_util.flatten_dict(abstract_params(model_cfg))
    return {path_to_official_name(p): _official_shape(p, tuple(v.shape)) for p, v in flat.items()}


def _fail(what: str, missing: list[str], unexpected: list[str], misshaped: list[str]) -> None:
    """Raises one ValueError listing every problem, or returns if there is none."""
    if not (missing or unexpected or misshaped):
        return
    lines = [f"{what}:"]
    for title, items in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("mis-shaped", misshaped),
    ):
        if items:
            lines.append(f"  {title} ({len(items)}):")
            lines += [f"    {item}" for item in items]
    raise ValueError("\n".join(lines))


def official_to_params(state_dict: Mapping[str, Any], model_cfg: Any) -> dict[str, Any]:
    """Converts an official PyTorch state dict to a pdm_jax parameter tree.

    Args:
      state_dict: official tensor name → torch tensor or numpy array.
      model_cfg: ``config.model`` of the target model (e.g. from
        ``model_config_from_official_kwargs``).

    Returns:
      Nested dict of numpy arrays in ``param_dtype``, ready for ``model.apply`` or
      ``jax.device_put`` with shardings.

    Raises:
      ValueError: listing every missing, unexpected and mis-shaped tensor.
    """
    expected = traverse_util.flatten_dict(abstract_params(model_cfg))
    out, seen, unexpected, misshaped = {}, set(), [], []
    for name, value in state_dict.items():
        arr = _to_numpy(value)
        path = official_name_to_path(name, arr.ndim)
        if path not in expected:
            unexpected.append(name)
            continue
        seen.add(path)
        want = expected[path]
        converted = _from_official(arr, _kind(path, want.ndim), tuple(want.shape))
        if converted.shape != tuple(want.shape):
            misshaped.append(
                f"{name}: official {arr.shape} gives {converted.shape}, "
                f"model needs {tuple(want.shape)}"
            )
            continue
        out[path] = np.asarray(converted, dtype=want.dtype)
    missing = [path_to_official_name(p) for p in expected if p not in seen]
    _fail(
        f"The state dict does not fit model {model_cfg.name!r} "
        "(check the model kwargs: sizes, depth, separate/enable_panoptic, mlp_time_embed)",
        missing,
        unexpected,
        misshaped,
    )
    return traverse_util.unflatten_dict(out)


def params_to_official(params: Mapping[str, Any], model_cfg: Any) -> dict[str, np.ndarray]:
    """Converts pdm_jax parameters to an official PyTorch state dict (numpy arrays).

    Args:
      params: parameter tree of the model described by ``model_cfg``.
      model_cfg: ``config.model``.

    Returns:
      Official tensor name → numpy array (``torch.from_numpy`` each to load it).

    Raises:
      ValueError: if ``params`` does not have the model's parameters and shapes.
    """
    expected = traverse_util.flatten_dict(abstract_params(model_cfg))
    flat = traverse_util.flatten_dict(dict(params))
    missing = ["/".join(p) for p in expected if p not in flat]
    unexpected = ["/".join(p) for p in flat if p not in expected]
    misshaped = [
        f"{'/'.join(p)}: {np.shape(v)} vs model {tuple(expected[p].shape)}"
        for p, v in flat.items()
        if p in expected and np.shape(v) != tuple(expected[p].shape)
    ]
    _fail(f"The parameters do not fit model {model_cfg.name!r}", missing, unexpected, misshaped)
    return {
        path_to_official_name(p): _to_official(
            np.asarray(v), _kind(p, np.ndim(v)), _linear_in_dims(p)
        )
        for p, v in flat.items()
    }


def model_config_from_official_kwargs(kwargs: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """``config.model`` for an official ``UViT(**kwargs)`` (U-ViT or PDM ``uvit_t2i``).

    Args:
      kwargs: the official ``config.nnet`` entries (``name`` optional).

    Returns:
      A ConfigDict with the ``config.model`` fields (float32, no remat unless the
      official ``use_checkpoint`` was set, map patch factor 1).

    Raises:
      ValueError: on unknown keys or settings the official checkpoints never use.
    """
    unknown = sorted(set(kwargs) - _KNOWN_KWARGS)
    if unknown:
        raise ValueError(f"Unknown official UViT kwargs {unknown}; known: {sorted(_KNOWN_KWARGS)}.")
    if kwargs.get("name", "uvit_t2i") != "uvit_t2i":
        raise ValueError(
            f"Only the text-to-image 'uvit_t2i' network converts, not {kwargs['name']!r}."
        )
    if kwargs.get("qk_scale") is not None:
        raise ValueError("qk_scale must be None (attention scale 1/√head_dim).")
    if not kwargs.get("conv", True) or not kwargs.get("skip", True):
        raise ValueError("Only conv=True, skip=True (the official U-ViT settings) are supported.")
    if kwargs.get("patch_factor", 1) != 1:
        warnings.warn(
            f"Official patch_factor={kwargs['patch_factor']} is ignored by the official model; "
            "its checkpoints have map patch factor 1.",
            stacklevel=2,
        )
    if not kwargs.get("enable_panoptic", False):
        name = "uvit"
    else:
        name = "two_stream" if kwargs.get("separate", False) else "one_stream"
    c = ml_collections.ConfigDict()
    c.name = name
    c.img_size = int(kwargs.get("img_size", 224))
    c.patch_size = int(kwargs.get("patch_size", 16))
    c.in_chans = int(kwargs.get("in_chans", 3))
    c.embed_dim = int(kwargs.get("embed_dim", 768))
    c.depth = int(kwargs.get("depth", 12))
    c.num_heads = int(kwargs.get("num_heads", 12))
    c.mlp_ratio = float(kwargs.get("mlp_ratio", 4.0))
    c.qkv_bias = bool(kwargs.get("qkv_bias", False))
    c.mlp_time_embed = bool(kwargs.get("mlp_time_embed", False))
    c.clip_dim = int(kwargs.get("clip_dim", 768))
    c.num_clip_token = int(kwargs.get("num_clip_token", 77))
    c.num_bits = int(kwargs.get("num_panoptic_class", 8))
    c.map_patch_factor = 1
    c.use_given_map = bool(kwargs.get("use_ground_truth", False))
    c.dtype = "float32"
    c.param_dtype = "float32"
    c.remat_policy = "full" if kwargs.get("use_checkpoint", False) else "none"
    c.attention = "auto"
    c.pos_embed_init = "trunc_normal"
    c.token_fusion = False
    return c
