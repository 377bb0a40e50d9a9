"""pdm_jax: Panoptic Diffusion Models in JAX/Flax (image + panoptic map co-generation)."""

__version__ = "0.1.0"
