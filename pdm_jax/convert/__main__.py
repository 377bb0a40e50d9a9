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
* ``unet`` — Stable Diffusion's UNet: a diffusers ``unet/`` directory (``config.json`` +
  ``diffusion_pytorch_model.safetensors`` or ``.bin``) or an SD single-file ``.ckpt`` /
  ``.safetensors`` (``model.diffusion_model.*``; SD 1.x or 2.x told by its text width, or
  ``--config=configs/pdm.py:unet,sd=2``); the result initialises a ``unet`` model or the
  image stream of the UNet PDMs (``--config.ckpt.init_from=<output>``).
* ``export`` — a pdm_jax checkpoint (``--input`` = workdir or step dir) to an official
  state dict: ``.pth`` (needs the torch extra) or ``.safetensors``; a ``unet``
  checkpoint with an ``--output`` directory to the diffusers layout (``config.json`` +
  ``diffusion_pytorch_model.safetensors``; no torch needed).

Missing, unexpected or mis-shaped tensors fail with a list of each. Flags are absl flags
(``--input=PATH`` or ``--input PATH``; ``--nouse_ema`` or ``--use_ema=false``), parsed into
a fresh ``FlagValues`` on each call: importing this module defines no global flags.
"""

import dataclasses
import importlib.util
import json
import pathlib
import sys
from collections.abc import Sequence

import ml_collections
import numpy as np
from absl import app, flags

from pdm_jax import checkpointing, paths
from pdm_jax.convert import diffusers_unet, official
from pdm_jax.weights import components
from pdm_jax.weights.clip import _model_and_tokenizer_dirs, load_clip_text
from pdm_jax.weights.torch_io import load_state_dict, save_safetensors
from pdm_jax.weights.vae import load_vae

PROG = "python -m pdm_jax.convert"
KINDS = ("uvit", "pdm", "vae", "clip_text", "unet", "export")
EXPORT_SUFFIXES = (".safetensors", ".pth", ".pt")
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


@dataclasses.dataclass(frozen=True)
class _Args:
    """One parsed command line: the kind and the values of the flags."""

    kind: str
    input: str
    output: str
    config: str
    model_kwargs: str
    use_ema: bool


def _define_flags(flag_values: flags.FlagValues) -> None:
    """Defines the command's flags in ``flag_values`` (never the global ``flags.FLAGS``:
    ``--input``/``--output``/``--config`` are common names that other programs define).
    """
    fv = {"flag_values": flag_values}
    flags.DEFINE_string("input", None, "Checkpoint file or directory to read.", **fv)
    flags.DEFINE_string("output", None, "Directory (or file, for export) to write.", **fv)
    flags.DEFINE_string(
        "config", "", "Model config file spec, configs/pdm.py:<variant>[,k=v].", **fv
    )
    flags.DEFINE_string("model_kwargs", "", "Official UViT constructor kwargs as JSON.", **fv)
    flags.DEFINE_bool("use_ema", True, "export: the EMA params if the checkpoint has them.", **fv)
    flags.DEFINE_bool("help", False, "Show this help and exit.", short_name="h", **fv)


def _usage_error(message: str) -> app.UsageError:
    return app.UsageError(f"{message} (see {PROG} --help)", exitcode=2)


def _help_text(flag_values: flags.FlagValues) -> str:
    flag_help = flag_values.get_help(include_special_flags=False)
    return f"{__doc__.strip()}\n\nflags:\n{flag_help}\n"


def _parse(argv: Sequence[str]) -> _Args | str:
    """Parses ``argv`` (without the program name) into a fresh ``FlagValues``.

    Returns:
      The parsed command, or the help text when ``--help``/``-h`` was given.

    Raises:
      app.UsageError: for an unknown or missing kind or flag, or a missing flag value.
    """
    flag_values = flags.FlagValues()
    _define_flags(flag_values)
    try:
        positional = flag_values([PROG, *argv])[1:]
    except flags.Error as e:
        raise _usage_error(str(e)) from e
    if flag_values.help:
        return _help_text(flag_values)
    if not positional:
        raise _usage_error(
            f"Missing the kind: {PROG} {{{','.join(KINDS)}}} --input=... --output=..."
        )
    kind, *extra = positional
    if kind not in KINDS:
        raise _usage_error(f"Unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    if extra:
        raise _usage_error(
            f"Unexpected arguments {extra}: give one kind; boolean flags take '=' "
            "(--use_ema=false or --nouse_ema)"
        )
    missing = [f"--{name}" for name in ("input", "output") if not flag_values[name].value]
    if missing:
        raise _usage_error(f"{kind} needs {' and '.join(missing)}")
    return _Args(
        kind=kind,
        input=flag_values.input,
        output=flag_values.output,
        config=flag_values.config,
        model_kwargs=flag_values.model_kwargs,
        use_ema=flag_values.use_ema,
    )


def _model_config(args: _Args, state_dict: dict | None) -> ml_collections.ConfigDict:
    if args.model_kwargs:
        return official.model_config_from_official_kwargs(json.loads(args.model_kwargs))
    if args.config:
        return _load_config_file(args.config).model
    variant = _DEFAULT_VARIANT.get(args.kind) or _infer_variant(state_dict or {})
    return _load_config_file(f"{_REPO_CONFIG}:{variant},map_patch_factor=1").model


def convert(argv: Sequence[str] | None = None) -> str:
    """Runs the converter on a command line; returns the path written.

    Args:
      argv: the arguments after the program name (default: ``sys.argv[1:]``), e.g.
        ``["pdm", "--input", "nnet_ema.pth", "--output", "ckpt/pdm"]``. Parsed into a fresh
        ``flags.FlagValues``, so this can run any number of times in one process.

    Raises:
      app.UsageError: for a command line that cannot work (unknown kind, a missing flag,
        ``export`` without ``--config``, ...); its message names the fix.
      SystemExit: status 0 after printing the help for ``--help``/``-h``.
    """
    args = _parse(sys.argv[1:] if argv is None else argv)
    if isinstance(args, str):
        print(args, end="")
        raise SystemExit(0)
    args = dataclasses.replace(
        args, input=paths.resolve(args.input), output=paths.resolve(args.output)
    )

    if args.kind in ("uvit", "pdm"):
        state_dict = load_state_dict(args.input)
        model_cfg = _model_config(args, state_dict)
        if args.kind == "uvit" and model_cfg.name != "uvit":
            raise _usage_error(
                f"Kind 'uvit' needs a uvit model config, got {model_cfg.name!r}; use kind "
                "'pdm' for one- or two-stream checkpoints, or --config=configs/pdm.py:uvit"
            )
        params = official.official_to_params(state_dict, model_cfg)
        return components.save_denoiser(args.output, params, model_cfg)
    if args.kind == "unet":
        model_cfg = _load_config_file(args.config).model if args.config else None
        params, model_cfg = diffusers_unet.read_unet(args.input, model_cfg)
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

    if not args.output.endswith(EXPORT_SUFFIXES):
        return _export_unet(args)
    if not (args.config or args.model_kwargs):
        raise _usage_error(
            "export needs --config (or --model_kwargs) describing the checkpoint's model, "
            "e.g. --config=configs/pdm.py:two_stream,map_patch_factor=1"
        )
    params, where = checkpointing.load_params(args.input, use_ema=args.use_ema)
    state = official.params_to_official(params, _model_config(args, None))
    if args.output.endswith(".safetensors"):
        save_safetensors(state, args.output)
    else:
        try:
            import torch
        except ImportError as e:
            raise SystemExit(
                'Writing .pth needs PyTorch: pip install -e ".[torch]" (or use .safetensors).'
            ) from e
        torch.save(
            {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, args.output
        )
    print(f"exported {where} -> {args.output} ({len(state)} tensors)")
    return args.output


def _stored_model_config(path: str) -> ml_collections.ConfigDict | None:
    """The ``config.model`` a checkpoint step stored (``None`` if it stored none)."""
    root, step = checkpointing.locate(path)
    stored = root / str(step) / checkpointing.CONFIG / "metadata"
    if not stored.exists():
        return None
    return ml_collections.ConfigDict(json.loads(stored.read_text()).get("model"))


def _export_unet(args: _Args) -> str:
    """``export`` of a ``unet`` checkpoint to a diffusers ``unet/`` directory."""
    if args.config:
        model_cfg = _load_config_file(args.config).model
    else:
        model_cfg = _stored_model_config(args.input)
    if model_cfg is None or model_cfg.get("name") != "unet":
        raise _usage_error(
            "export --output must end in .pth, .pt or .safetensors, or be a directory for a "
            "'unet' checkpoint (the diffusers layout); a unet checkpoint that stored no config "
            "needs --config=configs/pdm.py:unet,..."
        )
    params, where = checkpointing.load_params(args.input, use_ema=args.use_ema)
    diffusers_unet.write_diffusers(args.output, params, model_cfg)
    print(f"exported {where} -> {args.output} (diffusers UNet2DConditionModel)")
    return args.output


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry: a usage error prints ``error: ...`` and exits with status 2, a failed
    conversion (missing file, mismatched tensors) a one-line message and status 1.

    Not ``app.run``: that parses the global ``flags.FLAGS``, which this command leaves alone.
    """
    try:
        print(convert(argv))
    except app.UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(e.exitcode)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"pdm_jax.convert: {e}")


if __name__ == "__main__":
    main()
