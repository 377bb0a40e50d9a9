"""diffusers' PyTorch UNet as a reference for the denoise benchmark (``--reference=diffusers``).

The reference runs ``torch_server.py`` in a fresh process, which imports nothing of JAX,
so that its peak RSS is PyTorch's own. ``DiffusersReference`` times its calls one at a
time, alternating with ours; ``diffusers_reference`` times them back to back;
``with_reference`` adds its figures and our/its ratios to a benchmark record.
"""

import importlib.util
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
from typing import Any

from pdm_jax import specs
from pdm_jax.models.unet import resolve_config as resolve_unet_config

REFERENCES = ("none", "diffusers")


def _reference_request(config: Any, batch_size: int, repeats: int, warmup: int) -> dict[str, Any]:
    """The request ``torch_server.py`` takes for the denoise shapes of ``config``
    (``repeats`` calls back to back; 0: one per ``run`` command on its stdin).

    Raises:
      ValueError: for a model other than the plain UNet, or without torch and diffusers.
    """
    config = specs.as_run_spec(config)
    m = config.model
    if m.name != "unet":
        raise ValueError(
            f"--reference=diffusers compares the plain SD UNet (configs/pdm.py:unet,...), "
            f"not model {m.name!r}."
        )
    missing = [name for name in ("torch", "diffusers") if importlib.util.find_spec(name) is None]
    if missing:  # checked here: the child's traceback would be less clear
        raise ValueError(
            f"--reference=diffusers needs torch and diffusers (the torch extra); missing: "
            f"{', '.join(missing)}."
        )
    return {
        "unet_config": resolve_unet_config(m.unet_config),
        "latent": [batch_size, m.in_chans, m.img_size, m.img_size],
        "context": [batch_size, m.num_clip_token, m.clip_dim],
        "timestep": 499,  # our t = 500 (the denoise benchmark's) is diffusers' index 499
        "warmup": warmup,
        "repeats": repeats,
    }


# Run by path in a fresh process: importing it as ``pdm_jax.benchmark.torch_server`` from
# here would share our process (and its JAX).
_REFERENCE_SCRIPT = str(pathlib.Path(__file__).with_name("torch_server.py"))


def diffusers_reference(
    config: Any, batch_size: int, repeats: int = 5, warmup: int = 1
) -> dict[str, Any]:
    """Times diffusers' PyTorch ``UNet2DConditionModel`` forward on the denoise shapes,
    ``repeats`` calls back to back (``DiffusersReference`` alternates them with ours).

    Runs ``pdm_jax/benchmark/torch_server.py`` in a fresh process (no JAX in it), so that
    its peak RSS is PyTorch's own.

    Args:
      config: a run spec (or config) of the plain ``unet`` model.
      batch_size: the batch.
      repeats: timed calls.
      warmup: untimed calls after the first.

    Returns:
      ``{"median_s", "min_s", "times_s", "peak_memory_bytes", "peak_memory_source",
      "run_peak_memory_bytes", "torch_threads", "diffusers_unet_params"}``.

    Raises:
      ValueError: for a model other than the plain UNet, or without torch and diffusers.
      RuntimeError: when the reference process fails (with its stderr).
    """
    request = _reference_request(config, batch_size, repeats, warmup)
    result = subprocess.run(
        [sys.executable, _REFERENCE_SCRIPT, json.dumps(request)], capture_output=True, text=True
    )
    if result.returncode:
        raise RuntimeError(f"The diffusers reference failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


class DiffusersReference:
    """diffusers' PyTorch UNet forward in a fresh process, timed one call at a time.

    ``start()`` builds and warms it up; each ``time_call()`` runs one timed forward there
    (our process idles meanwhile) and returns its seconds; ``finish()`` returns its record
    (``diffusers_reference``'s, over the calls made). ``run_benchmark(between=...)``
    alternates these calls with ours, so that both sides are timed over the same stretch
    of a machine whose speed drifts (on a shared 2-core VM the same forward wandered from
    11 to 17 s within minutes). Use it as a context manager: the process is killed on the
    way out if it is still running.

    Raises (``__init__``):
      ValueError: for a model other than the plain UNet, or without torch and diffusers.
    """

    def __init__(self, config: Any, batch_size: int, warmup: int = 1):
        self._request = _reference_request(config, batch_size, 0, warmup)
        self._process: subprocess.Popen | None = None
        self._stderr: Any = None

    def __enter__(self) -> "DiffusersReference":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        if self._stderr is not None:
            self._stderr.close()

    def start(self) -> None:
        """Starts the process and waits until it has made its untimed calls.

        Raises:
          RuntimeError: when the process fails (with its stderr).
        """
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed on exit)
        self._process = subprocess.Popen(
            [sys.executable, _REFERENCE_SCRIPT, json.dumps(self._request)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        try:
            self._read("ready")
        except BaseException:
            self.__exit__()
            raise

    def _read(self, key: str) -> dict[str, Any]:
        """The next JSON message of the process, which must hold ``key``."""
        line = self._process.stdout.readline()
        if not line:
            self._process.wait()
            self._stderr.seek(0)
            raise RuntimeError(f"The diffusers reference failed:\n{self._stderr.read()[-3000:]}")
        message = json.loads(line)
        if key not in message:
            raise RuntimeError(f"The diffusers reference sent {line.strip()!r}, not {key!r}.")
        return message

    def _send(self, command: str) -> None:
        self._process.stdin.write(command + "\n")
        self._process.stdin.flush()

    def time_call(self) -> float:
        """Runs one timed forward in the reference process; returns its seconds."""
        self._send("run")
        return float(self._read("seconds")["seconds"])

    def finish(self) -> dict[str, Any]:
        """Ends the process; returns its record over the calls made."""
        self._send("done")
        record = self._read("median_s")
        self._process.wait()
        return record


def with_reference(record: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """``record`` with the reference's figures and our/its time and memory ratios.

    ``memory_ratio`` compares the peaks over the timed calls (both processes reset their
    peak RSS after the warm-up) where both have one, else the processes' whole peaks;
    ``process_memory_ratio`` always compares the whole peaks (set-up and compilation in).
    """
    ours, theirs = record.get("run_peak_memory_bytes"), reference.get("run_peak_memory_bytes")
    whole = record["peak_memory_bytes"] / reference["peak_memory_bytes"]
    pairs = [a / b for a, b in zip(record["times_s"], reference["times_s"], strict=False)]
    return {
        **record,
        "reference": reference,
        "time_ratio": record["median_s"] / reference["median_s"],
        "paired_time_ratio": statistics.median(pairs) if pairs else None,
        "memory_ratio": ours / theirs if ours and theirs else whole,
        "process_memory_ratio": whole,
    }
