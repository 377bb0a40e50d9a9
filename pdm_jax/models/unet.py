"""Stable Diffusion's UNet (diffusers ``UNet2DConditionModel``) in Linen, NHWC.

``UNetSpec.from_diffusers(config_dict)`` reads a diffusers ``unet/config.json``;
``UNet2DConditionModel(spec)`` builds the topology: ``conv_in`` → down blocks (resnets
with the time embedding, spatial transformers with self-, cross-attention and GEGLU,
stride-2 ``downsamplers``) → ``mid_block`` → up blocks (skip maps concatenated, last in
first out; nearest ×2 ``upsamplers``) → ``conv_norm_out`` → SiLU → ``conv_out``.
Parameter paths mirror the diffusers state dict (``down_blocks_0/attentions_1/proj_in``
↔ ``down_blocks.0.attentions.1.proj_in``); see ``pdm_jax.convert.diffusers_unet``.

The helpers ``embed_input``, ``stage_blocks``, ``run_stage`` and ``output_head`` create
their submodules in the calling module's scope (with an optional name prefix), so the
PDM-UNets (``pdm_jax.models.unet_pdm``) reuse them and keep the plain UNet's names for
their image stream.
"""

import dataclasses
import json
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from pdm_jax.models.layers import Dtype, timestep_embedding
from pdm_jax.models.unet_blocks import (
    TimestepEmbedding,
    UNetBlock,
    constrain_map,
    conv,
    group_norm,
)

Array = jax.Array

CONFIG_DIR = pathlib.Path(__file__).resolve().parent / "unet_configs"
# Packaged diffusers configs: SD 1.x (v1-5) and SD 2.x (v2-1), two tiny test models, and
# the synthetic-world demo UNet.
PACKAGED = ("sd1", "sd2", "tiny_sd1", "tiny_sd2", "demo_unet", "demo_unet_tiny")
DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}

# diffusers UNet2DConditionModel arguments this port implements only at one value:
# key -> the supported value (the diffusers default).
_FIXED = {
    "center_input_sample": False,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "downsample_padding": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}
# Keys that change nothing in this port: upcast_attention (softmax is float32 already).
_NO_EFFECT = {"upcast_attention"}
_DEFAULTS = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": list(
        ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    ),
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "mid_block_scale_factor": 1.0,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "attention_head_dim": 8,
    "use_linear_projection": False,
    "resnet_out_scale_factor": 1.0,
}


def load_packaged_config(name: str) -> dict[str, Any]:
    """One of the packaged diffusers ``config.json`` dicts (``PACKAGED``).

    Args:
      name: ``sd1``, ``sd2``, ``tiny_sd1`` or ``tiny_sd2``.

    Returns:
      The config dict.

    Raises:
      ValueError: for an unknown name.
    """
    if name not in PACKAGED:
        raise ValueError(f"Unknown packaged UNet config {name!r}; choose one of {PACKAGED}.")
    return json.loads((CONFIG_DIR / f"{name}.json").read_text())


def resolve_config(value: str) -> dict[str, Any]:
    """A diffusers UNet config from ``config.model.unet_config``.

    Args:
      value: a packaged name (``sd1``, ``sd2``, ``tiny_sd1``, ``tiny_sd2``), a path to a
        ``config.json`` (or to the ``unet/`` directory holding it), or the JSON text.

    Returns:
      The config dict.

    Raises:
      ValueError: when ``value`` is none of these.
    """
    value = value.strip()
    if value in PACKAGED:
        return load_packaged_config(value)
    if value.startswith("{"):
        return json.loads(value)
    path = pathlib.Path(value)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return json.loads(path.read_text())
    raise ValueError(
        f"model.unet_config={value!r} is not a packaged config {PACKAGED}, an existing "
        "config.json (or unet/ directory) nor JSON text."
    )


def _per_block(value: Any, n: int, key: str) -> tuple[int, ...]:
    """An int broadcast to ``n`` blocks, or a list of ``n`` ints."""
    if isinstance(value, int):
        return (value,) * n
    values = tuple(int(v) for v in value)
    if len(values) != n:
        raise ValueError(f"UNet config {key}={list(values)} must have one entry per block ({n}).")
    return values


