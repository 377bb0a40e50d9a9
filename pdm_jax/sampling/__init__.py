"""Sampling: one sampler object (resident parameters, compiled programs) and sample mode."""
