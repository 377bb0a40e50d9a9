"""Training: train state, train step, trainer loop."""
