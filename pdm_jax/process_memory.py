"""This process's peak resident memory, and resetting it to time one phase of a run.

Imports nothing of JAX: ``pdm_jax/torch_reference.py`` uses it in a process that must hold
PyTorch alone.
"""

import resource


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
