"""Inception-v3 pool features for FID, matching pytorch-fid exactly (NHWC, Flax Linen).

This is the network behind pytorch-fid's ``InceptionV3([3], resize_input=True,
normalize_input=True, use_fid_inception=True)``: the TensorFlow FID Inception
(``pt_inception-2015-12-05`` weights) with its quirks kept:

- input in [0, 1] is resized to 299×299 with PyTorch's ``F.interpolate(mode='bilinear',
  align_corners=False)`` (plain two-tap sampling, no antialiasing even when shrinking;
  ``jax.image.resize`` antialiases, so it is reimplemented here), then mapped to [-1, 1];
- every conv is bias-free and followed by BatchNorm (eps 1e-3, inference statistics) and ReLU;
- the pool branch of the A, C and first E blocks averages over a 3×3 window without counting
  the zero padding; the last E block (``Mixed_7c``) max-pools instead;
- a global average pool gives the 2048-d features; the 1008-class ``fc`` layer is unused.

Submodule names mirror pytorch-fid's state dict (``Mixed_5b.branch1x1.conv.weight`` is
``params['Mixed_5b']['branch1x1']['conv']['kernel']``), so conversion is a table.
"""

import functools
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INCEPTION_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3

# Keys in pytorch-fid's checkpoint that the pool-feature network does not use.
_IGNORED_KEYS = re.compile(r"^(fc\.|AuxLogits\.)|\.num_batches_tracked$")
# Flax leaf name -> PyTorch parameter name, per collection.
_LEAF_TO_TORCH = {
    ("params", "conv", "kernel"): "weight",
    ("params", "bn", "scale"): "weight",
    ("params", "bn", "bias"): "bias",
    ("batch_stats", "bn", "mean"): "running_mean",
    ("batch_stats", "bn", "var"): "running_var",
}


def _torch_linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, ...]:
    """Source indices and weights of PyTorch's bilinear (align_corners=False) sampling.

    Follows ATen's ``area_pixel_compute_source_index`` in float32: the source coordinate is
    ``(dst + 0.5) * scale - 0.5`` with ``scale = float32(in) / out``, clamped at 0, evaluated as
    one fused multiply-add (as the compiled ATen kernels do; emulated exactly here, the float64
    product of two float32 numbers being exact); the two taps are ``floor`` and ``floor + 1``
    (clamped to the last pixel).
    """
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32) + np.float32(0.5)
    src = (np.float64(scale) * dst.astype(np.float64) - 0.5).astype(np.float32)  # fma
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = np.clip(src - i0.astype(np.float32), 0.0, 1.0).astype(np.float32)
    return i0, i1, (np.float32(1) - w1), w1


