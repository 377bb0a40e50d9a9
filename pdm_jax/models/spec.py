"""``ModelSpec``: which denoiser to build and at what size, as a frozen (hashable) value.

``ModelSpec`` is the ``config.model`` group of the config schema: each field's default and
its documentation are declared here and nowhere else (``pdm_jax.fields``).
"""

import dataclasses

from pdm_jax.fields import ConfigError, option

NAMES = ("uvit", "one_stream", "two_stream", "unet", "unet_one_stream", "unet_two_stream")
# Models that generate no map (image only).
IMAGE_ONLY = ("uvit", "unet")
# Stable Diffusion UNet denoisers (configured by ``unet_config``, not the U-ViT fields).
UNET_NAMES = ("unet", "unet_one_stream", "unet_two_stream")
# Models with a pretrained image stream that ckpt.freeze_image_stream freezes.
TWO_STREAM_NAMES = ("two_stream", "unet_two_stream")
# Models whose image stream ckpt.init_from can fill from a plain model's checkpoint.
INIT_FROM_IMAGE_STREAM = ("two_stream", "unet_one_stream", "unet_two_stream")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """The ``config.model`` group: the denoiser and its size.

    For the UNet names, ``img_size``, ``in_chans``, ``clip_dim``, ``num_clip_token``,
    ``num_bits``, ``map_patch_factor``, the dtypes, ``remat_policy`` and ``attention``
    apply; the other U-ViT fields (``patch_size``, ``embed_dim``, ``depth``, ...) do not.
    """

    name: str = option(
        "two_stream",
        "uvit (image only) | one_stream | two_stream | unet (SD UNet, image only) | "
        "unet_one_stream | unet_two_stream.",
    )
    img_size: int = option(32, "Latent side S.")
    patch_size: int = option(2, "U-ViT image patch side p.")
    in_chans: int = option(4, "Latent channels C.")
    embed_dim: int = option(512, "U-ViT width D.")
    depth: int = option(
        12, "U-ViT blocks minus the middle one: depth // 2 in, 1 mid, depth // 2 out."
    )
    num_heads: int = option(8, "U-ViT attention heads.")
    mlp_ratio: float = option(4.0, "U-ViT MLP hidden width / D.")
    qkv_bias: bool = option(False, "Bias on the fused qkv projection.")
    mlp_time_embed: bool = option(False, "Time token through Linear(D, 4D) → SiLU → Linear(4D, D).")
    clip_dim: int = option(768, "Text feature width.")
    num_clip_token: int = option(77, "Text tokens N.")
    num_bits: int = option(8, "Analog bits per map pixel.")
    map_patch_factor: int = option(
        2, "f: the map side is f × the latent side, patched with f × patch_size.", minimum=1
    )
    use_given_map: bool = option(
        False,
        'The paper\'s "PDM given maps": the map is an input only (official use_ground_truth).',
    )
    dtype: str = option("float32", "Compute dtype: float32 | bfloat16.")
    param_dtype: str = option("float32", "Storage dtype of the parameters.")
    # ``dots`` keeps the linear layers' outputs: the two-stream step at batch 8 then needs
    # 5.1 instead of 8.3 GB, no slower.
    remat_policy: str = option(
        "dots",
        "Block rematerialisation: none | full | dots (recompute attention and elementwise "
        "ops in the backward pass).",
    )
    attention: str = option(
        "auto",
        "Attention kernel: auto (CPU: chunked; TPU: xla; GPU: cudnn in bf16/fp16, else xla) | "
        "xla | cudnn | chunked.",
    )
    unet_config: str = option(
        "sd1",
        "UNet names only: the diffusers UNet config.json: sd1 | sd2 | tiny_sd1 | tiny_sd2 | "
        "a path | JSON text.",
    )
    map_width_multiplier: float = option(
        1.0, "unet_two_stream only: map-stream channels / image-stream channels."
    )
    # ``sincos``: the time and text rows stay trunc-normal; only the initial value differs,
    # the parameters are the same.
    pos_embed_init: str = option(
        "trunc_normal",
        "U-ViT position embeddings start as trunc_normal (official) or sincos (image and map "
        "patch rows from one 2-D sine-cosine table).",
    )
    # Zero-initialised ``map_to_image`` / ``image_to_map`` layers: at initialisation the
    # model is the paper's.
    token_fusion: bool = option(
        False,
        "one_stream only: each image token reads its patch's map token (and back) before the "
        "blocks (not in the paper).",
    )

    def __post_init__(self):
        if self.name not in NAMES:
            raise ConfigError(f"Unknown model name {self.name!r}; choose one of {list(NAMES)}.")

    @property
    def has_map(self) -> bool:
        """Whether the model generates a map (every PDM; not the plain U-ViT)."""
        return self.name not in IMAGE_ONLY

    @property
    def map_size(self) -> int:
        """The map side ``f·S`` (0 for the plain U-ViT)."""
        return int(self.img_size * self.map_patch_factor) if self.has_map else 0
