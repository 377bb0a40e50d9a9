"""Diffusion math: schedules, analog bits, maps, losses, DPM-Solver++ and guided sampling."""
