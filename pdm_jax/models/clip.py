"""CLIP text and vision towers in Flax Linen (transformers >= 5 has no Flax CLIP).

The architecture follows OpenAI CLIP as implemented by Hugging Face ``modeling_clip``:
pre-norm transformer layers, quick-GELU MLPs, a causal text tower with a final layer norm
and EOS pooling, and a ViT vision tower with a class token, a pre-layernorm and a
post-layernorm on the pooled class token. Submodule names mirror the Hugging Face
state-dict names (``text_model/encoder/layers_3/self_attn/q_proj``), so conversion in
``pdm_jax.weights.clip`` is a table.

Defaults: ``ClipTextConfig()`` is the ViT-L/14 text tower used for conditioning (77 tokens,
width 768, 12 layers, 12 heads); ``ClipConfig()`` is ViT-B/32 (text width 512, vision
patch 32 at 224 px, width 768, projections to 512) used for the CLIP score.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Hugging Face's marker for configs written before transformers PR #24773: with it, the pooled
# token is the argmax of the ids (EOS is the largest id of the OpenAI vocabulary).
LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class ClipTextConfig:
    """Text tower hyper-parameters (names as in ``transformers.CLIPTextConfig``)."""

    vocab_size: int = 49408
    max_position_embeddings: int = 77
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig:
    """Vision tower hyper-parameters (names as in ``transformers.CLIPVisionConfig``)."""

    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    """Full CLIP (both towers and projections); defaults are OpenAI ViT-B/32."""

    text: ClipTextConfig = ClipTextConfig(
        hidden_size=512, num_attention_heads=8, intermediate_size=2048
    )
    vision: ClipVisionConfig = ClipVisionConfig()
    projection_dim: int = 512


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI's GELU approximation ``x * sigmoid(1.702 x)``."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


def activation(name: str):
    """Looks up an activation by its Hugging Face ``hidden_act`` name."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """Index of the pooled (EOS) token per sequence, as transformers 5 ``CLIPTextModel``.

    Args:
      input_ids: ``[B, L]`` token ids.
      eos_token_id: the config's ``eos_token_id``.

    Returns:
      ``[B]`` int positions: the first largest id for legacy configs (``eos_token_id == 2``),
      otherwise the first position holding ``eos_token_id`` (0 when there is none).
    """
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == eos_token_id, axis=-1)


class CLIPAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections (HF names)."""

    num_heads: int
    causal: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, length, width = x.shape
        head_dim = width // self.num_heads
        dense = functools.partial(nn.Dense, width, dtype=self.dtype, param_dtype=self.param_dtype)
        split = lambda t: t.reshape(b, length, self.num_heads, head_dim)
        q = split(dense(name="q_proj")(x))  # [B, L, H, Dh]
        k = split(dense(name="k_proj")(x))
        v = split(dense(name="v_proj")(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        logits = logits * head_dim**-0.5  # [B, H, L, L]
        if self.causal:
            mask = jnp.tril(jnp.ones((length, length), dtype=bool))
            logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, length, width)
        return dense(name="out_proj")(out)


class CLIPMLP(nn.Module):
    """``fc1 -> act -> fc2``."""

    intermediate_size: int
    hidden_act: str = "quick_gelu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        h = activation(self.hidden_act)(dense(self.intermediate_size, name="fc1")(x))
        return dense(x.shape[-1], name="fc2")(h)


def _layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
    # Two-pass variance, as torch computes it, keeps parity within 1e-5.
    return nn.LayerNorm(
        epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype, name=name
    )


class CLIPEncoderLayer(nn.Module):
    """One pre-norm layer: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    num_heads: int
    intermediate_size: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    causal: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = _layer_norm(self.layer_norm_eps, name="layer_norm1", **kw)(x)
        x = x + CLIPAttention(self.num_heads, self.causal, name="self_attn", **kw)(h)
        h = _layer_norm(self.layer_norm_eps, name="layer_norm2", **kw)(x)
        return x + CLIPMLP(self.intermediate_size, self.hidden_act, name="mlp", **kw)(h)


class CLIPEncoder(nn.Module):
    """Stack of ``CLIPEncoderLayer`` named ``layers_{i}`` (HF ``encoder.layers.{i}``)."""

    num_layers: int
    num_heads: int
    intermediate_size: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    causal: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = CLIPEncoderLayer(
                self.num_heads,
                self.intermediate_size,
                self.hidden_act,
                self.layer_norm_eps,
                self.causal,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"layers_{i}",
            )(x)
        return x  # [B, L, D]


def _encoder(cfg: ClipTextConfig | ClipVisionConfig, causal: bool, dtype, param_dtype):
    return CLIPEncoder(
        num_layers=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        hidden_act=cfg.hidden_act,
        layer_norm_eps=cfg.layer_norm_eps,
        causal=causal,
        dtype=dtype,
        param_dtype=param_dtype,
        name="encoder",
    )


class CLIPTextEmbeddings(nn.Module):
    """Token plus learned absolute position embeddings."""

    config: ClipTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.config
        embed = functools.partial(
            nn.Embed, features=cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype
        )
        tokens = embed(cfg.vocab_size, name="token_embedding")(input_ids)  # [B, L, D]
        positions = jnp.arange(input_ids.shape[-1])
        return tokens + embed(cfg.max_position_embeddings, name="position_embedding")(positions)


class CLIPTextTransformer(nn.Module):
    """Causal text tower; HF ``CLIPTextModel.text_model``."""

    config: ClipTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Encodes token ids.

        Args:
          input_ids: ``[B, L]`` int ids, ``L <= max_position_embeddings``.

        Returns:
          ``(last_hidden_state [B, L, D]`` after the final layer norm, ``pooled [B, D])``,
          the pooled vector being the hidden state at the EOS position (``eos_positions``).
        """
        cfg = self.config
        if input_ids.shape[-1] > cfg.max_position_embeddings:
            raise ValueError(
                f"sequence length {input_ids.shape[-1]} exceeds max_position_embeddings "
                f"{cfg.max_position_embeddings}; tokenize with truncation=True"
            )
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        x = CLIPTextEmbeddings(cfg, name="embeddings", **kw)(input_ids)
        x = _encoder(cfg, True, **kw)(x)
        x = _layer_norm(cfg.layer_norm_eps, name="final_layer_norm", **kw)(x)  # [B, L, D]
        pooled = x[jnp.arange(x.shape[0]), eos_positions(input_ids, cfg.eos_token_id)]
        return x, pooled


class CLIPVisionEmbeddings(nn.Module):
    """Patchify convolution, class token and learned position embeddings."""

    config: ClipVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        cfg = self.config
        b, h, w, _ = pixel_values.shape
        if h != cfg.image_size or w != cfg.image_size:
            raise ValueError(
                f"image size {h}x{w} does not match the model's {cfg.image_size}; "
                "preprocess with pdm_jax.models.clip_embed.clip_preprocess"
            )
        p = cfg.patch_size
        patches = nn.Conv(
            cfg.hidden_size,
            (p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="patch_embedding",
        )(pixel_values.astype(self.dtype))  # [B, h/p, w/p, D]
        patches = patches.reshape(b, -1, cfg.hidden_size)  # row-major, as torch flatten(2)
        cls = self.param(
            "class_embedding", nn.initializers.normal(cfg.hidden_size**-0.5), (cfg.hidden_size,)
        )
        cls = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, cfg.hidden_size))
        x = jnp.concatenate([cls, patches], axis=1)  # [B, 1 + N, D]
        positions = nn.Embed(
            x.shape[1],
            cfg.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="position_embedding",
        )(jnp.arange(x.shape[1]))
        return x + positions


