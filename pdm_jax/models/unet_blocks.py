"""Building blocks of Stable Diffusion's UNet (diffusers ``UNet2DConditionModel``), NHWC.

Submodule names mirror the diffusers state dict, so a checkpoint converts by a table
(``down_blocks.0.resnets.1.conv1.weight`` ↔ ``down_blocks_0/resnets_1/conv1/kernel``):
``ResnetBlock2D`` (``norm1``, ``conv1``, ``time_emb_proj``, ``norm2``, ``conv2``,
``conv_shortcut``), ``Transformer2DModel`` (``norm``, ``proj_in``,
``transformer_blocks_i``, ``proj_out``), ``BasicTransformerBlock`` (``norm1``/``attn1``,
``norm2``/``attn2``, ``norm3``/``ff``), ``Attention`` (``to_q``, ``to_k``, ``to_v``,
``to_out_0``), GEGLU feed-forward (``ff/net_0/proj``, ``ff/net_2``), and the samplers
(``downsamplers_0/conv``, ``upsamplers_0/conv``).

Initialisers are PyTorch's defaults (``U(±1/√fan_in)`` for Linear/Conv kernels and biases,
norms at 1 and 0). Logical axes: conv kernels ``(None, None, "conv_in", "conv_out")``;
attention and feed-forward kernels ``embed``/``heads``/``mlp``; feature maps are
constrained to ``("batch", None, None, "conv_out")``, tokens to ``("batch", "length",
"embed")``.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from pdm_jax.models.attention import (
    dot_product_attention,
    largest_divisor,
    resolve_implementation,
)
from pdm_jax.models.layers import (
    REMAT_POLICIES,
    Dtype,
    constrain,
    layer_norm,
    torch_conv_bias_init,
    torch_conv_kernel_init,
)

Array = jax.Array

MAP_AXES = ("batch", None, None, "conv_out")
# Transformer2DModel's GroupNorm eps is fixed in diffusers (not the UNet's norm_eps).
TRANSFORMER_NORM_EPS = 1e-6


def constrain_map(x: Array) -> Array:
    """Logical sharding constraint ``(batch, None, None, conv_out)`` on an NHWC map."""
    return nn.with_logical_constraint(x, MAP_AXES)


# XLA:CPU's convolution runs at a third to a half of its matmul speed on small feature maps
# with many channels (SD's 8×8 × 1,280 level). There a convolution as matmuls is faster:
# 3× at 8×8 × 1,280 and 1.2× at 16×16 × 1,280 on the 2-core development CPU, and slower
# from 32×32 up (docs/benchmarks.md). One matmul per kernel tap, accumulated in a scan,
# runs as fast as one matmul of the nine views side by side (im2col) and needs a third of
# its memory: 28 vs 89 MB at 16×16 × 2,560 → 1,280, the decoder's largest.
TAP_MATMUL_MAX_PIXELS = 256
TAP_MATMUL_MIN_CHANNELS = 256

# On CPU the feed-forward runs over blocks of tokens. At SD's 64×64 level the GEGLU
# hidden of one batch-2 call is [2, 4096, 2560] float32 (84 MB), with its gated half
# (42 MB) the largest pair of tensors in the whole forward; XLA holds its temporaries as
# one block for the whole call, so that peak sets the call's memory. Blocks whose hidden
# fits 16 MiB cut it five-fold at no cost in time (docs/benchmarks.md).
FF_BLOCK_BYTES = 16 * 2**20


def feed_forward_rows(
    batch: int,
    length: int,
    hidden: int,
    itemsize: int,
    backend: str | None = None,
    block_bytes: int = FF_BLOCK_BYTES,
) -> int:
    """Tokens per block of the feed-forward's GEGLU hidden ``[batch, rows, hidden]``.

    Args:
      batch: batch size B.
      length: tokens T.
      hidden: width of the GEGLU projection (2 × inner).
      itemsize: bytes per element of the compute dtype.
      backend: JAX's backend name (default: ``jax.default_backend()``).
      block_bytes: budget for one block's hidden on CPU.

    Returns:
      T off CPU or when the whole hidden fits the budget; otherwise the largest divisor of
      T whose block fits it (at least 1).
    """
    backend = jax.default_backend() if backend is None else backend
    target = max(1, block_bytes // (batch * hidden * itemsize))
    return length if backend != "cpu" else largest_divisor(length, target)


def _use_tap_matmuls(lhs, rhs, window_strides, lhs_dilation, rhs_dilation, dims, groups) -> bool:
    specs = (dims.lhs_spec, dims.rhs_spec, dims.out_spec)
    nhwc = specs == ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
    return (
        jax.default_backend() == "cpu"
        and lhs.ndim == 4
        and nhwc
        and groups == 1
        and tuple(window_strides) == (1, 1)
        and tuple(lhs_dilation or (1, 1)) == (1, 1)
        and tuple(rhs_dilation or (1, 1)) == (1, 1)
        and rhs.shape[0] * rhs.shape[1] > 1
        and lhs.shape[1] * lhs.shape[2] <= TAP_MATMUL_MAX_PIXELS
        and lhs.shape[3] >= TAP_MATMUL_MIN_CHANNELS
    )


def conv_general_dilated(
    lhs: Array,
    rhs: Array,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    precision=None,
) -> Array:
    """``lax.conv_general_dilated`` with a matmul path for small CPU feature maps.

    The signature ``nn.Conv`` calls. On CPU, a stride-1, undilated, ungrouped NHWC
    convolution with a kernel larger than 1×1 over at most ``TAP_MATMUL_MAX_PIXELS`` pixels
    and at least ``TAP_MATMUL_MIN_CHANNELS`` input channels becomes ``k×k`` matmuls, one per
    kernel tap (the shifted view of the padded input against ``kernel[i, j]``), summed in
    a ``lax.scan`` so that one view is alive at a time; everything else is XLA's
    convolution. Both compute the same sums (to float32 rounding).
    """
    dims = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    if not isinstance(padding, str) and _use_tap_matmuls(
        lhs, rhs, window_strides, lhs_dilation, rhs_dilation, dims, feature_group_count
    ):
        kh, kw, cin, cout = rhs.shape
        (top, bottom), (left, right) = padding
        x = jnp.pad(lhs, ((0, 0), (top, bottom), (left, right), (0, 0)))
        b, h, w = x.shape[0], x.shape[1] - kh + 1, x.shape[2] - kw + 1

        def tap(acc, k_w):
            k, w_k = k_w
            view = jax.lax.dynamic_slice(x, (0, k // kw, k % kw, 0), (b, h, w, cin))
            return acc + jnp.einsum("bhwc,co->bhwo", view, w_k, precision=precision), None

        init = jnp.zeros((b, h, w, cout), jnp.result_type(lhs.dtype, rhs.dtype))
        taps = (jnp.arange(kh * kw), rhs.reshape(kh * kw, cin, cout))
        return jax.lax.scan(tap, init, taps)[0]
    return jax.lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        precision=precision,
    )


def conv(
    features: int,
    in_features: int,
    kernel: int,
    *,
    dtype: Dtype,
    param_dtype: Dtype,
    name: str,
    stride: int = 1,
    zero_init: bool = False,
    use_bias: bool = True,
) -> nn.Conv:
    """A ``Conv2d(in, out, k, stride, padding=k // 2)`` with PyTorch's initialisers.

    Args:
      features: output channels.
      in_features: input channels (for the bias initialiser's fan-in).
      kernel: square kernel size.
      dtype: computation dtype.
      param_dtype: storage dtype.
      name: submodule name (mirrors diffusers).
      stride: spatial stride.
      zero_init: kernel and bias start at zero (the PDM couplings and map inputs).
      use_bias: whether to add a bias.

    Returns:
      An unbound ``nn.Conv``.
    """
    pad = kernel // 2
    kinit = nn.initializers.zeros_init() if zero_init else torch_conv_kernel_init
    binit = (
        nn.initializers.zeros_init()
        if zero_init
        else torch_conv_bias_init(in_features * kernel * kernel)
    )
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kinit, (None, None, "conv_in", "conv_out")),
        bias_init=nn.with_logical_partitioning(binit, ("conv_out",)),
        conv_general_dilated=conv_general_dilated,
        name=name,
    )


def linear(
    features: int,
    in_features: int,
    axes: tuple[str | None, str | None],
    *,
    dtype: Dtype,
    param_dtype: Dtype,
    name: str,
    use_bias: bool = True,
) -> nn.Dense:
    """A ``Linear(in, out)`` with PyTorch's initialisers (``U(±1/√in)``).

    Args:
      features: output width.
      in_features: input width (for the bias initialiser).
      axes: logical names of the kernel ``(in, out)``; the bias takes ``out``.
      dtype: computation dtype.
      param_dtype: storage dtype.
      name: submodule name (mirrors diffusers).
      use_bias: whether to add a bias.

    Returns:
      An unbound ``nn.Dense``.
    """
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(torch_conv_kernel_init, axes),
        bias_init=nn.with_logical_partitioning(torch_conv_bias_init(in_features), axes[-1:]),
        name=name,
    )


def group_norm(
    groups: int, eps: float, *, dtype: Dtype, param_dtype: Dtype, name: str
) -> nn.GroupNorm:
    """``torch.nn.GroupNorm(groups, C, eps)`` (two-pass variance, as PyTorch computes it)."""
    return nn.GroupNorm(
        num_groups=groups,
        epsilon=eps,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("conv_out",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
        name=name,
    )


class TimestepEmbedding(nn.Module):
    """``linear_1 → SiLU → linear_2`` on the sinusoidal embedding."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, emb: Array) -> Array:
        """``[B, C0] -> [B, features]``."""
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = linear(self.features, emb.shape[-1], (None, "mlp"), name="linear_1", **kw)(emb)
        return linear(self.features, self.features, ("mlp", None), name="linear_2", **kw)(
            nn.silu(h)
        )


class ResnetBlock2D(nn.Module):
    """``x + conv2(silu(norm2(conv1(silu(norm1(x))) + time_emb_proj(silu(temb)))))``.

    ``conv_shortcut`` (1×1) projects ``x`` when the channel count changes; the sum is
    divided by ``output_scale_factor``.
    """

    out_channels: int
    groups: int
    eps: float
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, temb: Array) -> Array:
        """``[B, H, W, Cin], [B, Temb] -> [B, H, W, out_channels]``."""
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        c_in, c = x.shape[-1], self.out_channels
        h = nn.silu(group_norm(self.groups, self.eps, name="norm1", **kw)(x))
        h = conv(c, c_in, 3, name="conv1", **kw)(h)
        t = linear(c, temb.shape[-1], (None, "conv_out"), name="time_emb_proj", **kw)(nn.silu(temb))
        h = h + t[:, None, None, :].astype(h.dtype)
        h = nn.silu(group_norm(self.groups, self.eps, name="norm2", **kw)(h))
        h = conv(c, c, 3, name="conv2", **kw)(h)
        if c_in != c:
            x = conv(c, c_in, 1, name="conv_shortcut", **kw)(x)
        return constrain_map((x + h) / self.output_scale_factor)


def _attend(q: Array, k: Array, v: Array, implementation: str) -> Array:
    """Attention ``[B, T, H, Dh]`` × ``[B, S, H, Dh]``; ``chunked`` needs T = S, so
    cross-attention on CPU takes XLA's kernel (its ``[T, 77]`` logits are small)."""
    impl = resolve_implementation(implementation, q.dtype, head_dim=q.shape[-1])
    if impl == "chunked" and q.shape != k.shape:
        impl = "xla"
    return dot_product_attention(q, k, v, impl)


class Attention(nn.Module):
    """Multi-head attention: ``to_q``/``to_k``/``to_v`` (no bias), ``to_out_0`` (bias).

    Self-attention when ``context`` is None, else cross-attention on the context.
    """

    num_heads: int
    head_dim: int
    attention: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array | None = None) -> Array:
        """``[B, T, D] (, [B, S, Dc]) -> [B, T, D]``."""
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        b, length, d = x.shape
        inner = self.num_heads * self.head_dim
        src = x if context is None else context.astype(x.dtype)
        kv_axes = ("embed", "heads") if context is None else (None, "heads")
        q = linear(inner, d, ("embed", "heads"), use_bias=False, name="to_q", **kw)(x)
        k = linear(inner, src.shape[-1], kv_axes, use_bias=False, name="to_k", **kw)(src)
        v = linear(inner, src.shape[-1], kv_axes, use_bias=False, name="to_v", **kw)(src)
        split = lambda a: a.reshape(b, a.shape[1], self.num_heads, self.head_dim)
        y = _attend(split(q), split(k), split(v), self.attention)  # [B, T, H, Dh]
        y = y.reshape(b, length, inner)
        return linear(d, inner, ("heads", "embed"), name="to_out_0", **kw)(y)


