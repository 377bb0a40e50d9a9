"""``ModelSpec``: which denoiser to build and at what size, as a frozen (hashable) value."""

import dataclasses

NAMES = ("uvit", "one_stream", "two_stream", "unet", "unet_one_stream", "unet_two_stream")
# Models that generate no map (image only).
IMAGE_ONLY = ("uvit", "unet")
# Stable Diffusion UNet denoisers (configured by ``unet_config``, not the U-ViT fields).
UNET_NAMES = ("unet", "unet_one_stream", "unet_two_stream")
# Models with a pretrained image stream that ckpt.freeze_image_stream freezes.
TWO_STREAM_NAMES = ("two_stream", "unet_two_stream")
# Models whose image stream ckpt.init_from can fill from a plain model's checkpoint.
INIT_FROM_IMAGE_STREAM = ("two_stream", "unet_one_stream", "unet_two_stream")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The ``config.model`` group, typed (field meanings: ``pdm_jax.models.uvit.UViTSpec``).

    Attributes:
      name: ``uvit`` (image only), ``one_stream`` or ``two_stream``; ``unet`` (SD UNet,
        image only), ``unet_one_stream`` or ``unet_two_stream`` (PDMs on a UNet).
      unet_config: UNet names only: the diffusers UNet ``config.json`` — a packaged name
        (``sd1``, ``sd2``, ``tiny_sd1``, ``tiny_sd2``), a path, or its JSON text. For the
        UNets, ``img_size``, ``in_chans``, ``clip_dim``, ``num_clip_token``, ``num_bits``,
        ``map_patch_factor``, the dtypes, ``remat_policy`` and ``attention`` apply; the other
        U-ViT fields (``patch_size``, ``embed_dim``, ``depth``, ...) do not.
      map_width_multiplier: ``unet_two_stream`` only: map-stream channels / image-stream
        channels.
      dtype: compute dtype name (``float32``, ``bfloat16``).
      param_dtype: storage dtype name of the parameters.
    """

    name: str
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
    dtype: str
    param_dtype: str
    remat_policy: str
    attention: str
    unet_config: str = "sd1"
    map_width_multiplier: float = 1.0
    pos_embed_init: str = "trunc_normal"
    token_fusion: bool = False

    def __post_init__(self):
        if self.name not in NAMES:
            raise ValueError(f"Unknown model name {self.name!r}; choose one of {list(NAMES)}.")

    @property
    def has_map(self) -> bool:
        """Whether the model generates a map (every PDM; not the plain U-ViT)."""
        return self.name not in IMAGE_ONLY

    @property
    def map_size(self) -> int:
        """The map side ``f·S`` (0 for the plain U-ViT)."""
        return int(self.img_size * self.map_patch_factor) if self.has_map else 0
