r"""python -m pdm_jax.main --config=configs/pdm.py:two_stream --workdir=/tmp/pdm

Panoptic Diffusion Model configurations.

Variants (the part after ``:``), each optionally followed by ``,key=value`` options:

* ``demo``        tiny one-stream PDM on the synthetic world (CPU, minutes).
* ``uvit``        plain text-to-image U-ViT-S (image-stream pretraining).
* ``one_stream``  one-stream PDM at U-ViT-S size (paper §3.5).
* ``two_stream``  two-stream PDM at U-ViT-S size; the image stream is initialised from
                  ``ckpt.init_from`` (a U-ViT checkpoint) and frozen.
* ``unet``        Stable Diffusion's UNet (``sd=1``: SD 1.x, the default; ``sd=2``: SD 2.x)
                  on 64×64 latents; ``tiny=1`` takes a tiny UNet of the same layout.
* ``unet_one_stream``  one-stream PDM on the SD UNet (map bits through extra zero-init
                  ``conv_in`` channels, a map head on the last decoder features);
                  ``ckpt.init_from`` = a ``convert unet`` checkpoint fills the UNet.
* ``unet_two_stream``  two-stream PDM on the SD UNet: the frozen SD UNet plus a map
                  stream of the same topology (``model.map_width_multiplier``).
* ``demo_unet``   tiny ``unet_one_stream`` on the synthetic world (CPU, minutes).

Options in the arg: ``size=S|S-Deep|M|L|H`` (U-ViT's published sizes, for each stream;
default S, the paper's), ``map_patch_factor=4``, ``tiny=1`` (width 32, depth 2, 8×8
latent: for tests; not with ``size``), ``given_map=1`` (the paper's "PDM given maps").
Any field can still be set with ``--config.a.b=value``.

Every variant starts from the config schema's defaults (``pdm_jax.specs.default_config``;
each field with its doc: ``docs/configuration.md``) and only overrides some of them.
"""

import ml_collections

from pdm_jax.specs import ConfigError, default_config

VARIANTS = (
    "demo",
    "uvit",
    "one_stream",
    "two_stream",
    "unet",
    "unet_one_stream",
    "unet_two_stream",
    "demo_unet",
)
UNET_VARIANTS = ("unet", "unet_one_stream", "unet_two_stream")
# SD UNet text features: CLIP ViT-L/14 (SD 1.x) and OpenCLIP ViT-H/14 (SD 2.x) widths.
_SD_CLIP_DIM = {"1": 768, "2": 1024}

# U-ViT's sizes (Bao et al., "All are Worth Words", CVPR 2023, Table 1: S 13 blocks ×
# 512 wide, 8 heads, 44M; S-Deep 17 × 512, 58M; M 17 × 768, 12 heads, 131M; L 21 × 1024,
# 16 heads, 287M; H 29 × 1152, 16 heads, 501M; MLP 4× wide). ``depth`` counts the blocks
# minus the middle one, as the official configs do: baofff/U-ViT configs/mscoco_uvit.py
# (S: 512/12/8), imagenet64_uvit_mid.py (M: 768/16/12), imagenet512_uvit_large.py
# (L: 1024/20/16), imagenet256_uvit_huge.py (H: 1152/28/16); S-Deep is the paper's
# U-ViT-S/2 (Deep) of its MS-COCO table (depth 16).
SIZES = {
    "S": {"embed_dim": 512, "depth": 12, "num_heads": 8},
    "S-Deep": {"embed_dim": 512, "depth": 16, "num_heads": 8},
    "M": {"embed_dim": 768, "depth": 16, "num_heads": 12},
    "L": {"embed_dim": 1024, "depth": 20, "num_heads": 16},
    "H": {"embed_dim": 1152, "depth": 28, "num_heads": 16},
}


def _parse_arg(arg: str) -> tuple[str, dict[str, str]]:
    """Splits ``"variant,k=v,k2=v2"`` into the variant and its options."""
    parts = [p for p in (arg or "").split(",") if p]
    if not parts:
        raise ConfigError(f"No variant given: use configs/pdm.py:<variant> with one of {VARIANTS}.")
    variant, options = parts[0], {}
    for part in parts[1:]:
        if "=" not in part:
            raise ConfigError(f"Config option {part!r} is not of the form key=value.")
        key, value = part.split("=", 1)
        options[key.strip()] = value.strip()
    return variant, options


def _apply_options(c: ml_collections.ConfigDict, options: dict[str, str]) -> None:
    if "size" in options and options.get("tiny", "0") not in ("0", "false", "False"):
        raise ConfigError(
            "Config options size and tiny=1 both set the model's width and depth: give one."
        )
    for key, value in options.items():
        if key == "size":
            if value not in SIZES:
                raise ConfigError(
                    f"Unknown config option size={value!r}; choose one of {list(SIZES)} "
                    "(U-ViT's sizes), e.g. configs/pdm.py:two_stream,size=L."
                )
            c.model.update(SIZES[value])
        elif key == "map_patch_factor":
            if not value.isdigit():
                raise ConfigError(
                    f"Config option map_patch_factor={value!r} must be a positive integer, "
                    "e.g. configs/pdm.py:two_stream,map_patch_factor=4."
                )
            c.model.map_patch_factor = int(value)
        elif key == "tiny":
            if value not in ("0", "false", "False"):
                _make_tiny(c)
        elif key == "sd":
            if c.model.name not in UNET_VARIANTS or value not in _SD_CLIP_DIM:
                raise ConfigError(
                    f"Option sd={value} needs a UNet variant and sd=1 or sd=2 (SD 1.x or 2.x)."
                )
            c.model.unet_config = f"sd{value}"
        elif key == "given_map":
            c.model.use_given_map = value not in ("0", "false", "False")
        else:
            raise ConfigError(
                f"Unknown config option {key!r}; known: size, map_patch_factor, tiny, "
                "given_map, sd."
            )