class GEGLU(nn.Module):
    """``proj`` (D → 2·inner) split as (value, gate) → ``value · GELU(gate)`` (exact GELU)."""

    inner: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """``[B, T, D] -> [B, T, inner]``."""
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = linear(2 * self.inner, x.shape[-1], ("embed", "mlp"), name="proj", **kw)(x)
        value, gate = jnp.split(h, 2, axis=-1)
        return value * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """GEGLU feed-forward: ``net_0`` (GEGLU, D → 4D) → ``net_2`` (4D → D).

    Tokens are independent here, so on CPU a long sequence runs in blocks of
    ``feed_forward_rows`` tokens (the same result, a fraction of the memory).
    """

    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """``[B, T, D] -> [B, T, D]``."""
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        b, length, d = x.shape
        inner = self.mult * d
        net_0 = GEGLU(inner, name="net_0", **kw)
        net_2 = linear(d, inner, ("mlp", "embed"), name="net_2", **kw)
        itemsize = jnp.dtype(self.dtype or x.dtype).itemsize  # nn.Dense computes in dtype
        rows = feed_forward_rows(b, length, 2 * inner, itemsize, block_bytes=FF_BLOCK_BYTES)
        if rows == length:
            return net_2(net_0(x))
        blocks = [net_2(net_0(x[:, s : s + rows])) for s in range(0, length, rows)]
        return jnp.concatenate(blocks, axis=1)


