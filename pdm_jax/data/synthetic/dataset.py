"""The embedded default dataset: a seeded synthetic world of shapes on two-region backgrounds.

A tiny PDM learns it on a CPU in minutes, with no downloads. Every example is a pure
function of ``(seed, split, index)``:

* **image**: a stuff background (sky or wall over grass, sea, sand or snow) and 1–3
  things (ball, box, tent, cross) on a 3×3 grid, each category in its own colour with a
  faint texture and noise (see :mod:`pdm_jax.data.synthetic.world`);
* **latent**: the image through :class:`PixelAutoencoder`, an identity "autoencoder"
  (area-average to the latent side, scale to [-1, 1]);
* **map**: the category map at ``map_size`` (nearest semantics: the category at each
  pixel's centre), COCO-style ids (things < 92 ≤ stuff, void 0 never drawn);
* **caption**: e.g. ``"big ball top-left, small box right and small tent bottom, sky over
  sea"``, tokenised word by word and encoded by a frozen random text tower
  (:mod:`pdm_jax.data.synthetic.text`).

Some (thing pair, background) compositions never occur in the ``"train"`` split; the
``"held_out"`` split and :meth:`SyntheticWorld.held_out_prompts` contain only those, so
evaluation measures generalisation to new combinations. :meth:`SyntheticWorld.segment`
is an oracle that maps any image (a generated one too) back to a category map.
"""

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from pdm_jax.data.schema import DatasetInfo, DataSpec
from pdm_jax.data.synthetic import oracle, text, world

SPLITS = ("train", "held_out")


