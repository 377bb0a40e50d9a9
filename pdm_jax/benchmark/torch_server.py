"""python pdm_jax/benchmark/torch_server.py '<json>': diffusers' PyTorch UNet forward, timed.

The reference side of ``python -m pdm_jax.benchmark --reference=diffusers``, run by it in a
fresh process that imports nothing of JAX, so that its peak RSS is PyTorch's alone. The
argument is ``{"unet_config": <diffusers config dict>, "latent": [B, C, H, W], "context":
[B, T, D], "timestep": int, "warmup": int, "repeats": int}``.

The process builds the UNet (random weights), makes the untimed calls (the first and
``warmup`` more), prints ``{"ready": true}`` and then takes one command per line on stdin:
``run`` times one forward call and prints ``{"seconds": s}``; ``done`` (or the end of
stdin) prints the record and exits. The benchmark alternates these calls with its own, so
that both sides are timed over the same stretch of a machine whose speed drifts. With
``repeats`` > 0 in the request it reads no commands and times that many calls back to
back.

The last line printed is the JSON record ``{"median_s", "min_s", "times_s",
"peak_memory_bytes", "peak_memory_source", "run_peak_memory_bytes", "torch_threads",
"diffusers_unet_params"}``: the process's peak RSS, and its peak over the timed calls
alone (the peak is reset after the warm-up; None where the system cannot reset it).
"""

import json
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from pdm_jax.benchmark.memory import phase_peak


def build_forward(request: dict[str, Any]) -> tuple[Callable[[], None], int, int]:
    """diffusers' ``UNet2DConditionModel`` (random weights) and one forward call on the
    request's shapes, in inference mode.

    Returns:
      ``(forward, parameter count, torch threads)``.
    """
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    net = UNet2DConditionModel.from_config(request["unet_config"]).eval()
    x = torch.randn(request["latent"])
    context = torch.randn(request["context"])
    t = torch.full((x.shape[0],), int(request["timestep"]))

    def forward() -> None:
        with torch.inference_mode():
            net(x, t, encoder_hidden_states=context)

    return forward, sum(p.numel() for p in net.parameters()), torch.get_num_threads()


def serve(
    request: dict[str, Any],
    commands: Iterable[str] | None,
    emit: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """Builds and warms up the forward, then times it once per ``run`` command.

    Args:
      request: the JSON request described in the module docstring.
      commands: lines (``run`` / ``done``); None: time ``request["repeats"]`` calls back to
        back.
      emit: called with ``{"ready": True}`` after the warm-up and, when commands are
        given, ``{"seconds": s}`` after each call.

    Returns:
      The record described in the module docstring.

    Raises:
      ValueError: for an unknown command, or when no call was timed.
    """
    forward, num_params, threads = build_forward(request)
    for _ in range(1 + request["warmup"]):  # the first call is not timed (as ours)
        forward()
    emit({"ready": True})
    commanded = commands is not None
    if not commanded:
        commands = ["run"] * int(request["repeats"])
    times = []
    with phase_peak() as rss:
        for command in commands:
            command = command.strip()
            if command == "done":
                break
            if command != "run":
                raise ValueError(f"Unknown command {command!r}; send 'run' or 'done'.")
            t0 = time.perf_counter()
            forward()
            times.append(time.perf_counter() - t0)
            if commanded:
                emit({"seconds": times[-1]})
    if not times:
        raise ValueError("No forward call was timed: send at least one 'run'.")
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "times_s": times,
        "peak_memory_bytes": rss.process_bytes,
        "peak_memory_source": rss.source,
        "run_peak_memory_bytes": rss.phase_bytes,
        "torch_threads": threads,
        "diffusers_unet_params": num_params,
    }


def _emit(message: dict[str, Any]) -> None:
    print(json.dumps(message), flush=True)


if __name__ == "__main__":
    request = json.loads(sys.argv[1])
    _emit(serve(request, None if request["repeats"] else sys.stdin, _emit))
