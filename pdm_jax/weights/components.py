"""Converted weights on disk: orbax checkpoints of denoisers, VAEs and CLIP text encoders.

Layouts written by ``python -m pdm_jax.convert``:

* denoiser (``uvit``, ``pdm``): ``<dir>/checkpoints/0/{state,config}`` — the layout of a
  training checkpoint with only ``params`` in its state, so ``--config.ckpt.init_from=<dir>``
  and sample mode read it like any other checkpoint;
* ``vae`` / ``clip_text``: ``<dir>/params`` (an orbax PyTree checkpoint) plus
  ``<dir>/pdm_jax_component.json`` naming the kind and its architecture; ``clip_text`` also
  keeps the tokenizer files. ``load_vae`` / ``load_clip_text`` accept such directories.
"""

import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from pdm_jax import checkpointing  # the training layout is the single source of truth

COMPONENT_FILE = "pdm_jax_component.json"
TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def save_denoiser(output_dir: str, params: Any, model_cfg: ml_collections.ConfigDict) -> str:
    """Writes denoiser parameters as step 0 of a pdm_jax checkpoint directory.

    Args:
      output_dir: the directory to create (acts as a workdir for ``ckpt.init_from``).
      params: the parameter tree.
      model_cfg: its ``config.model`` (stored as JSON for inspection).

    Returns:
      The step directory written.
    """
    manager = checkpointing.create_manager(
        checkpointing.checkpoint_dir(output_dir), async_save=False
    )
    items = {
        checkpointing.STATE: ocp.args.PyTreeSave({"params": jax.tree.map(np.asarray, params)}),
        checkpointing.CONFIG: ocp.args.JsonSave({"model": json.loads(model_cfg.to_json())}),
    }
    manager.save(0, args=ocp.args.Composite(**items), force=True)
    manager.wait_until_finished()
    manager.close()
    return str(checkpointing.checkpoint_dir(output_dir) / "0")


def is_component(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory written by ``save_component``."""
    return os.path.isfile(os.path.join(path, COMPONENT_FILE))


def save_component(
    output_dir: str,
    kind: str,
    params: Any,
    arch: Any,
    tokenizer_dir: str | None = None,
) -> None:
    """Writes a VAE or CLIP text encoder as orbax params plus its architecture.

    Args:
      output_dir: directory to create.
      kind: ``vae`` or ``clip_text``.
      params: the Flax parameter tree.
      arch: the architecture dataclass (``VAEConfig`` / ``ClipTextConfig``).
      tokenizer_dir: for ``clip_text``, the directory whose tokenizer files are copied.
    """
    out = epath.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out / "params", jax.tree.map(np.asarray, params), force=True)
    spec = {"kind": kind, "arch": dataclasses.asdict(arch)}
    (out / COMPONENT_FILE).write_text(json.dumps(spec, indent=1))
    if tokenizer_dir:
        for name in TOKENIZER_FILES:
            src = os.path.join(tokenizer_dir, name)
            if os.path.isfile(src):
                shutil.copy(src, out / name)


def load_component(path: str | os.PathLike, kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reads a directory written by ``save_component``.

    Args:
      path: the directory.
      kind: the expected kind; another kind is an error naming both.

    Returns:
      ``(arch_fields, params)``: the architecture as a dict and the parameter tree.
    """
    spec = json.loads((epath.Path(path) / COMPONENT_FILE).read_text())
    if spec["kind"] != kind:
        raise ValueError(f"{path} holds a converted {spec['kind']!r}, not a {kind!r}.")
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(epath.Path(path).absolute() / "params")
    arch = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["arch"].items()}
    return arch, params
