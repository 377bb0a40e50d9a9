"""Evaluation's prompts: what sample ``i`` is conditioned on and compared with.

Sample ``i`` of COCO uses val record ``i mod R`` and its caption ``(i div R) mod K``; of
the synthetic world, held-out example ``i``. Each process takes a contiguous slice of the
indices (``pdm_jax.sampling.sampler.host_indices``). The inpainting task regenerates a box of
sample ``i`` (``inpaint_mask``), drawn from ``(eval.seed, i)``.
"""

import dataclasses
from typing import Any

import numpy as np

from pdm_jax import specs
from pdm_jax.data.coco import panoptic as coco_panoptic
from pdm_jax.data.coco import source as coco_source
from pdm_jax.data.synthetic import dataset as synthetic
from pdm_jax.data.synthetic import world as world_lib


@dataclasses.dataclass(frozen=True)
class Prompt:
    """What sample ``i`` is conditioned on and compared with.

    Attributes:
      caption: the caption sampled with.
      captions: every caption of the reference image (the CLIP score averages over them).
      context: float32 [T, D] text context of ``caption``.
      map: int32 [M, M] ground-truth ids at the model's map side, None for a U-ViT.
      latent: float32 [S, S, C] the reference image's latent as the model sees it (times
        ``data.latent_scale``; COCO: the VAE posterior mean): the given image of the
        given-image and inpainting tasks.
    """

    caption: str
    captions: tuple[str, ...]
    context: np.ndarray
    map: np.ndarray | None
    latent: np.ndarray | None = None


class SyntheticPrompts:
    """Held-out example ``i`` of the synthetic world (its oracle is ``self.world``)."""

    thing_ids: tuple[int, ...] = world_lib.THING_IDS
    stuff_ids: tuple[int, ...] = world_lib.STUFF_IDS

    def __init__(self, world: Any, with_map: bool, latent_scale: float = 1.0):
        self.world, self.with_map = world, with_map
        self.latent_scale = np.float32(latent_scale)

    def __getitem__(self, i: int) -> Prompt:
        example = self.world.example(i, "held_out")
        caption = self.world.caption(i, "held_out")
        ref = np.asarray(example["map"], np.int32) if self.with_map else None
        latent = np.asarray(example["latent"], np.float32) * self.latent_scale
        return Prompt(caption, (caption,), np.asarray(example["context"], np.float32), ref, latent)

    def identity(self) -> dict[str, Any]:
        """What the prompts depend on (compared when resuming)."""
        return {"source": "synthetic", "world": dataclasses.asdict(self.world.config)}


class CocoPrompts:
    """COCO val record ``i mod R`` with its caption ``(i div R) mod K`` (module docstring)."""

    def __init__(self, source: Any):
        """Args: source: a ``CocoSource`` in the moments view (``sample_latent=False``)."""
        self.source, self.num_records = source, len(source)
        if not self.num_records:
            raise ValueError(f"{source} has no records to take validation captions from.")
        categories = coco_panoptic.load_categories()
        self.thing_ids = tuple(c["id"] for c in categories if c["isthing"])
        self.stuff_ids = tuple(c["id"] for c in categories if not c["isthing"])

    def __getitem__(self, i: int) -> Prompt:
        rec = self.source[i % self.num_records]
        captions = tuple(rec["captions"])
        k = (i // self.num_records) % len(captions)
        ref = np.asarray(rec["map"], np.int32) if "map" in rec else None
        moments = np.asarray(rec["moments"], np.float32)
        latent = moments[..., : moments.shape[-1] // 2] * np.float32(self.source.latent_scale)
        context = np.asarray(rec["contexts"][k], np.float32)
        return Prompt(captions[k], captions, context, ref, latent)

    def identity(self) -> dict[str, Any]:
        """What the prompts depend on (compared when resuming)."""
        meta = self.source.metadata
        text = {k: v for k, v in meta.get("text_encoder", {}).items() if k != "path"}
        return {"source": "coco", "records": self.num_records, "text_encoder": text}


def eval_prompts(config: specs.RunSpec) -> tuple[Any, Any]:
    """The validation prompts of ``config.data.source`` and its oracle world (or None)."""
    if config.data.source == "synthetic":
        world = synthetic.synthetic_world(config.data)
        return SyntheticPrompts(world, config.model.has_map, config.data.latent_scale), world
    if config.data.source == "coco":
        return CocoPrompts(coco_source.coco_source_from_spec(config.data, "val")), None
    raise ValueError(
        f"Evaluation reads validation captions from data.source 'coco' or 'synthetic', got "
        f"{config.data.source!r}."
    )


def inpaint_mask(seed: int, index: int, side: int, fraction: float) -> np.ndarray:
    """The box the inpainting task regenerates in sample ``index`` (1 = regenerate).

    One axis-aligned box of about ``fraction · side²`` cells, aspect ratio drawn
    log-uniformly in [1/2, 2], placed uniformly; the draws come from
    ``np.random.default_rng((seed, index))``, so the mask depends on the sample only.

    Args:
      seed: ``eval.seed``.
      index: the sample index.
      side: the latent side S (the map's box is the same box at the map side).
      fraction: the share of the image to regenerate, in (0, 1).

    Returns:
      bool [side, side], True inside the box.

    Raises:
      ValueError: if ``fraction`` is not in (0, 1).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"eval.mask_fraction={fraction} must lie in (0, 1).")
    rng = np.random.default_rng((int(seed), int(index)))
    area = fraction * side * side
    aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    h = int(np.clip(round(np.sqrt(area * aspect)), 1, side))
    w = int(np.clip(round(area / h), 1, side))
    top, left = int(rng.integers(0, side - h + 1)), int(rng.integers(0, side - w + 1))
    mask = np.zeros((side, side), bool)
    mask[top : top + h, left : left + w] = True
    return mask


def upscale_mask(mask: np.ndarray, side: int) -> np.ndarray:
    """A [S, S] cell mask at ``side`` (a multiple of S): each cell becomes a block."""
    factor, rest = divmod(side, mask.shape[-1])
    if rest or factor < 1:
        raise ValueError(f"Map side {side} is not a multiple of the mask side {mask.shape[-1]}.")
    return np.repeat(np.repeat(mask, factor, axis=-2), factor, axis=-1)
