"""This process's peak resident memory, and resetting it to time one phase of a run.

Imports nothing of JAX: ``torch_server.py`` uses it in a process that must hold PyTorch
alone.
"""

import contextlib
import ctypes
import ctypes.util
import dataclasses
import resource
from collections.abc import Iterator


def peak_rss() -> tuple[int, str]:
    """``(bytes, source)``: the peak RSS since the start or the last :func:`reset_peak_rss`.

    Linux keeps ``ru_maxrss`` across ``execve`` (a child started by a large process
    inherits its figure) and never resets it, so ``VmHWM`` of ``/proc/self/status`` is
    read where there is one (``source`` ``"process_vmhwm"``, else ``"process_rss"``).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "process_vmhwm"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_rss"


def reset_peak_rss() -> bool:
    """Resets ``VmHWM`` to the current RSS (Linux ≥ 4.0: ``5`` → ``/proc/self/clear_refs``).

    Returns:
      Whether it was reset; elsewhere the peak keeps counting from the start.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_free_heap() -> bool:
    """Returns the heap memory this process has freed to the OS (glibc ``malloc_trim(0)``).

    What compilation, initialisation and warm-up freed stays resident in malloc's arenas
    (about 1 GB after compiling SD's UNet) until trimmed; it holds no live data.

    Returns:
      Whether it was trimmed (False without glibc).
    """
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is None:
        return False
    trim(0)
    return True


@dataclasses.dataclass
class PhasePeak:
    """What :func:`phase_peak` measured: the process's peak RSS from its start
    (``process_bytes``), the peak of the enclosed phase alone (``phase_bytes``; None where
    the peak cannot be reset) and where they were read (``source``)."""

    process_bytes: int = 0
    phase_bytes: int | None = None
    source: str = ""


@contextlib.contextmanager
def phase_peak() -> Iterator[PhasePeak]:
    """Measures the peak RSS of the enclosed code, and the process's peak from its start.

    On entry the freed heap goes back to the OS (:func:`release_free_heap`) and the peak is
    reset (:func:`reset_peak_rss`), so the code before it (set-up, compilation, warm-up)
    counts only in ``process_bytes``. The fields are filled on exit.
    """
    before, source = peak_rss()
    release_free_heap()
    reset = reset_peak_rss()
    result = PhasePeak(source=source)
    yield result
    after, _ = peak_rss()
    result.process_bytes = max(before, after)
    result.phase_bytes = after if reset else None