class Resample(nn.Module):
    """``downsamplers_0``: 3×3 conv, stride 2, padding 1; ``upsamplers_0``: nearest ×2,
    then 3×3 conv. Submodule ``conv`` mirrors diffusers."""

    up: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """``[B, H, W, C] -> [B, 2H, 2W, C]`` (up) or ``[B, H/2, W/2, C]`` (down)."""
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        c = x.shape[-1]
        if self.up:
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(c, c, 3, stride=1 if self.up else 2, name="conv", **kw)(x)


class BasicTransformerBlock(nn.Module):
    """``x += attn1(norm1 x)``; ``x += attn2(norm2 x, context)``; ``x += ff(norm3 x)``."""

    num_heads: int
    head_dim: int
    attention: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array) -> Array:
        """``[B, T, D], [B, S, Dc] -> [B, T, D]``."""
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        akw = {"num_heads": self.num_heads, "head_dim": self.head_dim, "attention": self.attention}
        x = x + Attention(**akw, name="attn1", **kw)(layer_norm(name="norm1", **kw)(x))
        x = x + Attention(**akw, name="attn2", **kw)(layer_norm(name="norm2", **kw)(x), context)
        x = x + FeedForward(name="ff", **kw)(layer_norm(name="norm3", **kw)(x))
        return constrain(x)


