"""Building blocks of the U-ViT family: embeddings, attention, MLP, transformer block, heads.

Everything follows the official PyTorch U-ViT (``libs/uvit_t2i.py``) so that checkpoints
convert by a name table: same submodule names, same initialisers, LayerNorm eps 1e-5,
exact (erf) GELU, qkv split as ``(3, heads, head_dim)``. Arrays are NHWC / ``[B, L, D]``.

Logical axis names used for sharding annotations (``pdm_jax.sharding.LOGICAL_AXIS_RULES``
maps them to mesh axes):

* parameters: ``embed`` (model width D), ``mlp`` (MLP hidden), ``heads`` (attention
  heads), ``kv`` (head width), ``conv_in`` / ``conv_out`` (conv kernel channels, kernels
  ``(None, None, conv_in, conv_out)``); small dims are ``None``. The fused ``qkv`` kernel
  is ``[D, 3, H, Dh]`` and ``proj``'s is ``[H, Dh, D]``, so both split by heads.
* activations: ``batch``, ``length`` (tokens), ``embed``, ``heads``/``kv`` inside
  attention, ``mlp`` inside the MLP.
"""

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from pdm_jax.models.attention import dot_product_attention

Array = jax.Array
Dtype = jnp.dtype | type

LN_EPS = 1e-5
MAX_PERIOD = 10_000
ACT_AXES = ("batch", "length", "embed")
HEAD_AXES = ("batch", "length", "heads", "kv")
MLP_AXES = ("batch", "length", "mlp")
CONV_AXES = (None, None, "conv_in", "conv_out")
FEATURE_AXES = ("batch", None, None, "conv_out")  # NHWC feature maps
REMAT_POLICIES = ("none", "full", "dots")

