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
"""

import ml_collections

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
        raise ValueError(f"No variant given: use configs/pdm.py:<variant> with one of {VARIANTS}.")
    variant, options = parts[0], {}
    for part in parts[1:]:
        if "=" not in part:
            raise ValueError(f"Config option {part!r} is not of the form key=value.")
        key, value = part.split("=", 1)
        options[key.strip()] = value.strip()
    return variant, options


def _base_config() -> ml_collections.ConfigDict:
    """Everything shared by the variants: U-ViT-S on 256×256 COCO latents."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = m = ml_collections.ConfigDict()
    m.name = "two_stream"  # uvit | one_stream | two_stream
    m.img_size = 32  # latent side
    m.patch_size = 2
    m.in_chans = 4
    m.embed_dim = 512
    m.depth = 12
    m.num_heads = 8
    m.mlp_ratio = 4.0
    m.qkv_bias = False
    m.mlp_time_embed = False
    m.clip_dim = 768
    m.num_clip_token = 77
    m.num_bits = 8  # analog bits per map pixel
    m.map_patch_factor = 2  # map resolution = factor × latent side
    m.use_given_map = False  # paper's "PDM given maps": map is input only
    m.dtype = "float32"
    m.param_dtype = "float32"
    # Blocks recompute attention and elementwise ops in the backward pass, keep the linear
    # layers' outputs: the two-stream step at batch 8 needs 5.1 instead of 8.3 GB, no slower.
    m.remat_policy = "dots"  # none | full | dots
    # auto (CPU: chunked; TPU: xla; GPU: cudnn in bf16/fp16, else xla) | xla | cudnn | chunked
    m.attention = "auto"
    # U-ViTs: trunc_normal (official) | sincos (image and map patch rows start from one 2-D
    # sine-cosine table: token i of either stream starts at the same spatial code)
    m.pos_embed_init = "trunc_normal"
    # one_stream only: image and map tokens of a patch read each other before the blocks
    # through zero-initialised linear layers (not in the paper; README, demo)
    m.token_fusion = False
    # UNet variants only: the diffusers UNet config.json (sd1 | sd2 | tiny_sd1 | tiny_sd2 |
    # a path | JSON text), and the unet_two_stream map-stream width / image-stream width.
    m.unet_config = "sd1"
    m.map_width_multiplier = 1.0

    c.diffusion = d = ml_collections.ConfigDict()
    d.beta_start = 0.00085
    d.beta_end = 0.012
    d.num_timesteps = 1000
    d.map_noise_std = 2.0
    d.map_loss_weight = 1.0
    d.p_uncond = 0.1
    d.map_pooling = "min"  # min | min_nonvoid | mode
    d.image_prediction = "eps"  # eps (the paper, official checkpoints) | v | x0
    # Shares of examples trained as the given-map / given-image task (clean input, the other
    # stream's loss only); the paper trains joint examples only (0, 0).
    d.given_map_prob = 0.0
    d.given_image_prob = 0.0
    d.min_snr_gamma = 0.0  # > 0: min-SNR-γ weighting of the image loss (0: the paper's plain mean)

    c.sampler = s = ml_collections.ConfigDict()
    s.steps = 50
    s.order = 3
    # fast | multistep | singlestep | singlestep_fixed: DPM-Solver++ on the probability-flow
    # ODE; sde_multistep (orders 1–2): SDE-DPM-Solver++, stochastic (order 1 = DDPM ancestral)
    s.method = "fast"
    s.skip_type = "time_uniform"  # time_uniform | logSNR | time_quadratic
    s.cfg_scale = 1.0
    s.task = "cogenerate"  # cogenerate | given_map | given_image | inpaint
    s.clip_x0 = 0.0  # > 0: clip the image data prediction to ±clip_x0 (bounded latents only)

    c.optim = o = ml_collections.ConfigDict()
    o.learning_rate = 2e-4
    o.weight_decay = 0.03
    o.b1 = 0.9
    o.b2 = 0.9
    o.warmup_steps = 5000
    # constant (official) | cosine (to final_lr_fraction at the last step) | wsd (constant,
    # then linear to final_lr_fraction over the last decay_fraction of the steps)
    o.decay = "constant"
    o.final_lr_fraction = 0.0
    o.decay_fraction = 0.2
    o.grad_clip_norm = 0.0  # 0 disables clipping (the official recipe does not clip)
    o.ema_decay = 0.9999

    c.train = t = ml_collections.ConfigDict()
    t.batch_size = 64
    t.num_train_steps = 1_000_000
    t.log_every_steps = 100
    t.eval_every_steps = 10_000
    t.checkpoint_every_steps = 5_000
    t.num_eval_prompts = 8  # captions in the sample grid written every eval_every_steps

    c.data = dt = ml_collections.ConfigDict()
    dt.source = "coco"  # coco | synthetic
    dt.dir = ""
    dt.num_workers = 2  # grain worker processes; 0 reads in the training process
    dt.num_threads = 2  # reader threads per process
    dt.prefetch = 64  # records buffered ahead
    dt.seed = 0
    dt.latent_scale = 0.23010  # autoencoder latents are multiplied by it (decoding divides)
    dt.num_records = 0  # synthetic world size; 0: its default
    dt.vae = ""  # COCO: VAE checkpoint (autoencoder_kl.pth, diffusers dir, or converted)
    dt.clip = ""  # COCO: CLIP ViT-L/14 text directory, to sample from raw prompts

    c.sharding = sh = ml_collections.ConfigDict()
    # Axes data (replicas), fsdp (replicas that split parameters and optimizer state) and
    # tensor (heads / MLP hidden split); the batch is split over data × fsdp. One -1 takes
    # the remaining devices: (-1, 1, 1) data parallel, (1, -1, 1) FSDP, (1, -1, 2) FSDP
    # with 2-way tensor parallelism (README, Scaling).
    sh.mesh_shape = (-1, 1, 1)
    sh.mesh_axes = ("data", "fsdp", "tensor")
    # Host CPU only: split it into this many single-threaded XLA devices, each running its
    # slice of the batch on its own core (0: JAX's one device; -1: one per core, reduced to
    # a divisor of the batch). Small models run ~1.5× faster on 2 cores; GPUs/TPUs ignore it.
    sh.cpu_devices = 0

    c.ckpt = ck = ml_collections.ConfigDict()
    # A run's workdir, checkpoints directory or step directory; a step of the workdir's own
    # checkpoints resumes that step when the latest cannot be read (README, Checkpoints).
    ck.resume_from = ""
    ck.init_from = ""
    ck.max_to_keep = 3
    ck.freeze_image_stream = False
    # A two_stream run from scratch (no init_from, nothing to resume) is refused: its frozen
    # image stream would stay random. True allows it on purpose (tests, benchmarks).
    ck.allow_random_frozen_stream = False
    ck.use_ema_for_init = True  # init_from takes the EMA parameters when present
    ck.async_save = True
    # Resume without the checkpoint's saved data position (grain saves one per process and
    # cannot re-map it to another process count): the data order is taken up at the
    # checkpoint's step instead (README, Multi-host).
    ck.reset_data_position = False

    c.sample = sa = ml_collections.ConfigDict()
    sa.step = -1  # checkpoint step; -1: the latest
    sa.prompt = ""  # one caption, or
    sa.prompts_file = ""  # one caption per line
    sa.num_samples = 1  # samples per prompt
    sa.seed = 0  # sample i of a prompt uses seed + i
    sa.batch_size = 16
    sa.map = ""  # given_map / inpaint: a .npy of ids or a PNG (ids or category colours)
    sa.image = ""  # given_image / inpaint: an RGB PNG
    sa.mask = ""  # inpaint: PNG, white = regenerate, black = keep
    sa.out_dir = ""  # default: <workdir>/sample_<task>_step<N>
    sa.use_ema = True

    c.eval = ev = ml_collections.ConfigDict()
    ev.num_samples = 0  # 0: 30,000 for COCO (the paper), 256 for the synthetic world
    ev.step = -1  # checkpoint step; -1: the latest
    # cogenerate | given_map (image for the ground-truth map) | given_image (map for the
    # reference image: mIoU, PQ) | inpaint (a seeded box of image and map regenerated)
    ev.task = "cogenerate"
    ev.batch_size = 16
    ev.seed = 0  # sample i uses seed + i
    ev.use_ema = True
    ev.fid_stats = ""  # reference statistics .npz (mu, sigma)
    ev.inception = ""  # pytorch-fid pt_inception-2015-12-05 .pth (or .npz); "" skips FID
    ev.inception_batch_size = 50
    ev.clip = ""  # CLIP ViT-B/32 directory; "" skips the CLIP score
    ev.clip_batch_size = 64
    ev.mask_fraction = 0.25  # inpaint: share of the image the seeded box regenerates
    # Solver sweep: "method[/order]:NFE,NFE;..." (e.g. "fast:10,20,50;sde_multistep/2:10,20")
    # scores the checkpoint once per cell and writes eval/<step>/sweep_<task>.{json,md}.
    ev.sweep = ""

    c.demo = de = ml_collections.ConfigDict()
    de.use_metrics = False  # after training, sample held-out prompts and write metrics.json
    de.num_prompts = 48
    de.seed = 1234
    # given_map: clamp the map to the clean one; inpaint: re-impose it noised to the
    # current t (in-distribution for a model trained on jointly noised pairs).
    de.given_map_task = "given_map"
    return c


