"""Regenerates the golden UNet fixtures of ``test_unet.py`` with diffusers' PyTorch UNet.

Writes ``data/unet_tiny_sd1.npz`` and ``data/unet_tiny_sd2.npz``: diffusers'
``UNet2DConditionModel`` built from the packaged ``tiny_sd1`` (SD 1.x layout: 1×1-conv
projections, one head count) and ``tiny_sd2`` (SD 2.x layout: linear projections,
per-block head counts; also ``flip_sin_to_cos=False``, ``freq_shift=1``) configs::

    python -m tests.models.make_unet_fixtures --output_dir=tests/models/data

torch and diffusers are imported only when ``main`` runs. What a fixture holds:

* ``config``: the diffusers config as JSON;
* ``sd/<name>``: every tensor of the state dict, refilled after construction from one
  stream (``torch.manual_seed(0)``, ``named_parameters`` order): ``z / sqrt(fan_in)`` for
  matrices and kernels, ``1 + 0.2 z`` for norm scales, ``0.1 z`` for biases, so every
  tensor (norms and biases included) carries signal; values are rounded to float16 and
  stored as float16 (the forward pass runs in float32 on exactly these values);
* inputs from ``np.random.default_rng(1)``: ``x ~ N(0, 1)`` ``[2, 8, 8, 4]`` (NHWC),
  ``t = [17, 901]`` (diffusers' discrete timesteps), ``context ~ N(0, 1)``
  ``[2, 5, cross_attention_dim]``;
* ``eps``: the diffusers output, NHWC float32.
"""

import json
import pathlib

import numpy as np
from absl import app, flags

from pdm_jax.models.unet import load_packaged_config

FLAGS = flags.FLAGS
NAMES = ("tiny_sd1", "tiny_sd2")


def randomise(model, torch) -> None:
    """Refills every parameter of ``model`` from one seeded stream (see module doc)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            z = torch.randn(p.shape)
            if p.ndim >= 2:
                p.copy_(z / np.sqrt(np.prod(p.shape[1:])))
            elif name.endswith("weight"):
                p.copy_(1 + 0.2 * z)
            else:
                p.copy_(0.1 * z)
            p.copy_(p.half().float())


def fixture(config: dict, torch, unet_cls) -> dict[str, np.ndarray]:
    """The fixture arrays of one config."""
    model = unet_cls(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    randomise(model, torch)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([17, 901], np.int64)
    context = rng.standard_normal((2, 5, config["cross_attention_dim"])).astype(np.float32)
    with torch.no_grad():
        eps = model(
            torch.from_numpy(x).permute(0, 3, 1, 2),
            torch.from_numpy(t),
            encoder_hidden_states=torch.from_numpy(context),
        ).sample
    out = {f"sd/{k}": v.numpy().astype(np.float16) for k, v in model.state_dict().items()}
    out.update(
        config=np.array(json.dumps(config)),
        x=x,
        t=t,
        context=context,
        eps=eps.permute(0, 2, 3, 1).numpy(),
    )
    return out


def main(argv) -> None:
    del argv
    import torch
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(2)
    out_dir = pathlib.Path(FLAGS.output_dir)
    for name in NAMES:
        arrays = fixture(load_packaged_config(name), torch, UNet2DConditionModel)
        np.savez(out_dir / f"unet_{name}.npz", **arrays)
        print(f"wrote {out_dir / f'unet_{name}.npz'}")


if __name__ == "__main__":
    flags.DEFINE_string("output_dir", "tests/models/data", "Where to write the .npz files.")
    app.run(main)
