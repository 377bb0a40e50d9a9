"""Runtime weight loaders: torch/safetensors files, VAE, CLIP text, converted components."""