@dataclasses.dataclass(frozen=True)
class UNetSpec:
    """The UNet topology, from a diffusers ``UNet2DConditionModel`` config.

    Attributes:
      sample_size: latent side the model was trained at (informative).
      in_channels: latent channels in.
      out_channels: ε channels out.
      block_out_channels: channels per resolution level.
      down_block_types: diffusers block names (``CrossAttnDownBlock2D`` / ``DownBlock2D``).
      up_block_types: ``CrossAttnUpBlock2D`` / ``UpBlock2D``, deepest level first.
      layers_per_block: resnets per down block (up blocks have one more).
      num_heads: attention heads per level (diffusers' ``attention_head_dim``, which is a
        head count in every SD config).
      transformer_layers: transformer blocks per spatial transformer, per level.
      cross_attention_dim: text feature width.
      norm_num_groups: GroupNorm groups.
      norm_eps: GroupNorm eps of the resnets and the output norm.
      use_linear_projection: linear (SD 2.x) instead of 1×1-conv ``proj_in``/``proj_out``.
      flip_sin_to_cos: ``[cos, sin]`` time embedding order.
      freq_shift: diffusers' ``downscale_freq_shift`` of the time embedding.
      mid_block_scale_factor: output scale of the mid-block resnets.
      resnet_out_scale_factor: output scale of the other resnets.
      source: the config as canonical JSON (what ``to_diffusers`` gives back).
    """

    sample_size: int
    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    layers_per_block: int
    num_heads: tuple[int, ...]
    transformer_layers: tuple[int, ...]
    cross_attention_dim: int
    norm_num_groups: int
    norm_eps: float
    use_linear_projection: bool
    flip_sin_to_cos: bool
    freq_shift: float
    mid_block_scale_factor: float
    resnet_out_scale_factor: float
    source: str

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> "UNetSpec":
        """Reads a diffusers ``UNet2DConditionModel`` config dict.

        Args:
          config: the parsed ``config.json`` (keys starting with ``_`` are ignored).

        Returns:
          The spec.

        Raises:
          ValueError: naming every key this port does not know or implements only at
            another value, and inconsistent block lists.
        """
        known = set(_FIXED) | _NO_EFFECT | set(_DEFAULTS)
        unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
        unsupported = [
            f"{k}={config[k]!r} (supported: {v!r})"
            for k, v in _FIXED.items()
            if k in config and config[k] != v
        ]
        if unknown or unsupported:
            raise ValueError(
                "The UNet config has settings this port does not implement: "
                + "; ".join([f"unknown keys {unknown}"] * bool(unknown) + unsupported)
                + ". Only the Stable Diffusion 1.x/2.x UNet2DConditionModel topology converts."
            )
        c = {**_DEFAULTS, **{k: v for k, v in config.items() if k in _DEFAULTS}}
        channels = tuple(int(v) for v in c["block_out_channels"])
        n = len(channels)
        down, up = tuple(c["down_block_types"]), tuple(c["up_block_types"])
        bad = [b for b in down if b not in DOWN_TYPES] + [b for b in up if b not in UP_TYPES]
        if bad:
            raise ValueError(
                f"Unsupported UNet block types {bad}; known: {list(DOWN_TYPES) + list(UP_TYPES)}."
            )
        if len(down) != n or len(up) != n:
            raise ValueError(
                f"UNet config: {len(down)} down and {len(up)} up block types for {n} "
                "block_out_channels; they must all be the same length."
            )
        canonical = {k: v for k, v in config.items() if not k.startswith("_")}
        return cls(
            sample_size=int(c["sample_size"]),
            in_channels=int(c["in_channels"]),
            out_channels=int(c["out_channels"]),
            block_out_channels=channels,
            down_block_types=down,
            up_block_types=up,
            layers_per_block=int(c["layers_per_block"]),
            num_heads=_per_block(c["attention_head_dim"], n, "attention_head_dim"),
            transformer_layers=_per_block(
                c["transformer_layers_per_block"], n, "transformer_layers_per_block"
            ),
            cross_attention_dim=int(c["cross_attention_dim"]),
            norm_num_groups=int(c["norm_num_groups"]),
            norm_eps=float(c["norm_eps"]),
            use_linear_projection=bool(c["use_linear_projection"]),
            flip_sin_to_cos=bool(c["flip_sin_to_cos"]),
            freq_shift=float(c["freq_shift"]),
            mid_block_scale_factor=float(c["mid_block_scale_factor"]),
            resnet_out_scale_factor=float(c["resnet_out_scale_factor"]),
            source=json.dumps(canonical, sort_keys=True),
        )

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers ``config.json`` dict (with ``_class_name``)."""
        return {"_class_name": "UNet2DConditionModel", **json.loads(self.source)}

    @property
    def num_levels(self) -> int:
        """Resolution levels (= down blocks = up blocks)."""
        return len(self.block_out_channels)

    @property
    def downsample_factor(self) -> int:
        """Input side / deepest feature side (the latent side must be a multiple)."""
        return 2 ** (self.num_levels - 1)

    @property
    def time_embed_dim(self) -> int:
        """Width of the time embedding (4 × the first level's channels)."""
        return 4 * self.block_out_channels[0]


def channels(spec: UNetSpec, width: float = 1.0) -> tuple[int, ...]:
    """Per-level channels scaled by ``width`` (the map stream's multiplier)."""
    return tuple(round(c * width) for c in spec.block_out_channels)


def check_width(spec: UNetSpec, width: float) -> None:
    """Raises ``ValueError`` unless every scaled level divides into groups and heads."""
    for level, c in enumerate(channels(spec, width)):
        if c % spec.norm_num_groups or c % spec.num_heads[level]:
            raise ValueError(
                f"map_width_multiplier={width} gives {c} channels at level {level}, not a "
                f"multiple of norm_num_groups={spec.norm_num_groups} and "
                f"{spec.num_heads[level]} heads; pick a multiplier that keeps both."
            )


def stage_blocks(
    spec: UNetSpec,
    common: Mapping[str, Any],
    prefix: str = "",
    width: float = 1.0,
) -> list[tuple[str, nn.Module]]:
    """The down blocks, the mid block and the up blocks, in execution order.

    Args:
      spec: the topology.
      common: ``remat_policy``, ``attention``, ``dtype`` and ``param_dtype``.
      prefix: prepended to the submodule names (``map_`` for a map stream).
      width: channel multiplier (1 for the image stream).

    Returns:
      ``[(kind, block)]`` with ``kind`` ∈ down | mid | up, unbound until called inside
      the caller's compact scope.
    """
    ch = channels(spec, width)
    shared = {
        "groups": spec.norm_num_groups,
        "eps": spec.norm_eps,
        "use_linear_projection": spec.use_linear_projection,
        **common,
    }
    n = spec.num_levels
    out = []
    for i, kind in enumerate(spec.down_block_types):
        block = UNetBlock(
            kind="down",
            out_channels=ch[i],
            num_layers=spec.layers_per_block,
            has_attention=DOWN_TYPES[kind],
            num_heads=spec.num_heads[i],
            transformer_layers=spec.transformer_layers[i],
            resample=i < n - 1,
            output_scale_factor=spec.resnet_out_scale_factor,
            name=f"{prefix}down_blocks_{i}",
            **shared,
        )
        out.append(("down", block))
    mid = UNetBlock(
        kind="mid",
        out_channels=ch[-1],
        num_layers=1,
        has_attention=True,
        num_heads=spec.num_heads[-1],
        transformer_layers=spec.transformer_layers[-1],
        resample=False,
        output_scale_factor=spec.mid_block_scale_factor,
        name=f"{prefix}mid_block",
        **shared,
    )
    out.append(("mid", mid))
    for i, kind in enumerate(spec.up_block_types):
        level = n - 1 - i
        block = UNetBlock(
            kind="up",
            out_channels=ch[level],
            num_layers=spec.layers_per_block + 1,
            has_attention=UP_TYPES[kind],
            num_heads=spec.num_heads[level],
            transformer_layers=spec.transformer_layers[level],
            resample=i < n - 1,
            output_scale_factor=spec.resnet_out_scale_factor,
            name=f"{prefix}up_blocks_{i}",
            **shared,
        )
        out.append(("up", block))
    return out


def embed_input(
    spec: UNetSpec, x: Array, t: Array, kw: Mapping[str, Any], prefix: str = "", width: float = 1.0
) -> tuple[Array, Array]:
    """``conv_in`` on the input and the time embedding (``time_embedding``).

    Args:
      spec: the topology.
      x: ``[B, H, W, Cin]`` input.
      t: ``[B]`` discrete timesteps (diffusers' convention; any float allowed).
      kw: ``dtype`` / ``param_dtype``.
      prefix: submodule name prefix.
      width: channel multiplier.

    Returns:
      ``(h [B, H, W, C0], temb [B, 4·C0])``.
    """
    c0 = channels(spec, width)[0]
    emb = timestep_embedding(
        t, c0, flip_sin_to_cos=spec.flip_sin_to_cos, freq_shift=spec.freq_shift
    ).astype(kw["dtype"])
    temb = TimestepEmbedding(4 * c0, name=f"{prefix}time_embedding", **kw)(emb)
    h = conv(c0, x.shape[-1], 3, name=f"{prefix}conv_in", **kw)(x)
    return constrain_map(h), temb


def run_stage(
    kind: str, block: nn.Module, h: Array, temb: Array, context: Array, skips: list[Array]
) -> Array:
    """Runs one block, pushing (down) or popping (up) skip maps in ``skips`` in place."""
    if kind == "up":
        n = block.num_layers
        taken = skips[-n:]
        del skips[-n:]
        h, _ = block(h, temb, context, taken)
        return h
    h, pushed = block(h, temb, context)
    skips.extend(pushed)
    return h


def output_head(
    spec: UNetSpec, h: Array, kw: Mapping[str, Any], prefix: str = "", features: int | None = None
) -> Array:
    """``conv_norm_out`` → SiLU → ``conv_out`` (3×3) to ``features`` (default ε's channels)."""
    h = nn.silu(
        group_norm(spec.norm_num_groups, spec.norm_eps, name=f"{prefix}conv_norm_out", **kw)(h)
    )
    out = spec.out_channels if features is None else features
    return conv(out, h.shape[-1], 3, name=f"{prefix}conv_out", **kw)(h)


def check_unet_inputs(
    spec: UNetSpec, x: Array, t: Array, context: Array, in_channels: int | None = None
) -> None:
    """Raises ``ValueError`` naming the first input that does not fit ``spec``."""
    b, h, w, c = x.shape
    want = spec.in_channels if in_channels is None else in_channels
    f = spec.downsample_factor
    if c != want or h % f or w % f:
        raise ValueError(
            f"x_t has shape {x.shape}; expected NHWC [B, H, W, {want}] with H and W multiples "
            f"of {f} (the UNet halves the side {spec.num_levels - 1} times)."
        )
    if t.shape != (b,):
        raise ValueError(f"t has shape {t.shape}; expected [{b}] (one timestep per example).")
    if context.ndim != 3 or context.shape[0] != b or context.shape[2] != spec.cross_attention_dim:
        raise ValueError(
            f"context has shape {context.shape}; expected [{b}, N, "
            f"{spec.cross_attention_dim}] (the UNet's cross_attention_dim)."
        )


class UNet2DConditionModel(nn.Module):
    """Text-conditioned SD UNet; ``__call__`` returns ε (NHWC).

    Attributes:
      spec: the topology (``UNetSpec.from_diffusers``).
      remat_policy: ``none`` | ``full`` | ``dots`` rematerialisation of the resnets and
        spatial transformers.
      attention: attention kernel (``pdm_jax.models.attention``).
      dtype: computation dtype.
      param_dtype: storage dtype.
    """

    spec: UNetSpec
    remat_policy: str = "none"
    attention: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_t: Array, m_t: None, t: Array, context: Array) -> Array:
        """Predicts ε.

        Args:
          x_t: ``[B, H, W, C]`` noisy latent (NHWC).
          m_t: must be ``None`` (the signature is shared with the PDMs).
          t: ``[B]`` discrete timesteps as diffusers takes them (0..999).
          context: ``[B, N, cross_attention_dim]`` text features.

        Returns:
          ``[B, H, W, out_channels]`` float32 ε prediction.
        """
        if m_t is not None:
            raise ValueError("The plain UNet takes no map: call it with m_t=None.")
        spec = self.spec
        check_unet_inputs(spec, x_t, t, context)
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        common = {"remat_policy": self.remat_policy, "attention": self.attention, **kw}
        context = context.astype(self.dtype)
        h, temb = embed_input(spec, x_t, t, kw)
        skips = [h]
        for kind, block in stage_blocks(spec, common):
            h = run_stage(kind, block, h, temb, context, skips)
        return output_head(spec, h, kw).astype(jnp.float32)