class Transformer2DModel(nn.Module):
    """Spatial transformer: ``norm`` → ``proj_in`` → blocks → ``proj_out``, plus the input.

    ``proj_in``/``proj_out`` are 1×1 convs (SD 1.x) or linears on the tokens
    (``use_linear_projection``, SD 2.x); the GroupNorm eps is 1e-6 as in diffusers.
    """

    num_heads: int
    head_dim: int
    groups: int
    num_layers: int = 1
    use_linear_projection: bool = False
    attention: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array) -> Array:
        """``[B, H, W, C], [B, S, Dc] -> [B, H, W, C]``."""
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        b, height, width, c = x.shape
        inner = self.num_heads * self.head_dim
        h = group_norm(self.groups, TRANSFORMER_NORM_EPS, name="norm", **kw)(x)
        if self.use_linear_projection:
            h = h.reshape(b, height * width, c)
            h = linear(inner, c, (None, "embed"), name="proj_in", **kw)(h)
        else:
            h = conv(inner, c, 1, name="proj_in", **kw)(h).reshape(b, height * width, inner)
        h = constrain(h)
        for i in range(self.num_layers):
            h = BasicTransformerBlock(
                self.num_heads,
                self.head_dim,
                self.attention,
                name=f"transformer_blocks_{i}",
                **kw,
            )(h, context)
        if self.use_linear_projection:
            h = linear(c, inner, ("embed", None), name="proj_out", **kw)(h)
            h = h.reshape(b, height, width, c)
        else:
            h = conv(c, inner, 1, name="proj_out", **kw)(h.reshape(b, height, width, inner))
        return constrain_map(h + x)


