"""Running ``python -m pdm_jax.main`` as a user does, from the repository root."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_module(
    module: str, *args: str, env: dict[str, str] | None = None, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    """``python -m <module> *args`` in ``cwd``; stdout and stderr captured as text."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def run_main(
    *args: str, env: dict[str, str] | None = None, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    """``python -m pdm_jax.main *args`` in ``cwd``; stdout and stderr captured as text."""
    return run_module("pdm_jax.main", *args, env=env, cwd=cwd)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env() -> dict[str, str]:
    """This environment for a child that makes its own CPU devices.

    The test process's ``--xla_force_host_platform_device_count=8`` (tests/conftest.py) is
    dropped: each child asks for its own count (``--config.sharding.cpu_devices``).
    """
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    return env


def run_processes(
    *args: str,
    num_processes: int,
    devices: int,
    timeout: float = 600,
    signal_when: tuple[int, str, int] | None = None,
) -> list[subprocess.CompletedProcess]:
    """``num_processes`` processes of ``python -m pdm_jax.main *args --distributed …``.

    They join through a coordinator on a free port of 127.0.0.1, each with ``devices`` CPU
    devices (``--config.sharding.cpu_devices``); their output goes to files read back at
    the end (a pipe left unread could block a process that the others wait for).

    Args:
      *args: the command's flags, the same for every process.
      num_processes: how many processes.
      devices: CPU devices per process.
      timeout: seconds before every process is killed.
      signal_when: ``(process_id, text, signum)``: once that process's stderr shows
        ``text``, send ``signum`` to that process only.

    Returns:
      One ``CompletedProcess`` per process (stdout and stderr as text).
    """
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="pdm_processes_"))
    procs = []
    for i in range(num_processes):
        cmd = [
            sys.executable,
            "-m",
            "pdm_jax.main",
            *args,
            "--distributed",
            f"--coordinator_address=127.0.0.1:{port}",
            f"--num_processes={num_processes}",
            f"--process_id={i}",
            f"--config.sharding.cpu_devices={devices}",
        ]
        with open(tmp / f"{i}.out", "w") as out, open(tmp / f"{i}.err", "w") as err:
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=cpu_env(), stdout=out, stderr=err))
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if signal_when is not None:
                target, text, signum = signal_when
                if text in (tmp / f"{target}.err").read_text(errors="replace"):
                    procs[target].send_signal(signum)
                    signal_when = None
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    results = [
        subprocess.CompletedProcess(
            p.args,
            p.returncode,
            (tmp / f"{i}.out").read_text(errors="replace"),
            (tmp / f"{i}.err").read_text(errors="replace"),
        )
        for i, p in enumerate(procs)
    ]
    shutil.rmtree(tmp)
    return results


def describe(results: Sequence[subprocess.CompletedProcess]) -> str:
    """Each process's exit status and the end of its stderr (for assertion messages)."""
    return "\n".join(
        f"process {i}: rc={r.returncode}\n{r.stderr[-3000:]}" for i, r in enumerate(results)
    )