def default_image_size(latent_size: int) -> int:
    """The smallest multiple of the latent side that is ≥ 64 (the rendering side R)."""
    return latent_size * max(1, -(-64 // latent_size))


@dataclasses.dataclass(frozen=True)
class SyntheticWorldConfig:
    """Sizes and knobs of the synthetic world.

    Attributes:
      latent_size: latent side S (the model's ``img_size``).
      map_size: map side M (``map_patch_factor × S``).
      image_size: rendering side R, a multiple of S (R > S anti-aliases the latent).
      in_chans: latent channels C ≥ 3: RGB, then constant-zero channels.
      num_clip_token: caption length T in tokens.
      clip_dim: text feature size D.
      seed: data seed (scenes, noise).
      text_seed: seed of the frozen text tables; keep it fixed across runs that share
        checkpoints.
      max_things: at most this many things per scene (2..4).
      texture_amplitude: peak-to-peak texture/shading brightness, uint8 units.
      noise_std: per-latent-pixel noise std, uint8 units.
      colour_jitter: per-region uniform colour offset per channel, uint8 units.
      num_records: length of the (virtual) training split.
    """

    latent_size: int = 16
    map_size: int = 16
    image_size: int = 64
    in_chans: int = 3
    num_clip_token: int = 16
    clip_dim: int = 64
    seed: int = 0
    text_seed: int = 0
    max_things: int = 3
    texture_amplitude: float = 14.0
    noise_std: float = 4.0
    colour_jitter: float = 10.0
    num_records: int = 1_000_000

    def __post_init__(self):
        if self.latent_size < 1 or self.map_size < 1:
            raise ValueError("latent_size and map_size must be positive.")
        if self.image_size < self.latent_size or self.image_size % self.latent_size:
            raise ValueError(
                f"image_size={self.image_size} must be a multiple of latent_size="
                f"{self.latent_size} (e.g. {default_image_size(self.latent_size)})."
            )
        if self.in_chans < 3:
            raise ValueError(f"in_chans={self.in_chans}: the pixel latent needs at least RGB.")
        if not 2 <= self.max_things <= len(world.THING_IDS):
            raise ValueError(
                f"max_things={self.max_things} must be in 2..{len(world.THING_IDS)} "
                "(held-out compositions have two things; things have distinct categories)."
            )

    @classmethod
    def from_data_spec(cls, data: DataSpec, **overrides: Any) -> "SyntheticWorldConfig":
        """The world whose sizes match ``data`` (the model's latent, map and context).

        Args:
          data: the run's ``DataSpec``.
          **overrides: any field of this class, applied last.

        Returns:
          The world config; ``image_size`` is :func:`default_image_size` unless overridden.
        """
        fields = dict(
            latent_size=data.latent_size,
            map_size=data.map_size or data.latent_size,
            image_size=default_image_size(data.latent_size),
            in_chans=data.latent_channels,
            num_clip_token=data.num_clip_token,
            clip_dim=data.clip_dim,
            seed=data.seed,
        )
        if data.num_records:
            fields["num_records"] = data.num_records
        fields.update(overrides)
        return cls(**fields)


@functools.lru_cache(maxsize=16)
def _area_matrix(src: int, dst: int) -> np.ndarray:
    """float32 [dst, src]: row i averages the source pixels under target pixel i."""
    edges = np.arange(dst + 1, dtype=np.float64) * src / dst  # target edges in source px
    lo, hi = edges[:-1, None], edges[1:, None]
    j = np.arange(src, dtype=np.float64)[None, :]
    overlap = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0.0, None)
    return (overlap / (src / dst)).astype(np.float32)


class PixelAutoencoder:
    """The identity "autoencoder" of the synthetic world: pixels are the latent.

    ``encode`` area-averages an image to S×S and maps [0, 255] → [-1, 1]; channels beyond
    RGB (``in_chans`` > 3) are the constant 0. ``decode`` inverts it up to uint8 rounding.
    """

    def __init__(self, latent_size: int, in_chans: int = 3):
        """Args: latent_size: latent side S; in_chans: latent channels C ≥ 3."""
        if in_chans < 3:
            raise ValueError(f"in_chans={in_chans}: the pixel latent needs at least RGB.")
        self.latent_size, self.in_chans = latent_size, in_chans

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 [..., H, W, 3] → float32 [..., S, S, C] in [-1, 1] (area-average resize).

        Args:
          images: RGB images, any side.

        Returns:
          The latents.
        """
        images = np.asarray(images)
        if images.ndim < 3 or images.shape[-1] != 3:
            raise ValueError(f"encode expects [..., H, W, 3] RGB images, got {images.shape}.")
        h, w = images.shape[-3:-1]
        s = self.latent_size
        if h % s == 0 and w % s == 0 and images.dtype == np.uint8:  # the common, fast case
            # Exact integer block sums (rows, then columns) and one division: the block
            # mean to the last bit, at a fraction of mean(axis=(-4, -2))'s cost.
            kh, kw = h // s, w // s
            x = images.reshape(*images.shape[:-3], s, kh, w * 3).sum(axis=-2, dtype=np.int32)
            x = x.reshape(*x.shape[:-1], s, kw, 3).sum(axis=-2, dtype=np.int32)
            x = x.astype(np.float32) / np.float32(kh * kw)
        elif h % s == 0 and w % s == 0:
            blocks = images.reshape(*images.shape[:-3], s, h // s, s, w // s, 3)
            x = blocks.mean(axis=(-4, -2), dtype=np.float32)
        else:
            x = np.einsum("ih,...hwc->...iwc", _area_matrix(h, s), images.astype(np.float32))
            x = np.einsum("...iwc,jw->...ijc", x, _area_matrix(w, s))
        x = x * np.float32(1 / 127.5) - np.float32(1.0)
        if self.in_chans > 3:
            x = np.concatenate([x, np.zeros((*x.shape[:-1], self.in_chans - 3), np.float32)], -1)
        return x

    def decode(self, latents: np.ndarray, size: int | None = None) -> np.ndarray:
        """float [..., S, S, C] → uint8 [..., size, size, 3] (nearest upsampling for viewing).

        Args:
          latents: latents (e.g. generated ones); values are clipped to [-1, 1].
          size: output side; default S.

        Returns:
          RGB images.
        """
        x = np.asarray(latents, dtype=np.float32)[..., :3]
        image = np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
        s = image.shape[-2]
        if size is not None and size != s:
            idx = ((np.arange(size) + 0.5) * s / size).astype(np.int64)
            image = image[..., idx[:, None], idx[None, :], :]
        return image


class SyntheticWorld:
    """Scenes, captions, renders, the oracle and the text/latent codecs of one config."""

    categories: ClassVar[tuple[world.Category, ...]] = world.CATEGORIES
    category_names: ClassVar[dict[int, str]] = world.CATEGORY_NAMES
    colour_table = staticmethod(oracle.colour_table)
    colourise = staticmethod(oracle.colourise)
    caption_categories = staticmethod(world.caption_categories)

    def __init__(self, config: SyntheticWorldConfig | None = None):
        """Args: config: the world config (default: the demo sizes)."""
        self.config = c = config or SyntheticWorldConfig()
        self.tokenizer = text.WordTokenizer(world.CAPTION_WORDS, c.num_clip_token)
        self.text_encoder = text.FrozenTextEncoder(
            self.tokenizer.vocab_size, c.num_clip_token, c.clip_dim, c.text_seed
        )
        self.autoencoder = PixelAutoencoder(c.latent_size, c.in_chans)
        self.empty_context = self.encode_text([""])[0]  # [T, D], the unconditional context

    def __reduce__(self):
        # Pickles as the config only: workers rebuild the (deterministic) tables.
        return (SyntheticWorld, (self.config,))

    def scene(self, index: int, split: str = "train") -> world.Scene:
        """The scene of example ``index`` of ``split`` ("train" or "held_out")."""
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}; choose one of {SPLITS}.")
        c = self.config
        rng = np.random.default_rng((c.seed, SPLITS.index(split), int(index)))
        return world.sample_scene(
            rng,
            max_things=c.max_things,
            colour_jitter=c.colour_jitter,
            held_out=split == "held_out",
            composition=int(index),
        )

    def caption(self, index: int, split: str = "train") -> str:
        """The caption text of example ``index`` of ``split``."""
        return world.caption(self.scene(index, split))

    def render(self, scene: world.Scene) -> np.ndarray:
        """uint8 [R, R, 3]: the scene's image at ``image_size``."""
        c = self.config
        return world.render_image(
            scene,
            c.image_size,
            grain_size=c.latent_size,
            texture_amplitude=c.texture_amplitude,
            noise_std=c.noise_std,
        )

    def reference_map(self, scene: world.Scene) -> np.ndarray:
        """int32 [M, M]: the scene's category map at ``map_size``."""
        return world.render_map(scene, self.config.map_size)

    def encode_text(self, captions: Sequence[str]) -> np.ndarray:
        """Captions → float32 [B, T, D] contexts (``""`` → the unconditional context)."""
        return self.text_encoder(self.tokenizer(captions))

    def example(self, index: int, split: str = "train") -> dict[str, np.ndarray]:
        """One training example (the :class:`SyntheticSource` record).

        Args:
          index: example index (any non-negative int; the same index gives the same record).
          split: "train" or "held_out".

        Returns:
          ``latent`` float32 [S, S, C], ``map`` int32 [M, M], ``tokens`` int32 [T],
          ``context`` float32 [T, D].
        """
        return self._record(self.scene(index, split))

    def _record(self, scene: world.Scene) -> dict[str, np.ndarray]:
        tokens = self.tokenizer.tokenize(world.caption(scene))
        return {
            "latent": self.autoencoder.encode(self.render(scene)),
            "map": self.reference_map(scene),
            "tokens": tokens,
            "context": self.text_encoder(tokens),
        }

    def held_out_prompts(self, n: int) -> dict[str, Any]:
        """The first ``n`` held-out examples: compositions never seen in training.

        Args:
          n: number of prompts, ≥ 1 (cycles through the held-out compositions; the same
            n always gives the same prompts for a given seed).

        Returns:
          ``caption`` list[str], ``scene`` list[Scene], ``categories`` list of the
          caption's id tuples, and stacked ``latent`` [n, S, S, C], ``map`` [n, M, M],
          ``tokens`` [n, T], ``context`` [n, T, D] (the reference image and map of each).
        """
        if n < 1:
            raise ValueError(f"held_out_prompts needs n >= 1, got {n}.")
        scenes = [self.scene(i, "held_out") for i in range(n)]
        captions = [world.caption(s) for s in scenes]
        records = [self._record(s) for s in scenes]
        out: dict[str, Any] = {
            key: np.stack([r[key] for r in records])
            for key in ("latent", "map", "tokens", "context")
        }
        out.update(
            caption=captions,
            scene=scenes,
            categories=[world.caption_categories(t) for t in captions],
        )
        return out

    def segment(self, images: np.ndarray, size: int | None = None) -> np.ndarray:
        """The oracle: uint8 [..., H, W, 3] → int32 [..., size, size] maps (default M)."""
        return oracle.segment(images, self.config.map_size if size is None else size)

    def map_agreement(self, images: np.ndarray, maps: np.ndarray) -> np.ndarray:
        """Per-example pixel accuracy of ``maps`` against the oracle's reading of ``images``.

        Args:
          images: uint8 [B, H, W, 3] (e.g. decoded generated latents).
          maps: int [B, M, M] category maps (e.g. generated ones).

        Returns:
          float32 [B] in [0, 1].
        """
        maps = np.asarray(maps)
        seg = oracle.segment(images, maps.shape[-1])
        return np.mean(seg == maps, axis=(-2, -1)).astype(np.float32)

    def caption_recall(self, captions: Sequence[str], maps: np.ndarray) -> np.ndarray:
        """Per-example share of each caption's categories that appear in its map.

        Args:
          captions: B captions.
          maps: int [B, M, M] category maps.

        Returns:
          float32 [B] in [0, 1] (1 for captions naming no category).
        """
        out = []
        for caption, m in zip(captions, np.asarray(maps), strict=True):
            ids = world.caption_categories(caption)
            present = set(np.unique(m).tolist())
            out.append(sum(i in present for i in ids) / len(ids) if ids else 1.0)
        return np.asarray(out, dtype=np.float32)


class SyntheticSource:
    """A grain random-access source over one split of a :class:`SyntheticWorld`.

    Records (one schema): ``latent`` float32 [S, S, C], ``map`` int32 [M, M], ``tokens``
    int32 [T], ``context`` float32 [T, D]. Each is a pure function of (seed, split, index);
    the source pickles as its config, so grain workers are cheap to start.
    """

    def __init__(
        self,
        world_or_config: SyntheticWorld | SyntheticWorldConfig,
        split: str = "train",
        num_records: int | None = None,
    ):
        """Args:
        world_or_config: the world (or its config).
        split: "train" or "held_out".
        num_records: length; default ``config.num_records``.
        """
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}; choose one of {SPLITS}.")
        self.world = (
            world_or_config
            if isinstance(world_or_config, SyntheticWorld)
            else SyntheticWorld(world_or_config)
        )
        self.split = split
        self.num_records = self.world.config.num_records if num_records is None else num_records

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < self.num_records:
            raise IndexError(f"Index {index} outside [0, {self.num_records}).")
        return self.world.example(index, self.split)

    def __repr__(self) -> str:
        return (
            f"SyntheticSource(split={self.split!r}, num_records={self.num_records}, "
            f"config={self.world.config})"
        )

    @property
    def empty_context(self) -> np.ndarray:
        """float32 [T, D]: the unconditional (empty-caption) context."""
        return self.world.empty_context

    def caption(self, index: int) -> str:
        """Caption text of record ``index``."""
        return self.world.caption(index, self.split)

    def scene(self, index: int) -> world.Scene:
        """Scene of record ``index``."""
        return self.world.scene(index, self.split)

    def image(self, index: int) -> np.ndarray:
        """uint8 [R, R, 3]: full-resolution image of record ``index``."""
        return self.world.render(self.scene(index))


def synthetic_world(data: DataSpec) -> SyntheticWorld:
    """The synthetic world whose sizes match ``data``."""
    return SyntheticWorld(SyntheticWorldConfig.from_data_spec(data))


def synthetic_dataset(data: DataSpec, split: str) -> tuple[SyntheticSource, DatasetInfo]:
    """``(source, DatasetInfo)`` of the synthetic world's ``split`` (``train``/``held_out``)."""
    w = synthetic_world(data)
    scale = np.float32(data.latent_scale)
    info = DatasetInfo(
        empty_context=w.empty_context,
        encode_text=w.encode_text,
        encode_images=lambda images: w.autoencoder.encode(images) * scale,
        decode_latents=lambda latents: w.autoencoder.decode(np.asarray(latents) / scale),
        category_names=dict(w.category_names),
        colour_table=w.colour_table(),
        eval_prompts=tuple(w.held_out_prompts(data.num_eval_prompts)["caption"]),
    )
    return SyntheticSource(w, split), info