def resize_bilinear_torch(images: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Resizes like ``torch.nn.functional.interpolate(bilinear, align_corners=False)``.

    Args:
      images: ``[B, H, W, C]`` float array.
      size: output ``(height, width)``.

    Returns:
      ``[B, size[0], size[1], C]`` array of ``images.dtype``. Each output pixel blends the
      two nearest source pixels per axis; shrinking does not antialias (as in PyTorch).
    """
    out = images
    for axis, out_size in ((1, size[0]), (2, size[1])):
        i0, i1, w0, w1 = _torch_linear_taps(out.shape[axis], out_size)
        bshape = [1] * out.ndim
        bshape[axis] = out_size
        w0 = jnp.asarray(w0, out.dtype).reshape(bshape)
        w1 = jnp.asarray(w1, out.dtype).reshape(bshape)
        out = jnp.take(out, i0, axis=axis) * w0 + jnp.take(out, i1, axis=axis) * w1
    return out


class BasicConv2d(nn.Module):
    """Bias-free conv → BatchNorm (eps 1e-3, inference) → ReLU, padding as in PyTorch."""

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)  # symmetric (height, width) padding, as torch
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = self.padding
        x = nn.Conv(
            self.features,
            self.kernel_size,
            strides=self.strides,
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            name="conv",
        )(x)
        x = nn.BatchNorm(
            use_running_average=True,
            epsilon=BN_EPS,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="bn",
        )(x)
        return nn.relu(x)


def _avg_pool_3x3_same(x: jax.Array) -> jax.Array:
    # TensorFlow's average pool ignores the padded zeros (count_include_pad=False).
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class _Block(nn.Module):
    """Shared fields of the Inception blocks."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    def conv(self, features: int, kernel: tuple[int, int], name: str, **kw) -> BasicConv2d:
        return BasicConv2d(
            features,
            kernel,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            name=name,
            **kw,
        )


class FIDInceptionA(_Block):
    """35×35 block (Mixed_5b/c/d) with the padding-excluding average pool."""

    pool_features: int = 32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.conv(64, (1, 1), "branch1x1")(x)
        b5 = self.conv(48, (1, 1), "branch5x5_1")(x)
        b5 = self.conv(64, (5, 5), "branch5x5_2", padding=(2, 2))(b5)
        b3 = self.conv(64, (1, 1), "branch3x3dbl_1")(x)
        b3 = self.conv(96, (3, 3), "branch3x3dbl_2", padding=(1, 1))(b3)
        b3 = self.conv(96, (3, 3), "branch3x3dbl_3", padding=(1, 1))(b3)
        bp = self.conv(self.pool_features, (1, 1), "branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)  # [B, 35, 35, 224 + pool_features]


class InceptionB(_Block):
    """35×35 → 17×17 reduction (Mixed_6a)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.conv(384, (3, 3), "branch3x3", strides=(2, 2))(x)
        bd = self.conv(64, (1, 1), "branch3x3dbl_1")(x)
        bd = self.conv(96, (3, 3), "branch3x3dbl_2", padding=(1, 1))(bd)
        bd = self.conv(96, (3, 3), "branch3x3dbl_3", strides=(2, 2))(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_stride2(x)], axis=-1)  # [B, 17, 17, 768]


class FIDInceptionC(_Block):
    """17×17 block with factorised 7×7 convs (Mixed_6b..6e)."""

    channels_7x7: int = 128

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        b1 = self.conv(192, (1, 1), "branch1x1")(x)
        b7 = self.conv(c7, (1, 1), "branch7x7_1")(x)
        b7 = self.conv(c7, (1, 7), "branch7x7_2", padding=(0, 3))(b7)
        b7 = self.conv(192, (7, 1), "branch7x7_3", padding=(3, 0))(b7)
        bd = self.conv(c7, (1, 1), "branch7x7dbl_1")(x)
        bd = self.conv(c7, (7, 1), "branch7x7dbl_2", padding=(3, 0))(bd)
        bd = self.conv(c7, (1, 7), "branch7x7dbl_3", padding=(0, 3))(bd)
        bd = self.conv(c7, (7, 1), "branch7x7dbl_4", padding=(3, 0))(bd)
        bd = self.conv(192, (1, 7), "branch7x7dbl_5", padding=(0, 3))(bd)
        bp = self.conv(192, (1, 1), "branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)  # [B, 17, 17, 768]


class InceptionD(_Block):
    """17×17 → 8×8 reduction (Mixed_7a)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.conv(192, (1, 1), "branch3x3_1")(x)
        b3 = self.conv(320, (3, 3), "branch3x3_2", strides=(2, 2))(b3)
        b7 = self.conv(192, (1, 1), "branch7x7x3_1")(x)
        b7 = self.conv(192, (1, 7), "branch7x7x3_2", padding=(0, 3))(b7)
        b7 = self.conv(192, (7, 1), "branch7x7x3_3", padding=(3, 0))(b7)
        b7 = self.conv(192, (3, 3), "branch7x7x3_4", strides=(2, 2))(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_stride2(x)], axis=-1)  # [B, 8, 8, 1280]


class FIDInceptionE(_Block):
    """8×8 block: ``use_max_pool=False`` is FIDInceptionE_1 (Mixed_7b), True is E_2 (7c)."""

    use_max_pool: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.conv(320, (1, 1), "branch1x1")(x)
        b3 = self.conv(384, (1, 1), "branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                self.conv(384, (1, 3), "branch3x3_2a", padding=(0, 1))(b3),
                self.conv(384, (3, 1), "branch3x3_2b", padding=(1, 0))(b3),
            ],
            axis=-1,
        )
        bd = self.conv(448, (1, 1), "branch3x3dbl_1")(x)
        bd = self.conv(384, (3, 3), "branch3x3dbl_2", padding=(1, 1))(bd)
        bd = jnp.concatenate(
            [
                self.conv(384, (1, 3), "branch3x3dbl_3a", padding=(0, 1))(bd),
                self.conv(384, (3, 1), "branch3x3dbl_3b", padding=(1, 0))(bd),
            ],
            axis=-1,
        )
        if self.use_max_pool:
            # The FID graph max-pools here (a quirk of the TF model; torchvision averages).
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_3x3_same(x)
        bp = self.conv(192, (1, 1), "branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)  # [B, 8, 8, 2048]


class InceptionV3(nn.Module):
    """pytorch-fid's FID Inception-v3 up to the final average pool.

    Attributes:
      resize_input: resize to 299×299 with PyTorch bilinear sampling first.
      dtype: compute dtype of the network (the resize always runs in float32).
      param_dtype: storage dtype of the weights.
      precision: conv precision; HIGHEST keeps TPU/GPU results close to float32 references.
    """

    resize_input: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        """Computes pool features.

        Args:
          images: ``[B, H, W, 3]`` float RGB in [0, 1].

        Returns:
          ``[B, 2048]`` float32 pool features.
        """
        x = images.astype(jnp.float32)
        if self.resize_input:
            x = resize_bilinear_torch(x, (INCEPTION_SIZE, INCEPTION_SIZE))  # [B, 299, 299, 3]
        x = (2.0 * x - 1.0).astype(self.dtype)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        conv = functools.partial(BasicConv2d, **kw)
        x = conv(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)  # [B, 149, 149, 32]
        x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)  # [B, 147, 147, 32]
        x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)  # [B, 147, 147, 64]
        x = _max_pool_3x3_stride2(x)  # [B, 73, 73, 64]
        x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)  # [B, 73, 73, 80]
        x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)  # [B, 71, 71, 192]
        x = _max_pool_3x3_stride2(x)  # [B, 35, 35, 192]
        x = FIDInceptionA(pool_features=32, name="Mixed_5b", **kw)(x)  # [B, 35, 35, 256]
        x = FIDInceptionA(pool_features=64, name="Mixed_5c", **kw)(x)  # [B, 35, 35, 288]
        x = FIDInceptionA(pool_features=64, name="Mixed_5d", **kw)(x)  # [B, 35, 35, 288]
        x = InceptionB(name="Mixed_6a", **kw)(x)  # [B, 17, 17, 768]
        for name, c7 in (
            ("Mixed_6b", 128),
            ("Mixed_6c", 160),
            ("Mixed_6d", 160),
            ("Mixed_6e", 192),
        ):
            x = FIDInceptionC(channels_7x7=c7, name=name, **kw)(x)  # [B, 17, 17, 768]
        x = InceptionD(name="Mixed_7a", **kw)(x)  # [B, 8, 8, 1280]
        x = FIDInceptionE(use_max_pool=False, name="Mixed_7b", **kw)(x)  # [B, 8, 8, 2048]
        x = FIDInceptionE(use_max_pool=True, name="Mixed_7c", **kw)(x)  # [B, 8, 8, 2048]
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # [B, 2048]


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, (*prefix, key)))
        else:
            flat[(*prefix, key)] = value
    return flat


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