def _make_tiny(c: ml_collections.ConfigDict) -> None:
    """Width 32, depth 2, 8×8 latent, 4-token context, a constant learning rate: for tests
    (runs of different lengths then take the same steps)."""
    c.model.update(img_size=8, embed_dim=32, depth=2, num_heads=2, clip_dim=16, num_clip_token=4)
    c.train.batch_size = 8
    c.sampler.steps = 4
    c.optim.update(warmup_steps=0, decay="constant")


def get_config(arg: str = "two_stream") -> ml_collections.ConfigDict:
    """Returns the config for ``variant[,key=value...]``."""
    variant, options = _parse_arg(arg)
    if variant not in VARIANTS:
        raise ConfigError(f"Unknown variant {variant!r}; choose one of {VARIANTS}.")
    c = default_config()
    if variant == "uvit":
        c.model.name = "uvit"
    elif variant == "one_stream":
        c.model.name = "one_stream"
    elif variant == "two_stream":
        c.model.name = "two_stream"
        c.ckpt.freeze_image_stream = True
    elif variant in ("demo", "demo_unet"):
        # Sized for a 2-core CPU: the whole command (train, then the held-out metrics)
        # takes minutes. Patch 4 gives 16 image + 16 map tokens. An MLP twice (not four
        # times) the width makes the step a third cheaper, so more steps fit in the time;
        # the image and map tokens start from one sine-cosine position table, so token i
        # of the map and of the image start at the same spatial code, and each image token
        # reads its patch's map token (and back) before the blocks (docs/results.md).
        c.model.update(
            name="one_stream",
            img_size=16,
            in_chans=3,
            patch_size=4,
            embed_dim=128,
            depth=4,
            num_heads=4,
            mlp_ratio=2.0,
            pos_embed_init="sincos",
            token_fusion=True,
            clip_dim=64,
            num_clip_token=16,
            map_patch_factor=1,
            remat_policy="none",  # 49 tokens: nothing worth recomputing
        )
        # Records are drawn in Python: reader threads only fight over the GIL (a batch
        # costs 7 ms of CPU read in the training process against 16 ms with two threads).
        c.data.update(source="synthetic", num_workers=0, num_threads=0, latent_scale=2.0)
        c.sharding.cpu_devices = -1  # one single-threaded XLA device per core: 1.45× on 2
        c.train.update(
            batch_size=16,
            num_train_steps=5000,
            log_every_steps=100,
            eval_every_steps=1000,
            checkpoint_every_steps=1000,
        )
        # The learning rate decays linearly over the last 20 % of the steps (wsd).
        c.optim.update(
            learning_rate=4e-3, warmup_steps=100, ema_decay=0.995, weight_decay=0.0, decay="wsd"
        )
        # A tiny model learns the map much faster than the image, and the image's ε-loss is
        # dominated by the renders' own pixel noise at the nearly clean steps: half weight on
        # the map loss and min-SNR-5 on the image loss give the image stream the capacity to
        # draw the map's things. 30 % of the examples are trained as the given-map
        # task (clean map in, image loss only): the image stream learns to draw what a map
        # says, which the given-map task needs and co-generation profits from (docs/results.md).
        c.diffusion.update(map_loss_weight=0.5, min_snr_gamma=5.0, given_map_prob=0.3)
        # Ancestral sampling (SDE-DPM-Solver++ order 1 = DDPM's step) on 12 logSNR-uniform
        # steps: the fresh noise corrects the small model's errors instead of carrying them.
        c.sampler.update(steps=12, order=1, method="sde_multistep", skip_type="logSNR", clip_x0=2.0)
        c.demo.num_prompts = 192
        c.demo.use_metrics = True
    elif variant in UNET_VARIANTS:
        # SD latents are 64×64 (512 px); the map is 4× the latent side (256 px).
        c.model.update(
            name=variant, unet_config="sd1", img_size=64, map_patch_factor=4, remat_policy="none"
        )
        c.data.latent_scale = 0.18215  # the SD VAE's scale factor
        c.ckpt.freeze_image_stream = variant == "unet_two_stream"
    if variant == "demo_unet":
        # The same run on a tiny UNet (16×16 latents, two levels). Its step costs about 8×
        # the U-ViT demo's on a 2-core CPU (0.4 s at batch 16, mostly convolutions), so
        # 750 steps fit the 10 minutes, with one grid at the end (docs/results.md).
        c.model.update(name="unet_one_stream", unet_config="demo_unet", token_fusion=False)
        c.train.update(num_train_steps=750, eval_every_steps=750, checkpoint_every_steps=250)
    _apply_options(c, options)
    tiny = options.get("tiny", "0") not in ("0", "false", "False")
    if variant == "demo_unet" and tiny:  # the demo's tiny sizes (8×8, 3 channels, 16-d text)
        c.model.unet_config = "demo_unet_tiny"
    if variant in UNET_VARIANTS:
        _fit_unet(c, tiny=tiny)
    return c


def _fit_unet(c: ml_collections.ConfigDict, tiny: bool) -> None:
    """Sets the model fields a UNet fixes: text width for SD 1.x/2.x, and the tiny UNet
    (``tiny=1``: the packaged ``tiny_sd1``/``tiny_sd2`` of the same layout, 8×8 latents)."""
    sd = c.model.unet_config[-1]
    if tiny:
        c.model.update(unet_config=f"tiny_sd{sd}", clip_dim={"1": 24, "2": 40}[sd])
    else:
        c.model.clip_dim = _SD_CLIP_DIM[sd]