class CLIPVisionTransformer(nn.Module):
    """ViT image tower; HF ``CLIPVisionModel.vision_model``."""

    config: ClipVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Encodes normalised images.

        Args:
          pixel_values: ``[B, S, S, C]`` float, CLIP-normalised, ``S = image_size`` (NHWC).

        Returns:
          ``(last_hidden_state [B, 1 + N, D], pooled [B, D])``; pooled is the class token
          after ``post_layernorm``.
        """
        cfg = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        x = CLIPVisionEmbeddings(cfg, name="embeddings", **kw)(pixel_values)
        x = _layer_norm(cfg.layer_norm_eps, name="pre_layrnorm", **kw)(x)  # HF's spelling
        x = _encoder(cfg, False, **kw)(x)
        pooled = _layer_norm(cfg.layer_norm_eps, name="post_layernorm", **kw)(x[:, 0])
        return x, pooled


class CLIPTextModel(nn.Module):
    """Text tower only (HF ``CLIPTextModel``); what the diffusion model is conditioned on."""

    config: ClipTextConfig = ClipTextConfig()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Returns ``(last_hidden_state [B, L, D], pooled [B, D])`` for ``input_ids [B, L]``."""
        return CLIPTextTransformer(
            self.config, dtype=self.dtype, param_dtype=self.param_dtype, name="text_model"
        )(input_ids)


class CLIPModel(nn.Module):
    """Both towers plus ``text_projection``/``visual_projection`` (HF ``CLIPModel``)."""

    config: ClipConfig = ClipConfig()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        proj = functools.partial(nn.Dense, self.config.projection_dim, use_bias=False, **kw)
        self.text_model = CLIPTextTransformer(self.config.text, **kw)
        self.vision_model = CLIPVisionTransformer(self.config.vision, **kw)
        self.text_projection = proj()
        self.visual_projection = proj()
        # ln(1 / 0.07), CLIP's initial temperature; loaded from checkpoints.
        self.logit_scale = self.param(
            "logit_scale", nn.initializers.constant(2.6592), (), self.param_dtype
        )

    def get_text_features(self, input_ids: jax.Array) -> jax.Array:
        """Projected EOS features ``[B, P]`` (not normalised) for ``input_ids [B, L]``."""
        return self.text_projection(self.text_model(input_ids)[1])

    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        """Projected class-token features ``[B, P]`` (not normalised) for ``[B, S, S, C]``."""
        return self.visual_projection(self.vision_model(pixel_values)[1])

    def __call__(self, input_ids: jax.Array, pixel_values: jax.Array):
        """Returns ``(text_features [B, P], image_features [B', P], logit_scale [])``."""
        return (
            self.get_text_features(input_ids),
            self.get_image_features(pixel_values),
            self.logit_scale,
        )
