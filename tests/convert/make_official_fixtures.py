"""Regenerates the golden official-model fixtures of ``test_official.py``.

Writes ``official_{uvit,one_stream,two_stream}_tiny.npz`` (the files in ``data/``) from the
official PyTorch ``libs/uvit_t2i.py`` of two checkouts, which are not part of this
repository and are never imported at test time:

* ``--official_dir``: yinghanlong/PanopticDiffusionModels (the one- and two-stream PDMs);
* ``--uvit_dir``: baofff/U-ViT (the plain text-to-image U-ViT).

Each checkout's directory is put on ``sys.path`` while its ``libs.uvit_t2i`` is imported;
torch, einops and the official modules are imported only when ``main`` runs, never at
import. Example::

    python -m tests.convert.make_official_fixtures \\
        --official_dir=/src/PanopticDiffusionModels --uvit_dir=/src/U-ViT \\
        --output_dir=tests/convert/data

What a fixture holds (all float32, images NHWC like pdm_jax):

* ``kwargs``: the ``UViT(**kwargs)`` arguments as JSON (``TINY`` plus ``EXTRA_KWARGS``);
* ``sd/<name>``: every entry of the module's state dict, after the model was built under
  ``torch.manual_seed(0)`` and every parameter was then refilled, in ``named_parameters``
  order, from one stream re-seeded with ``torch.manual_seed(0)``: ``z = torch.randn(shape)``
  and ``0.5 z`` for positional embeddings, ``1 + 0.2 z`` for LayerNorm scales, ``0.1 z`` for
  other vectors (biases), ``z / sqrt(fan_in)`` for matrices and kernels (the zero-initialised
  convolutions included, so every path carries signal);
* inputs, batch 2, from ``np.random.default_rng(1)`` in this order: the map
  ``m = sign(N(0, 1)) + 2 N(0, 1)`` ``[2, 8, 8, 8]`` (analog bits plus noise of std 2), the
  latent ``x ~ N(0, 1)`` ``[2, 8, 8, 4]``, ``t ~ U(1, 1000)`` ``[2]``, the text context
  ``context ~ N(0, 1)`` ``[2, 3, 8]`` (the U-ViT fixture draws ``m`` too, so its ``x, t,
  context`` are the same, and does not store it);
* outputs of the module in eval mode: ``eps`` ``[2, 8, 8, 4]``; for the PDMs also ``map0``
  ``[2, 8, 8, 8]`` (``use_ground_truth=False``) and ``eps_given`` (``use_ground_truth=True``,
  the "given map" forward, whose map output is the input map itself).

Run against the official files with torch 2.13.0 (CPU, two threads), it reproduces the
committed fixtures bit for bit. The state dicts and inputs do not depend on the machine; the
outputs may differ in the last float32 bits with the CPU and torch's thread count (the tests
allow 1e-4).
"""

import argparse
import importlib
import json
import math
import pathlib
import sys

import numpy as np

TINY = {
    "img_size": 8,
    "patch_size": 2,
    "in_chans": 4,
    "embed_dim": 16,
    "depth": 4,
    "num_heads": 2,
    "mlp_ratio": 4,
    "clip_dim": 8,
    "num_clip_token": 3,
}
# Per fixture: which checkout builds it, and the kwargs beyond TINY.
EXTRA_KWARGS = {
    "uvit": ("uvit_dir", {"qkv_bias": True, "mlp_time_embed": True}),
    "one_stream": ("official_dir", {"enable_panoptic": True, "separate": False}),
    "two_stream": ("official_dir", {"enable_panoptic": True, "separate": True}),
}
BATCH = 2
NUM_BITS = 8
PARAM_SEED = 0
INPUT_SEED = 1


