"""Training (a run mode): train state, pure train step, where a run starts, the loop."""
