"""Evaluation: FID, CLIP score, MCD."""
