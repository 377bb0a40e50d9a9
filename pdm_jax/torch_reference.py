"""python pdm_jax/torch_reference.py '<json>': diffusers' PyTorch UNet forward, timed.

The reference side of ``python -m pdm_jax.benchmark --reference=diffusers``, run by it in a
fresh process that imports nothing of JAX, so that its peak RSS is PyTorch's alone. The
argument is ``{"unet_config": <diffusers config dict>, "latent": [B, C, H, W], "context":
[B, T, D], "timestep": int, "warmup": int, "repeats": int}``; the last line printed is the
JSON record ``{"median_s", "min_s", "peak_memory_bytes", "peak_memory_source",
"run_peak_memory_bytes", "torch_threads", "diffusers_unet_params"}``: the process's peak
RSS, and its peak over the timed calls alone (the peak is reset after the warm-up; None
where the system cannot reset it).
"""

import json
import statistics
import sys
import time
from typing import Any

from pdm_jax.process_memory import phase_peak


def time_diffusers_unet(request: dict[str, Any]) -> dict[str, Any]:
    """Builds diffusers' ``UNet2DConditionModel`` (random weights) and times its forward.

    Args:
      request: the JSON request described in the module docstring.

    Returns:
      The record described in the module docstring.
    """
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    net = UNet2DConditionModel.from_config(request["unet_config"]).eval()
    x = torch.randn(request["latent"])
    context = torch.randn(request["context"])
    t = torch.full((x.shape[0],), int(request["timestep"]))
    with torch.inference_mode():
        for _ in range(1 + request["warmup"]):  # the first call is not timed (as ours)
            net(x, t, encoder_hidden_states=context)
        times = []
        with phase_peak() as rss:
            for _ in range(request["repeats"]):
                t0 = time.perf_counter()
                net(x, t, encoder_hidden_states=context)
                times.append(time.perf_counter() - t0)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "peak_memory_bytes": rss.process_bytes,
        "peak_memory_source": rss.source,
        "run_peak_memory_bytes": rss.phase_bytes,
        "torch_threads": torch.get_num_threads(),
        "diffusers_unet_params": sum(p.numel() for p in net.parameters()),
    }


if __name__ == "__main__":
    print(json.dumps(time_diffusers_unet(json.loads(sys.argv[1]))))