def remat_class(cls: type[nn.Module], remat_policy: str) -> type[nn.Module]:
    """``cls`` or its rematerialised version (``none`` | ``full`` | ``dots``, as the U-ViT)."""
    if remat_policy == "none":
        return cls
    if remat_policy == "full":
        return nn.remat(cls)
    if remat_policy == "dots":
        return nn.remat(cls, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    raise ValueError(f"Unknown remat_policy {remat_policy!r}; choose one of {REMAT_POLICIES}.")


class UNetBlock(nn.Module):
    """One down, mid or up block of the UNet (``kind`` ∈ down | mid | up).

    * down (``CrossAttnDownBlock2D`` / ``DownBlock2D``): ``num_layers`` × (resnet
      [+ transformer]), each output kept as a skip; then ``downsamplers_0/conv`` (3×3,
      stride 2, padding 1), its output kept too.
    * mid (``UNetMidBlock2DCrossAttn``): ``resnets_0``, then ``num_layers`` ×
      (transformer, resnet).
    * up (``CrossAttnUpBlock2D`` / ``UpBlock2D``): ``num_layers`` × (concat the last skip
      on the channels, resnet [+ transformer]); then nearest ×2 and ``upsamplers_0/conv``.
    """

    kind: str
    out_channels: int
    num_layers: int
    has_attention: bool
    num_heads: int
    transformer_layers: int
    groups: int
    eps: float
    resample: bool
    use_linear_projection: bool = False
    output_scale_factor: float = 1.0
    remat_policy: str = "none"
    attention: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _transformer(self, name: str) -> nn.Module:
        c = self.out_channels
        if c % self.num_heads:
            raise ValueError(
                f"{self.name}: {c} channels are not divisible by {self.num_heads} attention heads "
                "(diffusers' attention_head_dim gives the head count per block)."
            )
        return remat_class(Transformer2DModel, self.remat_policy)(
            num_heads=self.num_heads,
            head_dim=c // self.num_heads,
            groups=self.groups,
            num_layers=self.transformer_layers,
            use_linear_projection=self.use_linear_projection,
            attention=self.attention,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    def _resnet(self, name: str) -> nn.Module:
        return remat_class(ResnetBlock2D, self.remat_policy)(
            self.out_channels,
            self.groups,
            self.eps,
            self.output_scale_factor,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    @nn.compact
    def __call__(
        self, x: Array, temb: Array, context: Array, skips: Sequence[Array] = ()
    ) -> tuple[Array, list[Array]]:
        """Runs the block.

        Args:
          x: ``[B, H, W, Cin]`` features.
          temb: ``[B, Temb]`` time embedding.
          context: ``[B, S, Dc]`` text features.
          skips: up blocks: the ``num_layers`` skip maps they consume, in push order
            (the last one is concatenated first).

        Returns:
          ``(y, new_skips)``: the block output and, for down blocks, the maps it pushes.
        """
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        pushed: list[Array] = []
        if self.kind == "mid":
            x = self._resnet("resnets_0")(x, temb)
            for i in range(self.num_layers):
                x = self._transformer(f"attentions_{i}")(x, context)
                x = self._resnet(f"resnets_{i + 1}")(x, temb)
            return x, pushed
        if self.kind == "up" and len(skips) != self.num_layers:
            raise ValueError(f"{self.name} takes {self.num_layers} skips, got {len(skips)}.")
        skips = list(skips)
        for i in range(self.num_layers):
            if self.kind == "up":
                x = jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1)
            x = self._resnet(f"resnets_{i}")(x, temb)
            if self.has_attention:
                x = self._transformer(f"attentions_{i}")(x, context)
            pushed.append(x)
        if self.resample:
            name = "upsamplers_0" if self.kind == "up" else "downsamplers_0"
            x = Resample(self.kind == "up", name=name, **kw)(x)
            if self.kind == "down":
                pushed.append(x)
        return constrain_map(x), pushed
