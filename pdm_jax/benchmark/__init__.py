"""Timing and planning the model's compiled programs: ``python -m pdm_jax.benchmark``.

- ``programs``: the programs measured (train step, denoiser, sampler) on synthetic batches.
- ``timing``: compiles, warms up and times one of them (``run_benchmark``).
- ``plan``: compiles the sharded train step without running it: memory and collectives.
- ``reference``: diffusers' PyTorch UNet on the same shapes, in its own process.
- ``torch_server``: that process (run by path; imports nothing of JAX).
- ``memory``: the process's peak resident memory, per phase.
- ``__main__``: the command line.

The package imports none of its modules, so that ``torch_server`` stays free of JAX.
"""