@functools.lru_cache(maxsize=1)
def _variable_shapes() -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    images = jax.ShapeDtypeStruct((1, INCEPTION_SIZE, INCEPTION_SIZE, 3), jnp.float32)
    return _flatten(jax.eval_shape(InceptionV3().init, jax.random.key(0), images))


def convert_inception_state_dict(
    state_dict: Mapping[str, Any], param_dtype: Any = jnp.float32
) -> dict:
    """Converts a pytorch-fid Inception state dict to Flax variables.

    Args:
      state_dict: name → array (numpy arrays or anything ``np.asarray`` accepts), with
        pytorch-fid's names (``Conv2d_1a_3x3.conv.weight``, ``Mixed_7c.branch_pool.bn.
        running_var``, …). ``fc.*``, ``AuxLogits.*`` and ``*.num_batches_tracked`` are ignored.
      param_dtype: dtype of the returned arrays.

    Returns:
      ``{'params': ..., 'batch_stats': ...}`` for :class:`InceptionV3`.

    Raises:
      KeyError: if a tensor the network needs is missing, or a key is not recognised.
      ValueError: if a tensor has the wrong shape.
    """
    used = set()
    flat = {}
    for path, leaf in _variable_shapes().items():
        collection, *modules, layer, name = path
        key = ".".join([*modules, layer, _LEAF_TO_TORCH[(collection, layer, name)]])
        if key not in state_dict:
            raise KeyError(
                f"Inception state dict lacks {key!r}; pass pytorch-fid's "
                "pt_inception-2015-12-05 state dict (a plain name → tensor mapping)."
            )
        value = np.asarray(state_dict[key], np.float32)
        if layer == "conv":
            value = value.transpose(2, 3, 1, 0)  # [O, I, kh, kw] -> [kh, kw, I, O]
        if value.shape != leaf.shape:
            raise ValueError(
                f"{key}: expected shape {leaf.shape} after conversion, got {value.shape}"
            )
        flat[path] = jnp.asarray(value, param_dtype)
        used.add(key)
    unknown = sorted(k for k in state_dict if k not in used and not _IGNORED_KEYS.search(k))
    if unknown:
        raise KeyError(
            f"unrecognised keys in the Inception state dict: {unknown[:5]}; expected the "
            "state dict of pytorch-fid's fid_inception_v3() (pt_inception-2015-12-05)."
        )
    return _unflatten(flat)


