"""Running ``python -m pdm_jax.main`` as a user does, from the repository root."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_main(
    *args: str, env: dict[str, str] | None = None, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    """``python -m pdm_jax.main *args`` in ``cwd``; stdout and stderr captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "pdm_jax.main", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
