"""Writes the golden fixtures of ``tests/convert/test_official.py`` (needs torch + einops).

Run from anywhere with the official repositories checked out::

    python tests/convert/data/make_official_fixtures.py \
        --uvit_libs=/path/to/baofff+U-ViT/libs \
        --pdm_libs=/path/to/yinghanlong+PanopticDiffusionModels/libs

For each fixture it builds the official ``libs/uvit_t2i.UViT`` with the kwargs below,
overwrites every parameter with seeded random values (zero convs included, so the
two-stream map→image path is exercised), runs seeded random inputs and stores the state
dict (``sd/<official name>``), the inputs and the outputs, all NHWC, float32.
"""

import argparse
import importlib
import importlib.util
import json
import pathlib
import sys

import numpy as np
import torch

BASE = {
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
FIXTURES = {
    "uvit": ("uvit", {**BASE, "qkv_bias": True, "mlp_time_embed": True}),
    "one_stream": ("pdm", {**BASE, "enable_panoptic": True, "separate": False}),
    "two_stream": ("pdm", {**BASE, "enable_panoptic": True, "separate": True}),
}
SEED = 0
BATCH = 2


def _load_uvit_t2i(libs: str, alias: str):
    """Imports ``<libs>/uvit_t2i.py`` as part of a package named ``alias``."""
    spec = importlib.util.spec_from_file_location(
        alias, f"{libs}/__init__.py", submodule_search_locations=[libs]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules[alias] = package
    spec.loader.exec_module(package)
    return importlib.import_module(f"{alias}.uvit_t2i")


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights ~ N(0, 1/fan_in), LayerNorm scales 1 + N(0, .2²), biases N(0, .1²), pos N(0, .5²)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=gen)
            if name.endswith("weight") and p.ndim >= 2:
                p.copy_(r / float(np.sqrt(np.prod(p.shape[1:]))))
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.2 * r)
            elif name.endswith("bias"):
                p.copy_(0.1 * r)
            else:
                p.copy_(0.5 * r)


def _inputs(kwargs: dict, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    s, c, bits = kwargs["img_size"], kwargs["in_chans"], 8
    m = np.sign(rng.standard_normal((BATCH, s, s, bits))) + 2 * rng.standard_normal(
        (BATCH, s, s, bits)
    )
    ctx = (BATCH, kwargs["num_clip_token"], kwargs["clip_dim"])
    return {
        "x": rng.standard_normal((BATCH, s, s, c)).astype(np.float32),
        "m": m.astype(np.float32),
        "t": rng.uniform(1.0, 1000.0, (BATCH,)).astype(np.float32),
        "context": rng.standard_normal(ctx).astype(np.float32),
    }


def _nchw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.numpy().transpose(0, 2, 3, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uvit_libs", required=True)
    parser.add_argument("--pdm_libs", required=True)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent))
    args = parser.parse_args()
    modules = {
        "uvit": _load_uvit_t2i(args.uvit_libs, "official_uvit_libs"),
        "pdm": _load_uvit_t2i(args.pdm_libs, "official_pdm_libs"),
    }
    for name, (repo, kwargs) in FIXTURES.items():
        torch.manual_seed(SEED)
        model = modules[repo].UViT(**kwargs).eval()
        _randomize(model, SEED)
        inputs = _inputs(kwargs, SEED + 1)
        if repo == "uvit":
            inputs.pop("m")
        data = {"kwargs": np.array(json.dumps(kwargs)), **inputs}
        data.update({f"sd/{k}": v.numpy() for k, v in model.state_dict().items()})
        x, t, ctx = _nchw(inputs["x"]), torch.from_numpy(inputs["t"]), inputs["context"]
        ctx = torch.from_numpy(ctx)
        with torch.no_grad():
            if repo == "uvit":
                data["eps"] = _nhwc(model(x, t, ctx))
            else:
                eps, map0 = model(x, t, ctx, mask_token=_nchw(inputs["m"]))
                data["eps"], data["map0"] = _nhwc(eps), _nhwc(map0)
                eps_given, _ = model(
                    x, t, ctx, mask_token=_nchw(inputs["m"]), use_ground_truth=True
                )
                data["eps_given"] = _nhwc(eps_given)
        path = pathlib.Path(args.out) / f"official_{name}_tiny.npz"
        np.savez_compressed(path, **data)
        print(f"{path}: {sum(v.size for k, v in data.items() if k.startswith('sd/'))} params")


if __name__ == "__main__":
    main()
