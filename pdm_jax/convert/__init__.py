"""Weight conversion between official PyTorch layouts and pdm_jax parameters."""
