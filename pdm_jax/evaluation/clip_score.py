"""CLIP score over precomputed embeddings, with the paper's convention.

``score = 100 · cos(image embedding, caption embedding)`` — 100 being CLIP's trained
``logit_scale.exp()`` — with no clamp at 0 (unlike torchmetrics' CLIPScore), averaged over
each image's captions, then over images. With the same number of captions per image this is
the official evaluation's mean over all (image, caption) pairs (five COCO captions per image,
ViT-B/32). Embeddings come from the CLIP model (``image_embeds`` / ``text_embeds``); they are
L2-normalised here again, so unnormalised projections give the same result.
"""

import numpy as np

LOGIT_SCALE = 100.0


def _normalise(x: np.ndarray, name: str) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    if np.any(norm == 0) or not np.all(np.isfinite(x)):
        raise ValueError(f"{name} has a zero or non-finite embedding; cosine is undefined there.")
    return x / norm


def clip_scores_per_image(image_embeds, text_embeds, text_mask=None) -> np.ndarray:
    """CLIP score of each image, averaged over its captions.

    Args:
      image_embeds: ``[N, E]`` image embeddings.
      text_embeds: ``[N, K, E]`` embeddings of up to K captions per image (``[N, E]`` for one).
      text_mask: optional ``[N, K]`` bool, True for real captions (padding slots False).

    Returns:
      ``[N]`` float64 scores ``100 · mean_k cos``, in [-100, 100].

    Raises:
      ValueError: on mismatched shapes, an image without captions, or a zero embedding.
    """
    img = np.asarray(image_embeds, np.float64)
    txt = np.asarray(text_embeds, np.float64)
    if txt.ndim == 2:
        txt = txt[:, None]
    if (
        img.ndim != 2
        or txt.ndim != 3
        or txt.shape[0] != img.shape[0]
        or txt.shape[2] != img.shape[1]
    ):
        raise ValueError(
            f"expected image_embeds [N, E] and text_embeds [N, K, E], got {img.shape} and "
            f"{np.shape(text_embeds)}."
        )
    mask = np.ones(txt.shape[:2], bool) if text_mask is None else np.asarray(text_mask, bool)
    if mask.shape != txt.shape[:2]:
        raise ValueError(f"text_mask must be [N, K] = {txt.shape[:2]}, got {mask.shape}.")
    n_captions = mask.sum(axis=1)  # [N]
    if np.any(n_captions == 0):
        raise ValueError(
            f"images {np.flatnonzero(n_captions == 0)[:5]} have no caption in text_mask; "
            "drop them before scoring."
        )
    img = _normalise(img, "image_embeds")
    txt = np.where(mask[..., None], txt, 1.0)  # padding slots are never scored
    cos = np.einsum("ne,nke->nk", img, _normalise(txt, "text_embeds"))  # [N, K]
    return LOGIT_SCALE * np.where(mask, cos, 0.0).sum(axis=1) / n_captions


def clip_score(image_embeds, text_embeds, text_mask=None) -> float:
    """Mean CLIP score over images (paper convention: 100·cos, no clamp).

    Args:
      image_embeds: ``[N, E]`` image embeddings.
      text_embeds: ``[N, K, E]`` (or ``[N, E]``) caption embeddings.
      text_mask: optional ``[N, K]`` bool mask of real captions.

    Returns:
      The mean over images of :func:`clip_scores_per_image`.
    """
    return float(clip_scores_per_image(image_embeds, text_embeds, text_mask).mean())