def random_inputs() -> dict[str, np.ndarray]:
    """The fixtures' inputs (NHWC float32), identical for every model."""
    rng = np.random.default_rng(INPUT_SEED)
    s, c = TINY["img_size"], TINY["in_chans"]
    bits = np.sign(rng.standard_normal((BATCH, s, s, NUM_BITS)))
    m = bits + 2.0 * rng.standard_normal((BATCH, s, s, NUM_BITS))
    x = rng.standard_normal((BATCH, s, s, c))
    t = rng.uniform(1.0, 1000.0, BATCH)
    context = rng.standard_normal((BATCH, TINY["num_clip_token"], TINY["clip_dim"]))
    arrays = {"x": x, "m": m, "t": t, "context": context}
    return {k: v.astype(np.float32) for k, v in arrays.items()}


def refill(name: str, z):
    """A parameter's new value from its standard-normal draw ``z`` (float32 tensor)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf.startswith("pos_embed"):
        return 0.5 * z
    if z.ndim == 1:
        is_norm = name.split(".")[-2].startswith("norm")
        return 1.0 + 0.2 * z if is_norm and leaf == "weight" else 0.1 * z
    return z / math.sqrt(math.prod(z.shape[1:]))


def load_official_module(repo_dir: pathlib.Path):
    """Imports ``libs.uvit_t2i`` from one official checkout (a fresh import each call)."""
    for key in [k for k in sys.modules if k == "libs" or k.startswith("libs.")]:
        del sys.modules[key]
    sys.path.insert(0, str(repo_dir))
    try:
        return importlib.import_module("libs.uvit_t2i")
    finally:
        sys.path.remove(str(repo_dir))


def make_fixture(module, name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Builds one official model, refills its parameters and records its outputs."""
    import torch

    kwargs = dict(TINY, **EXTRA_KWARGS[name][1])
    torch.manual_seed(PARAM_SEED)
    model = module.UViT(**kwargs).eval()
    torch.manual_seed(PARAM_SEED)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.copy_(refill(pname, torch.randn(p.shape)))

    def nchw(a):
        return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()

    def nhwc(t):
        return t.permute(0, 2, 3, 1).numpy().astype(np.float32)

    x, m = nchw(inputs["x"]), nchw(inputs["m"])
    t, context = torch.from_numpy(inputs["t"]), torch.from_numpy(inputs["context"])
    out = {"kwargs": np.array(json.dumps(kwargs)), "x": inputs["x"]}
    if name != "uvit":
        out["m"] = inputs["m"]
    out.update(t=inputs["t"], context=inputs["context"])
    out.update({f"sd/{k}": v.numpy().copy() for k, v in model.state_dict().items()})
    with torch.no_grad():
        if name == "uvit":
            out["eps"] = nhwc(model(x, t, context))
        else:
            eps, map0 = model(x, t, context, mask_token=m, use_ground_truth=False)
            eps_given, _ = model(x, t, context, mask_token=m, use_ground_truth=True)
            out.update(eps=nhwc(eps), map0=nhwc(map0), eps_given=nhwc(eps_given))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--official_dir",
        type=pathlib.Path,
        help="checkout of yinghanlong/PanopticDiffusionModels (one_stream, two_stream)",
    )
    parser.add_argument(
        "--uvit_dir", type=pathlib.Path, help="checkout of baofff/U-ViT (the uvit fixture)"
    )
    parser.add_argument("--output_dir", type=pathlib.Path, required=True)
    args = parser.parse_args(argv)
    dirs = {"official_dir": args.official_dir, "uvit_dir": args.uvit_dir}
    if not any(dirs.values()):
        parser.error("give --official_dir and/or --uvit_dir")
    for key, repo in dirs.items():
        if repo is not None and not (repo / "libs" / "uvit_t2i.py").is_file():
            parser.error(f"--{key}={repo} has no libs/uvit_t2i.py")

    args.output_dir.mkdir(parents=True, exist_ok=True)
    inputs = random_inputs()
    for name, (key, _) in EXTRA_KWARGS.items():
        if dirs[key] is None:
            print(f"skipping {name}: no --{key}")
            continue
        fixture = make_fixture(load_official_module(dirs[key]), name, inputs)
        path = args.output_dir / f"official_{name}_tiny.npz"
        np.savez_compressed(path, **fixture)
        print(f"wrote {path} ({len(fixture)} arrays)")


if __name__ == "__main__":
    main()
