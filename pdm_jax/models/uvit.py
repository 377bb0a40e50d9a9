"""Text-to-image U-ViT (Bao et al.), the image stream of every PDM variant.

Tokens are ``[time(1), context(N), image patches(L)]`` with a learned position embedding;
``depth // 2`` in-blocks push long skips, one mid block, ``depth // 2`` out-blocks pop them
(last in, first out); final LayerNorm; head ``Linear(D, p²·C)`` → un-patchify → 3×3 conv.

``UViTSpec`` holds the hyperparameters shared by the three models, and the helpers below
(conditioning tokens, block stack, heads) create their submodules inside the calling
module's ``@nn.compact`` scope, so every model keeps the official flat parameter names.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from pdm_jax.models.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from pdm_jax.models.layers import (
    REMAT_POLICIES,
    Dtype,
    PatchEmbed,
    block_class,
    constrain,
    constrain_features,
    conv3x3,
    dense,
    layer_norm,
    timestep_embedding,
    trunc_normal_init,
    unpatchify,
)

Array = jax.Array
POS_EMBED_INITS = ("trunc_normal", "sincos")


@dataclasses.dataclass(frozen=True)
class UViTSpec:
    """Hyperparameters of a U-ViT / PDM: the ``config.model`` fields of the same names.

    Each field is documented, with its default, once: in ``pdm_jax.models.spec.ModelSpec``.
    This spec has no defaults of its own; :meth:`from_config` builds it from a
    ``ModelSpec`` (or any object with these attributes). ``depth`` counts the blocks
    minus the middle one (``depth // 2`` in, 1 mid, ``depth // 2`` out, as in the
    official code); the map is ``map_patch_factor·img_size`` wide, patched with
    ``map_patch_factor·patch_size``.
    """

    img_size: int
    patch_size: int
    in_chans: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    qkv_bias: bool
    mlp_time_embed: bool
    clip_dim: int
    num_clip_token: int
    num_bits: int
    map_patch_factor: int
    use_given_map: bool
    remat_policy: str
    attention: str
    pos_embed_init: str
    token_fusion: bool

    def __post_init__(self):
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size {self.img_size} must be a multiple of patch_size {self.patch_size}."
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim {self.embed_dim} must be a multiple of num_heads {self.num_heads}."
            )
        if self.map_patch_factor < 1:
            raise ValueError(
                f"map_patch_factor must be ≥ 1 (1, 2 or 4), got {self.map_patch_factor}."
            )
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"Unknown remat_policy {self.remat_policy!r}; choose one of {REMAT_POLICIES}."
            )
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"Unknown attention {self.attention!r}; choose one of {ATTENTION_IMPLEMENTATIONS}."
            )
        if self.pos_embed_init not in POS_EMBED_INITS:
            raise ValueError(
                f"Unknown pos_embed_init {self.pos_embed_init!r}; choose one of {POS_EMBED_INITS}."
            )
        if self.pos_embed_init == "sincos" and self.embed_dim % 4:
            raise ValueError(
                f"pos_embed_init='sincos' needs embed_dim divisible by 4, got {self.embed_dim}."
            )

    @classmethod
    def from_config(cls, model_cfg: Any) -> "UViTSpec":
        """Reads the spec fields from ``config.model`` (a ConfigDict or any attribute bag).

        Args:
          model_cfg: object with the ``UViTSpec`` field names as attributes.

        Returns:
          The spec.
        """
        values = {}
        for field in dataclasses.fields(cls):
            if not hasattr(model_cfg, field.name):
                raise ValueError(f"Model config lacks the field {field.name!r}.")
            values[field.name] = field.type(getattr(model_cfg, field.name))
        return cls(**values)

    @property
    def block_kwargs(self) -> dict[str, Any]:
        """Constructor arguments every transformer block of this model shares."""
        return {
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "qkv_bias": self.qkv_bias,
            "attention": self.attention,
        }

    @property
    def extras(self) -> int:
        """Time + context tokens in front of the patches."""
        return 1 + self.num_clip_token

    @property
    def num_patches(self) -> int:
        """Image tokens L (= map tokens)."""
        return (self.img_size // self.patch_size) ** 2

    @property
    def map_size(self) -> int:
        """Map side ``f·S``."""
        return self.map_patch_factor * self.img_size

    @property
    def map_patch(self) -> int:
        """Map patch ``f·p``."""
        return self.map_patch_factor * self.patch_size


def check_inputs(spec: UViTSpec, x: Array, m: Array | None, t: Array, context: Array) -> None:
    """Raises ``ValueError`` naming the first input whose shape does not fit ``spec``."""
    b = x.shape[0]
    s, c = spec.img_size, spec.in_chans
    if x.shape != (b, s, s, c):
        raise ValueError(f"x_t has shape {x.shape}; expected NHWC [B, {s}, {s}, {c}].")
    if m is not None and m.shape != (b, spec.map_size, spec.map_size, spec.num_bits):
        raise ValueError(
            f"m_t has shape {m.shape}; expected NHWC [{b}, {spec.map_size}, {spec.map_size}, "
            f"{spec.num_bits}] (map side = map_patch_factor × img_size)."
        )
    if t.shape != (b,):
        raise ValueError(f"t has shape {t.shape}; expected [{b}] (one timestep per example).")
    if context.shape != (b, spec.num_clip_token, spec.clip_dim):
        raise ValueError(
            f"context has shape {context.shape}; expected "
            f"[{b}, {spec.num_clip_token}, {spec.clip_dim}]."
        )


def sincos_2d(grid: int, dim: int) -> np.ndarray:
    """The 2-D sine-cosine position table of a ``grid × grid`` patch grid (row-major).

    Half of the channels encode the patch row, half its column, each as ``[sin, cos]`` of
    the position times ``10000^(−k/(dim/4))``, k = 0 … dim/4 − 1 (as in MAE and DiT).

    Args:
      grid: patches per side.
      dim: channels, a multiple of 4.

    Returns:
      float32 ``[grid², dim]``.
    """
    freqs = 1.0 / 10000.0 ** (np.arange(dim // 4) / (dim // 4))
    angles = np.arange(grid)[:, None] * freqs[None]  # [grid, dim/4]
    one_axis = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)  # [grid, dim/2]
    rows = np.repeat(one_axis, grid, axis=0)  # token r·grid + c → row r
    cols = np.tile(one_axis, (grid, 1))  # → column c
    return np.concatenate([rows, cols], axis=1).astype(np.float32)


def position_embedding(
    module: nn.Module, name: str, length: int, spec: UViTSpec, extras: int | None = None
) -> Array:
    """Learned ``[1, length, D]`` position embedding owned by ``module``.

    Initialised trunc-normal (.02); with ``spec.pos_embed_init == "sincos"`` the rows after
    the first ``extras`` (the patch tokens: one image grid, or image then map grid) start
    from :func:`sincos_2d` instead, repeated for each grid.

    Args:
      module: the model whose parameter it is (needs ``dtype`` and ``param_dtype``).
      name: parameter name (``pos_embed`` or ``pos_embed_mask``).
      length: number of tokens.
      spec: model hyperparameters.
      extras: leading non-patch rows (time and text tokens); default ``spec.extras``.

    Returns:
      ``[1, length, D]`` embedding in the computation dtype.
    """
    extras = spec.extras if extras is None else extras

    def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        value = trunc_normal_init(key, shape, dtype)
        if spec.pos_embed_init != "sincos":
            return value
        table = sincos_2d(spec.img_size // spec.patch_size, shape[-1])
        grids, rest = divmod(shape[1] - extras, table.shape[0])
        if rest or grids < 1:
            raise ValueError(
                f"{name}: {shape[1] - extras} rows after the {extras} extras are not whole "
                f"{table.shape[0]}-token patch grids."
            )
        return value.at[0, extras:].set(jnp.asarray(np.tile(table, (grids, 1)), dtype))

    init = nn.with_logical_partitioning(init, (None, None, "embed"))
    pos = module.param(name, init, (1, length, spec.embed_dim), module.param_dtype)
    return pos.astype(module.dtype)


def conditioning_tokens(spec: UViTSpec, t: Array, context: Array, kw: dict) -> Array:
    """Time token and projected text tokens, ``[B, 1 + N, D]``.

    Args:
      spec: model hyperparameters.
      t: ``[B]`` timesteps in model units.
      context: ``[B, N, clip_dim]`` text features.
      kw: ``dtype`` / ``param_dtype`` for the submodules.

    Returns:
      ``[B, 1 + N, D]`` tokens in the computation dtype.
    """
    d = spec.embed_dim
    time = timestep_embedding(t, d).astype(kw["dtype"])  # [B, D]
    if spec.mlp_time_embed:
        time = dense(4 * d, ("embed", "mlp"), name="time_embed_0", **kw)(time)
        time = dense(d, ("mlp", "embed"), name="time_embed_2", **kw)(nn.silu(time))
    ctx = dense(d, (None, "embed"), name="context_embed", **kw)(context)  # [B, N, D]
    return jnp.concatenate([time[:, None], ctx.astype(time.dtype)], axis=1)


def block_stack(spec: UViTSpec, x: Array, kw: dict) -> Array:
    """The U-shaped stack ``in_blocks_i`` → ``mid_block`` → ``out_blocks_i`` with long skips.

    Args:
      spec: model hyperparameters.
      x: ``[B, T, D]`` tokens.
      kw: ``dtype`` / ``param_dtype`` for the blocks.

    Returns:
      ``[B, T, D]`` tokens (before the final norm).
    """
    blk = block_class(spec.remat_policy)
    bkw = spec.block_kwargs
    skips = []
    for i in range(spec.depth // 2):
        x = blk(name=f"in_blocks_{i}", **bkw, **kw)(x)
        skips.append(x)
    x = blk(name="mid_block", **bkw, **kw)(x)
    for i in range(spec.depth // 2):
        x = blk(skip=True, name=f"out_blocks_{i}", **bkw, **kw)(x, skips.pop())
    return x


def image_head(spec: UViTSpec, tokens: Array, kw: dict) -> Array:
    """``decoder_pred`` → un-patchify → ``final_layer``: ``[B, L, D] -> [B, S, S, C]``."""
    p, c = spec.patch_size, spec.in_chans
    y = dense(p * p * c, ("embed", None), name="decoder_pred", **kw)(tokens)  # [B, L, p²C]
    y = unpatchify(y, p, c)  # [B, S, S, C]
    return constrain_features(conv3x3(c, c, name="final_layer", **kw)(constrain_features(y)))


def map_head(spec: UViTSpec, tokens: Array, kw: dict) -> Array:
    """``decoder_pred_mask`` → un-patchify → ``final_layer_mask`` → tanh.

    Args:
      spec: model hyperparameters.
      tokens: ``[B, L, D]`` map tokens.
      kw: ``dtype`` / ``param_dtype`` for the submodules.

    Returns:
      ``[B, f·S, f·S, num_bits]`` map prediction in (−1, 1).
    """
    fp, bits = spec.map_patch, spec.num_bits
    y = dense(fp * fp * bits, ("embed", None), name="decoder_pred_mask", **kw)(tokens)
    y = constrain_features(unpatchify(y, fp, bits))  # [B, fS, fS, bits]
    return jnp.tanh(constrain_features(conv3x3(bits, bits, name="final_layer_mask", **kw)(y)))


class UViT(nn.Module):
    """Plain text-to-image U-ViT; ``__call__`` returns the predicted noise only."""

    spec: UViTSpec
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_t: Array, m_t: None, t: Array, context: Array) -> Array:
        """Predicts ε.

        Args:
          x_t: ``[B, S, S, C]`` noisy latent (NHWC).
          m_t: must be ``None`` (the signature is shared with the PDMs).
          t: ``[B]`` timesteps in model units (1..1000).
          context: ``[B, N, clip_dim]`` text features.

        Returns:
          ``[B, S, S, C]`` float32 ε prediction.
        """
        spec = self.spec
        if m_t is not None:
            raise ValueError("The plain U-ViT takes no map: call it with m_t=None.")
        check_inputs(spec, x_t, None, t, context)
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        img = PatchEmbed(spec.patch_size, spec.embed_dim, name="patch_embed", **kw)(x_t)
        x = jnp.concatenate([conditioning_tokens(spec, t, context, kw), img], axis=1)
        x = constrain(x + position_embedding(self, "pos_embed", x.shape[1], spec))  # [B, E+L, D]
        x = block_stack(spec, x, kw)
        x = layer_norm(name="norm", **kw)(x)
        return image_head(spec, x[:, spec.extras :], kw).astype(jnp.float32)