def load_inception(path: str, param_dtype: Any = jnp.float32) -> dict:
    """Loads pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` as Flax variables.

    Args:
      path: local path of the checkpoint (a plain state dict saved with ``torch.save``).
      param_dtype: dtype of the returned arrays.

    Returns:
      ``{'params': ..., 'batch_stats': ...}`` for :class:`InceptionV3`.

    Raises:
      ImportError: if PyTorch (needed only to read ``.pth`` files) is not installed.
    """
    try:
        import torch
    except ImportError as err:
        raise ImportError(
            "reading the pytorch-fid .pth checkpoint needs PyTorch; install the extra with "
            "`pip install 'pdm_jax[torch]'` (or convert once elsewhere and save the variables)."
        ) from err
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state_dict.values()
    ):
        raise TypeError(
            f"{path} is not a plain state dict (name -> tensor); pass pytorch-fid's "
            "pt_inception-2015-12-05-6726825d.pth or unwrap the dict before saving."
        )
    state_dict = {
        k: v.detach().float().numpy() for k, v in state_dict.items() if v.is_floating_point()
    }
    return convert_inception_state_dict(state_dict, param_dtype)


@jax.jit
def inception_pool_features(variables: dict, images: jax.Array) -> jax.Array:
    """2048-d FID features of a batch of uint8 images (pytorch-fid's pipeline).

    Args:
      variables: ``{'params', 'batch_stats'}`` from :func:`load_inception`.
      images: ``[B, H, W, 3]`` uint8 RGB of any size (resized to 299×299 inside).

    Returns:
      ``[B, 2048]`` float32 pool features.

    Raises:
      TypeError: if ``images`` is not uint8.
    """
    if images.dtype != jnp.uint8:
        raise TypeError(
            f"inception_pool_features expects uint8 images, got {images.dtype}; quantise as "
            "pytorch-fid does for saved PNGs: np.clip(np.round(x * 255), 0, 255).astype(np.uint8)."
        )
    x = images.astype(jnp.float32) / 255.0  # [B, H, W, 3] in [0, 1], like ToTensor()
    return InceptionV3().apply(variables, x)
