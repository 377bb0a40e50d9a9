"""Test helper: JAX's on-disk compilation cache in a directory, for some tests only.

``trainer.train_and_evaluate`` jits its initialiser and step anew on every call; tests that
run it several times (a restart, a resume) compile the same programs each time. With the
cache the later runs load the executables the first one compiled instead. What such tests
check (the restored state, the data position, the steps after a restart) does not depend
on where the executable came from.
"""

import contextlib
from collections.abc import Iterator
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache


@contextlib.contextmanager
def compilation_cache_in(directory: Path) -> Iterator[None]:
    """Compiled programs are cached in ``directory`` while the context is open."""
    jax.config.update("jax_compilation_cache_dir", str(directory))
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", None)
        compilation_cache.reset_cache()
