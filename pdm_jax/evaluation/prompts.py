"""Evaluation's prompts: what sample ``i`` is conditioned on and compared with.

Sample ``i`` of COCO uses val record ``i mod R`` and its caption ``(i div R) mod K``; of
the synthetic world, held-out example ``i``. Each process takes a contiguous slice of the
indices (``pdm_jax.sampling.sampler.host_indices``).
"""

import dataclasses
from typing import Any

import numpy as np

from pdm_jax import specs
from pdm_jax.data.coco import source as coco_source
from pdm_jax.data.synthetic import dataset as synthetic


@dataclasses.dataclass(frozen=True)
class Prompt:
    """What sample ``i`` is conditioned on and compared with.

    Attributes:
      caption: the caption sampled with.
      captions: every caption of the reference image (the CLIP score averages over them).
      context: float32 [T, D] text context of ``caption``.
      map: int32 [M, M] ground-truth ids at the model's map side, None for a U-ViT.
    """

    caption: str
    captions: tuple[str, ...]
    context: np.ndarray
    map: np.ndarray | None


class SyntheticPrompts:
    """Held-out example ``i`` of the synthetic world (its oracle is ``self.world``)."""

    def __init__(self, world: Any, with_map: bool):
        self.world, self.with_map = world, with_map

    def __getitem__(self, i: int) -> Prompt:
        example = self.world.example(i, "held_out")
        caption = self.world.caption(i, "held_out")
        ref = np.asarray(example["map"], np.int32) if self.with_map else None
        return Prompt(caption, (caption,), np.asarray(example["context"], np.float32), ref)

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

    def __getitem__(self, i: int) -> Prompt:
        rec = self.source[i % self.num_records]
        captions = tuple(rec["captions"])
        k = (i // self.num_records) % len(captions)
        ref = np.asarray(rec["map"], np.int32) if "map" in rec else None
        return Prompt(captions[k], captions, np.asarray(rec["contexts"][k], np.float32), ref)

    def identity(self) -> dict[str, Any]:
        """What the prompts depend on (compared when resuming)."""
        meta = self.source.metadata
        text = {k: v for k, v in meta.get("text_encoder", {}).items() if k != "path"}
        return {"source": "coco", "records": self.num_records, "text_encoder": text}


def eval_prompts(config: specs.RunSpec) -> tuple[Any, Any]:
    """The validation prompts of ``config.data.source`` and its oracle world (or None)."""
    if config.data.source == "synthetic":
        world = synthetic.synthetic_world(config.data)
        return SyntheticPrompts(world, config.model.has_map), world
    if config.data.source == "coco":
        return CocoPrompts(coco_source.coco_source_from_spec(config.data, "val")), None
    raise ValueError(
        f"Evaluation reads validation captions from data.source 'coco' or 'synthetic', got "
        f"{config.data.source!r}."
    )
