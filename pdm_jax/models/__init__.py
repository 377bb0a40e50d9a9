"""Denoising networks: plain U-ViT, one-stream and two-stream Panoptic Diffusion Models.

Public API::

    model = build(config.model)
    params = init_params(config.model, jax.random.key(0))
    eps, map0 = model.apply({"params": params}, x_t, m_t, t, context)  # PDMs
    eps = model.apply({"params": params}, x_t, None, t, context)  # name="uvit"

Arrays are NHWC: ``x_t [B, S, S, C]``, ``m_t [B, f·S, f·S, bits]``, ``t [B]`` float in
model units (1..1000), ``context [B, N, clip_dim]``. Parameter trees are flat and named
like the official PyTorch state dicts (``in_blocks_3/attn/qkv/kernel`` ↔
``in_blocks.3.attn.qkv.weight``); see ``pdm_jax.convert.official``.

``models.handle`` gives a spec's module, abstract parameters, logical axes and parameter
shardings; ``models.image_stream`` tells and swaps a PDM's image stream (its three
functions are re-exported here).
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from pdm_jax.models import attention
from pdm_jax.models.image_stream import image_stream_mask, is_image_stream, merge_image_stream
from pdm_jax.models.layers import REMAT_POLICIES
from pdm_jax.models.pdm import OneStreamPDM
from pdm_jax.models.spec import IMAGE_ONLY, UNET_NAMES, ModelSpec
from pdm_jax.models.two_stream import TwoStreamPDM
from pdm_jax.models.unet import UNet2DConditionModel, UNetSpec, resolve_config
from pdm_jax.models.unet_pdm import UNetOneStreamPDM, UNetTwoStreamPDM
from pdm_jax.models.uvit import UViT, UViTSpec

MODELS = {
    "uvit": UViT,
    "one_stream": OneStreamPDM,
    "two_stream": TwoStreamPDM,
    "unet": UNet2DConditionModel,
    "unet_one_stream": UNetOneStreamPDM,
    "unet_two_stream": UNetTwoStreamPDM,
}

__all__ = [
    "MODELS",
    "ModelSpec",
    "OneStreamPDM",
    "TwoStreamPDM",
    "UNet2DConditionModel",
    "UNetOneStreamPDM",
    "UNetSpec",
    "UNetTwoStreamPDM",
    "UViT",
    "UViTSpec",
    "abstract_boxed_params",
    "abstract_params",
    "build",
    "count_params",
    "denoise_fn",
    "example_inputs",
    "image_stream_mask",
    "init_params",
    "is_image_stream",
    "merge_image_stream",
    "param_logical_axes",
]

Params = dict[str, Any]


# The one_stream ``token_fusion`` layers (zero at initialisation; absent from the paper's
# checkpoints, which ``ckpt.init_from`` then fills with zeros).
TOKEN_FUSION_PARAMS = ("map_to_image", "image_to_map")


def check_token_fusion(model_cfg: Any) -> None:
    """Raises ``ValueError`` when ``model.token_fusion`` is set on a model other than
    ``one_stream`` (the only one whose image and map tokens share a sequence)."""
    if getattr(model_cfg, "token_fusion", False) and model_cfg.name != "one_stream":
        raise ValueError(
            f"model.token_fusion=True is a one_stream option (image and map tokens of one "
            f"sequence); {model_cfg.name!r} has no such pair of tokens: set it to False."
        )


def build(model_cfg: Any) -> nn.Module:
    """Builds the model named by ``model_cfg.name``.

    Args:
      model_cfg: a ``ModelSpec`` (``name`` ∈ uvit | one_stream | two_stream, the
        ``UViTSpec`` fields, ``dtype`` and ``param_dtype`` as strings).

    Returns:
      An unbound Linen module.

    Raises:
      ValueError: for an unknown name, bad spec fields, or an attention kernel the compute
        dtype or backend cannot run (``attention.check_implementation``).
    """
    if model_cfg.name not in MODELS:
        raise ValueError(f"Unknown model name {model_cfg.name!r}; choose one of {list(MODELS)}.")
    check_token_fusion(model_cfg)
    if model_cfg.name in UNET_NAMES:
        attention.check_implementation(model_cfg.attention, model_cfg.dtype)
        return _build_unet(model_cfg)
    attention.check_implementation(
        model_cfg.attention, model_cfg.dtype, head_dim=model_cfg.embed_dim // model_cfg.num_heads
    )
    return MODELS[model_cfg.name](
        UViTSpec.from_config(model_cfg),
        dtype=jnp.dtype(model_cfg.dtype),
        param_dtype=jnp.dtype(model_cfg.param_dtype),
    )


def unet_spec(model_cfg: Any) -> UNetSpec:
    """The ``UNetSpec`` of a UNet ``config.model``, checked against its other fields.

    Args:
      model_cfg: ``config.model`` with a UNet name.

    Returns:
      The topology from ``model_cfg.unet_config``.

    Raises:
      ValueError: when ``in_chans``, ``clip_dim`` or ``img_size`` do not fit the UNet.
    """
    spec = UNetSpec.from_diffusers(resolve_config(model_cfg.unet_config))
    problems = []
    if model_cfg.remat_policy not in REMAT_POLICIES:
        problems.append(f"remat_policy={model_cfg.remat_policy!r} is not one of {REMAT_POLICIES}")
    if model_cfg.attention not in attention.IMPLEMENTATIONS:
        problems.append(
            f"attention={model_cfg.attention!r} is not one of {attention.IMPLEMENTATIONS}"
        )
    if int(model_cfg.in_chans) != spec.in_channels:
        problems.append(f"in_chans={model_cfg.in_chans} but the UNet has {spec.in_channels}")
    if int(model_cfg.clip_dim) != spec.cross_attention_dim:
        problems.append(
            f"clip_dim={model_cfg.clip_dim} but the UNet's cross_attention_dim is "
            f"{spec.cross_attention_dim}"
        )
    if int(model_cfg.img_size) % spec.downsample_factor:
        problems.append(
            f"img_size={model_cfg.img_size} is not a multiple of {spec.downsample_factor} "
            "(the UNet halves the side at each level)"
        )
    if problems:
        raise ValueError(
            "config.model does not fit model.unet_config: "
            + "; ".join(problems)
            + ". Set those fields (--config.model.<field>=...) to match the UNet."
        )
    return spec


def _build_unet(model_cfg: Any) -> nn.Module:
    """The UNet named by ``model_cfg.name`` (``unet`` | ``unet_one_stream`` | ...)."""
    common = {
        "remat_policy": str(model_cfg.remat_policy),
        "attention": str(model_cfg.attention),
        "dtype": jnp.dtype(model_cfg.dtype),
        "param_dtype": jnp.dtype(model_cfg.param_dtype),
    }
    spec = unet_spec(model_cfg)
    if model_cfg.name == "unet":
        return UNet2DConditionModel(spec, **common)
    return MODELS[model_cfg.name](
        spec,
        num_bits=int(model_cfg.num_bits),
        map_patch_factor=int(model_cfg.map_patch_factor),
        use_given_map=bool(model_cfg.use_given_map),
        map_width_multiplier=float(model_cfg.map_width_multiplier),
        **common,
    )


def denoise_fn(model_cfg: Any) -> Callable:
    """``(params, x_t, m_t, t, context)`` → the model's outputs (``apply`` with params).

    ``t`` is in the pipeline's model units (n ∈ 1..1000, ᾱ_n the n-th of the schedule);
    the UNets take diffusers' index of the same ᾱ, n − 1, which this passes them.
    """
    module = build(model_cfg)
    shift = 1.0 if model_cfg.name in UNET_NAMES else 0.0

    def denoise(params, x_t, m_t, t, context):
        return module.apply({"params": params}, x_t, m_t, t - shift, context)

    return denoise


def example_inputs(
    model_cfg: Any, batch_size: int = 1
) -> tuple[jax.Array, jax.Array | None, jax.Array, jax.Array]:
    """Placeholder inputs of the right shapes (zeros; ``t`` = 1), e.g. for ``init``.

    Args:
      model_cfg: ``config.model``.
      batch_size: B.

    Returns:
      ``(x_t, m_t, t, context)``; ``m_t`` is None for the plain U-ViT.
    """
    spec = UViTSpec.from_config(model_cfg)
    s, ms = spec.img_size, spec.map_size
    x = jnp.zeros((batch_size, s, s, spec.in_chans), jnp.float32)
    m = None
    if model_cfg.name not in IMAGE_ONLY:
        m = jnp.zeros((batch_size, ms, ms, spec.num_bits), jnp.float32)
    t = jnp.ones((batch_size,), jnp.float32)
    context = jnp.zeros((batch_size, spec.num_clip_token, spec.clip_dim), jnp.float32)
    return x, m, t, context


def _boxed_init_fn(model_cfg: Any):
    """``rng -> params`` with their ``nn.LogicallyPartitioned`` boxes."""
    module, inputs = build(model_cfg), example_inputs(model_cfg)
    return lambda rng: module.init(rng, *inputs)["params"]


def init_params(model_cfg: Any, rng: jax.Array) -> Params:
    """Initialises parameters (official initialisers) as a plain, unboxed dict.

    Args:
      model_cfg: ``config.model``.
      rng: PRNG key.

    Returns:
      Nested dict of arrays in ``param_dtype``.
    """
    return nn.meta.unbox(jax.jit(_boxed_init_fn(model_cfg))(rng))


def abstract_boxed_params(model_cfg: Any) -> Any:
    """The initialiser's output shapes, nothing allocated, with their
    ``nn.LogicallyPartitioned`` boxes (shapes and logical axes in one trace)."""
    return jax.eval_shape(_boxed_init_fn(model_cfg), jax.random.key(0))


def abstract_params(model_cfg: Any) -> Params:
    """Parameter shapes and dtypes (``jax.ShapeDtypeStruct`` leaves) without allocating."""
    return nn.meta.unbox(abstract_boxed_params(model_cfg))


def param_logical_axes(model_cfg: Any) -> Params:
    """Logical axis names of every parameter, from the models' partitioning annotations.

    Args:
      model_cfg: ``config.model``.

    Returns:
      Tree like the params with ``jax.sharding.PartitionSpec`` leaves holding logical
      names (e.g. ``PartitionSpec('embed', 'mlp')``), ready for
      ``nn.logical_to_mesh_sharding``.
    """
    return nn.get_partition_spec(abstract_boxed_params(model_cfg))


def count_params(params: Any) -> int:
    """Total number of scalars in a parameter tree (arrays or ``ShapeDtypeStruct``)."""
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))