# Official U-ViT: timm trunc_normal_(std=.02) on Linear weights and position embeddings,
# whose cut-offs a=-2, b=2 are absolute, i.e. ±100σ: in effect a plain N(0, .02²).
trunc_normal_init = nn.initializers.truncated_normal(stddev=0.02, lower=-100.0, upper=100.0)
# PyTorch Conv2d default: kaiming_uniform(a=√5) = U(±1/√fan_in) for the kernel.
torch_conv_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_conv_bias_init(fan_in: int) -> Callable[..., Array]:
    """PyTorch Conv2d default bias initialiser, ``U(±1/√fan_in)``.

    Args:
      fan_in: input channels × kernel area of the convolution.

    Returns:
      A flax initialiser ``(key, shape, dtype) -> Array``.
    """
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def timestep_embedding(
    t: Array,
    dim: int,
    max_period: float = MAX_PERIOD,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
) -> Array:
    """Sinusoidal timestep embedding ``[cos(t·ω_k), sin(t·ω_k)]``, ``ω_k = P^(-k/(half - s))``.

    With the defaults it matches the official U-ViT ``timestep_embedding`` (float32
    frequencies, cosine half first); ``flip_sin_to_cos`` and ``freq_shift`` (``s``) give
    diffusers' ``get_timestep_embedding`` for the UNets. A zero column is appended when
    ``dim`` is odd.

    Args:
      t: ``[B]`` timesteps in model units (n ∈ 1..1000; fractional values allowed).
      dim: embedding width.
      max_period: ``P``, sets the lowest frequency.
      flip_sin_to_cos: ``[cos, sin]`` order if True, else ``[sin, cos]``.
      freq_shift: diffusers' ``downscale_freq_shift``.

    Returns:
      ``[B, dim]`` float32 embedding.
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None]  # [B, half]
    parts = [jnp.cos(args), jnp.sin(args)] if flip_sin_to_cos else [jnp.sin(args), jnp.cos(args)]
    emb = jnp.concatenate(parts, axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def unpatchify(x: Array, patch_size: int, channels: int) -> Array:
    """Tokens back to an image, channel order ``(p1, p2, C)`` per token.

    Args:
      x: ``[B, h·w, p·p·C]`` tokens in row-major ``(h, w)`` order with ``h == w``.
      patch_size: ``p``.
      channels: ``C``.

    Returns:
      ``[B, h·p, w·p, C]`` image (NHWC).
    """
    b, length, width = x.shape
    side = math.isqrt(length)
    if side * side != length or width != patch_size * patch_size * channels:
        raise ValueError(
            f"Cannot unpatchify tokens of shape {x.shape} with patch {patch_size} and "
            f"{channels} channels: need a square token count and width p·p·C."
        )
    x = x.reshape(b, side, side, patch_size, patch_size, channels)  # [B, h, w, p1, p2, C]
    x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, h, p1, w, p2, C]
    return x.reshape(b, side * patch_size, side * patch_size, channels)


def constrain(x: Array) -> Array:
    """Logical sharding constraint ``(batch, length, embed)`` on a token array."""
    return nn.with_logical_constraint(x, ACT_AXES)


def constrain_features(x: Array) -> Array:
    """Logical sharding constraint ``(batch, -, -, conv_out)`` on an NHWC feature map."""
    return nn.with_logical_constraint(x, FEATURE_AXES)


def dense(
    features: int,
    axes: tuple[str | None, str | None],
    *,
    dtype: Dtype,
    param_dtype: Dtype,
    name: str,
    use_bias: bool = True,
    kernel_init: Callable[..., Array] = trunc_normal_init,
) -> nn.Dense:
    """A ``Linear`` as the official code builds it: trunc-normal(.02) kernel, zero bias.

    Args:
      features: output width.
      axes: logical names of the kernel's ``(in, out)`` dims; the bias takes ``out``.
      dtype: computation dtype.
      param_dtype: storage dtype.
      name: submodule name (mirrors the official one).
      use_bias: whether to add a bias.
      kernel_init: kernel initialiser.

    Returns:
      An unbound ``nn.Dense``.
    """
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[-1:]),
        name=name,
    )


def layer_norm(*, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
    """LayerNorm with the PyTorch eps (1e-5), scale 1, bias 0."""
    return nn.LayerNorm(
        epsilon=LN_EPS,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
        name=name,
    )


def conv3x3(features: int, in_features: int, *, dtype: Dtype, param_dtype: Dtype, name: str):
    """The official ``final_layer``: ``Conv2d(C, C, 3, padding=1)`` with PyTorch init."""
    return nn.Conv(
        features,
        (3, 3),
        padding=((1, 1), (1, 1)),
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(torch_conv_kernel_init, CONV_AXES),
        bias_init=nn.with_logical_partitioning(
            torch_conv_bias_init(9 * in_features), CONV_AXES[-1:]
        ),
        name=name,
    )


class PatchEmbed(nn.Module):
    """Conv with kernel = stride = patch; tokens in row-major ``(h, w)`` order.

    Submodule ``proj`` mirrors the official ``PatchEmbed.proj``.
    """

    patch_size: int
    embed_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Embeds ``x [B, H, W, C]`` into ``[B, (H/p)·(W/p), D]`` tokens."""
        b, h, w, c = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"Input of spatial size {h}×{w} is not divisible by patch {p}.")
        y = nn.Conv(
            self.embed_dim,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(torch_conv_kernel_init, CONV_AXES),
            bias_init=nn.with_logical_partitioning(torch_conv_bias_init(p * p * c), CONV_AXES[-1:]),
            name="proj",
        )(x)  # [B, H/p, W/p, D]
        y = constrain_features(y)
        return constrain(y.reshape(b, (h // p) * (w // p), self.embed_dim))


class Projection(nn.Module):
    """A ``Linear`` whose input and output may span several axes (kernel ``in + out``).

    ``[..., *in_shape] -> [..., *features]``: it contracts the last ``num_in`` input axes
    with the kernel's leading ones. It stores the kernel in its multi-axis shape, so each
    axis has its own logical name: the fused attention projection ``[D, 3, H, Dh]`` is
    split by heads. A trunc-normal(.02) kernel equals a flat ``Linear``'s reshaped.

    Attributes:
      features: output shape.
      axes: logical names of the kernel's dims (``num_in`` inputs, then the outputs); the
        bias takes the outputs'.
      num_in: trailing input axes contracted.
      use_bias: whether to add a (zero-initialised) bias.
      kernel_init: kernel initialiser.
      dtype: computation dtype.
      param_dtype: storage dtype.
    """

    features: tuple[int, ...]
    axes: tuple[str | None, ...]
    num_in: int = 1
    use_bias: bool = True
    kernel_init: Callable[..., Array] = trunc_normal_init
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Applies the projection to ``x [..., *in_shape]``."""
        n = self.num_in
        if len(self.axes) != n + len(self.features):
            raise ValueError(
                f"Projection axes {self.axes} must name {n} input and "
                f"{len(self.features)} output dims."
            )
        shape = (*x.shape[x.ndim - n :], *self.features)
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, self.axes),
            shape,
            self.param_dtype,
        )
        bias = None
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros_init(), self.axes[n:]),
                self.features,
                self.param_dtype,
            )
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        contract = (tuple(range(x.ndim - n, x.ndim)), tuple(range(n)))
        y = jax.lax.dot_general(x, kernel, (contract, ((), ())))
        return y if bias is None else y + bias


class Attention(nn.Module):
    """Multi-head self-attention; ``qkv`` output split as ``(3, heads, head_dim)``."""

    num_heads: int
    qkv_bias: bool = False
    attention: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """``[B, L, D] -> [B, L, D]``; ``attention`` picks the kernel (``models.attention``)."""
        d = x.shape[-1]
        h = self.num_heads
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        # Official einops 'B L (K H D)': K (q/k/v) outermost, then heads, then head_dim;
        # the kernel keeps those axes, [D, 3, H, Dh], so it splits by heads.
        qkv = Projection(
            (3, h, d // h),
            ("embed", None, "heads", "kv"),
            use_bias=self.qkv_bias,
            name="qkv",
            **kw,
        )(x)  # [B, L, 3, H, Dh]
        q, k, v = (nn.with_logical_constraint(qkv[:, :, i], HEAD_AXES) for i in range(3))
        y = dot_product_attention(q, k, v, self.attention)  # [B, L, H, Dh]
        y = nn.with_logical_constraint(y, HEAD_AXES)
        return Projection((d,), ("heads", "kv", "embed"), num_in=2, name="proj", **kw)(y)


class Mlp(nn.Module):
    """``fc1 → GELU(erf) → fc2`` (timm ``Mlp`` without dropout)."""

    hidden_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """``[B, L, D] -> [B, L, D]``."""
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = dense(self.hidden_dim, ("embed", "mlp"), name="fc1", **kw)(x)  # [B, L, hidden]
        h = nn.with_logical_constraint(nn.gelu(h, approximate=False), MLP_AXES)
        return dense(x.shape[-1], ("mlp", "embed"), name="fc2", **kw)(h)


class Block(nn.Module):
    """U-ViT block: optional long skip ``Linear(2D→D)``, then pre-LN attention and MLP."""

    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    skip: bool = False
    attention: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, skip: Array | None = None) -> Array:
        """Runs the block.

        Args:
          x: ``[B, L, D]`` tokens.
          skip: ``[B, L, D]`` long-skip tokens; required iff the block was built with
            ``skip=True``.

        Returns:
          ``[B, L, D]`` tokens.
        """
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        d = x.shape[-1]
        if self.skip != (skip is not None):
            raise ValueError(f"Block built with skip={self.skip} needs a matching skip input.")
        if self.skip:
            x = dense(d, (None, "embed"), name="skip_linear", **kw)(
                jnp.concatenate([x, skip], axis=-1)  # [B, L, 2D]
            )
        x = constrain(x)
        x = x + Attention(self.num_heads, self.qkv_bias, self.attention, name="attn", **kw)(
            layer_norm(name="norm1", **kw)(x)
        )
        x = x + Mlp(int(d * self.mlp_ratio), name="mlp", **kw)(layer_norm(name="norm2", **kw)(x))
        return constrain(x)


class ZeroConv(nn.Module):
    """Two-stream map→image projection: the official ``zeroconv`` (1×1 ``Conv1d``, bias).

    A 1×1 convolution over tokens is a ``Dense`` on the last axis; submodule ``conv``
    mirrors the official name. Kernel and bias start at zero (ControlNet-style).
    """

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """``[B, L, D] -> [B, L, D]``."""
        zeros = nn.initializers.zeros_init()
        return nn.Dense(
            x.shape[-1],
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(zeros, ("embed", None)),
            bias_init=nn.with_logical_partitioning(zeros, (None,)),
            name="conv",
        )(x)


def block_class(remat_policy: str) -> type[Block]:
    """``Block`` or its rematerialised version.

    Args:
      remat_policy: ``none`` (store activations), ``full`` (recompute the whole block in
        the backward pass) or ``dots`` (save the outputs of the linear layers; recompute
        attention, whose ``[B, H, T, T]`` logits dominate the memory, and the rest).

    Returns:
      A module class with ``Block``'s constructor and call signature.
    """
    if remat_policy == "none":
        return Block
    if remat_policy == "full":
        return nn.remat(Block)
    if remat_policy == "dots":
        return nn.remat(Block, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    raise ValueError(f"Unknown remat_policy {remat_policy!r}; choose one of {REMAT_POLICIES}.")
