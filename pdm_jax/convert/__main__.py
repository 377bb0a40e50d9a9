r"""python -m pdm_jax.convert pdm --input nnet_ema.pth --output ckpt/pdm

Converts PyTorch/Hugging Face weights to pdm_jax checkpoints, and back.

Kinds:

* ``uvit`` — an official U-ViT t2i state dict (``nnet.pth`` / ``nnet_ema.pth``); the result
  initialises a ``uvit`` model or the image stream of ``two_stream``
  (``--config.ckpt.init_from=<output>``).
* ``pdm`` — an official PDM state dict (one- or two-stream, from ``--config`` or
  ``--model_kwargs``).
* ``vae`` — ``autoencoder_kl.pth`` (CompVis/U-ViT naming) or a diffusers VAE directory.
* ``clip_text`` — a local Hugging Face CLIP directory (text tower and tokenizer).
* ``export`` — a pdm_jax checkpoint (``--input`` = workdir or step dir) to an official
  state dict: ``.pth`` (needs the torch extra) or ``.safetensors``.

Missing, unexpected or mis-shaped tensors fail with a list of each.
"""

import argparse
import importlib.util
import json
import pathlib
import sys
from collections.abc import Sequence

import ml_collections
import numpy as np

from pdm_jax import checkpointing, paths
from pdm_jax.convert import official
from pdm_jax.weights import components
from pdm_jax.weights.clip import _model_and_tokenizer_dirs, load_clip_text
from pdm_jax.weights.torch_io import load_state_dict, save_safetensors
from pdm_jax.weights.vae import load_vae

KINDS = ("uvit", "pdm", "vae", "clip_text", "export")
_DEFAULT_VARIANT = {"uvit": "uvit"}


_REPO_CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / "pdm.py"


def _load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Loads ``path/to/config.py:arg`` (like ``--config`` of main) and returns the config."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("pdm_convert_config", path)
    if module_spec is None or not pathlib.Path(path).is_file():
        raise FileNotFoundError(f"Config file {path!r} not found (e.g. configs/pdm.py:two_stream).")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _infer_variant(state_dict: dict) -> str:
    if "pos_embed_mask" in state_dict:
        return "two_stream"
    return "one_stream" if "mask_embed.proj.weight" in state_dict else "uvit"


def _model_config(args: argparse.Namespace, state_dict: dict | None) -> ml_collections.ConfigDict:
    if args.model_kwargs:
        return official.model_config_from_official_kwargs(json.loads(args.model_kwargs))
    if args.config:
        return _load_config_file(args.config).model
    variant = _DEFAULT_VARIANT.get(args.kind) or _infer_variant(state_dict or {})
    return _load_config_file(f"{_REPO_CONFIG}:{variant},map_patch_factor=1").model


def convert(argv: Sequence[str] | None = None) -> str:
    """Runs the converter; returns the path written."""
    parser = argparse.ArgumentParser(
        prog="python -m pdm_jax.convert", description=__doc__.split("\n\n")[1]
    )
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--input", required=True, help="checkpoint file or directory to read")
    parser.add_argument("--output", required=True, help="directory (or file for export) to write")
    parser.add_argument("--config", default="", help="configs/pdm.py:<variant>[,k=v] of the model")
    parser.add_argument("--model_kwargs", default="", help="official UViT kwargs as JSON")
    parser.add_argument("--use_ema", type=int, default=1, help="export: EMA params if present")
    args = parser.parse_args(argv)
    args.input, args.output = paths.resolve(args.input), paths.resolve(args.output)

    if args.kind in ("uvit", "pdm"):
        state_dict = load_state_dict(args.input)
        model_cfg = _model_config(args, state_dict)
        if args.kind == "uvit" and model_cfg.name != "uvit":
            parser.error(f"kind 'uvit' needs a uvit model config, got {model_cfg.name!r}.")
        params = official.official_to_params(state_dict, model_cfg)
        return components.save_denoiser(args.output, params, model_cfg)
    if args.kind == "vae":
        module, params = load_vae(args.input)
        components.save_component(args.output, "vae", params, module.config)
        return args.output
    if args.kind == "clip_text":
        module, params, _ = load_clip_text(args.input)
        tok_dir = _model_and_tokenizer_dirs(args.input)[1]
        components.save_component(args.output, "clip_text", params, module.config, tok_dir)
        return args.output

    params, where = checkpointing.load_params(args.input, use_ema=bool(args.use_ema))
    model_cfg = _model_config(args, None) if (args.config or args.model_kwargs) else None
    if model_cfg is None:
        parser.error("export needs --config (or --model_kwargs) describing the checkpoint's model.")
    state = official.params_to_official(params, model_cfg)
    if args.output.endswith(".safetensors"):
        save_safetensors(state, args.output)
    elif args.output.endswith((".pth", ".pt")):
        try:
            import torch
        except ImportError as e:
            raise SystemExit(
                'Writing .pth needs PyTorch: pip install -e ".[torch]" (or use .safetensors).'
            ) from e
        torch.save(
            {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, args.output
        )
    else:
        parser.error("export --output must end in .pth, .pt or .safetensors.")
    print(f"exported {where} -> {args.output} ({len(state)} tensors)")
    return args.output


def main() -> None:
    """Console entry: errors become a one-line message and exit status 1."""
    try:
        print(convert())
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"pdm_jax.convert: {e}")


if __name__ == "__main__":
    main()