def _apply_options(c: ml_collections.ConfigDict, options: dict[str, str]) -> None:
    if "size" in options and options.get("tiny", "0") not in ("0", "false", "False"):
        raise ValueError(
            "Config options size and tiny=1 both set the model's width and depth: give one."
        )
    for key, value in options.items():
        if key == "size":
            if value not in SIZES:
                raise ValueError(
                    f"Unknown config option size={value!r}; choose one of {list(SIZES)} "
                    "(U-ViT's sizes), e.g. configs/pdm.py:two_stream,size=L."
                )
            c.model.update(SIZES[value])
        elif key == "map_patch_factor":
            c.model.map_patch_factor = int(value)
        elif key == "tiny":
            if value not in ("0", "false", "False"):
                _make_tiny(c)
        elif key == "sd":
            if c.model.name not in UNET_VARIANTS or value not in _SD_CLIP_DIM:
                raise ValueError(
                    f"Option sd={value} needs a UNet variant and sd=1 or sd=2 (SD 1.x or 2.x)."
                )
            c.model.unet_config = f"sd{value}"
        elif key == "given_map":
            c.model.use_given_map = value not in ("0", "false", "False")
        else:
            raise ValueError(
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
        raise ValueError(f"Unknown variant {variant!r}; choose one of {VARIANTS}.")
    c = _base_config()
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
        # reads its patch's map token (and back) before the blocks (README, demo).
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
        # says, which the given-map task needs and co-generation profits from (README, demo).
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
        # 750 steps fit the 10 minutes, with one grid at the end (README, demo_unet).
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
