"""Evaluation (a run mode): ``--mode=evaluate``, the demo's figures, FID, CLIP score, MCD."""
