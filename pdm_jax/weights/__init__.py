"""Runtime weight loaders: torch/safetensors files, VAE, CLIP, Inception, converted components."""
