"""The on-disk format of prepared COCO: record codec, file names and metadata.

``prepare_coco`` writes, per split, into ``<output_dir>``::

    <split>-00000-of-00037.array_record   ArrayRecord files (``group_size:1``), one record
    ...                                   per image, images in image-id order
    _progress/<split>-00000-of-00037.json completion marker per file (resume, host split)
    metadata_<split>.json                 written once every file of the split is done
    empty_context.npy                     float32 [T, D]: the empty caption "" encoded

A record is one msgpack map (``msgpack.packb(..., use_bin_type=True)``)::

    version   int            RECORD_VERSION
    image_id  int            COCO image id
    file_name str            image file inside <split>2017/
    captions  [str] × K      all captions of the image (K = 5..7 in COCO 2017)
    mean      array f32 [S, S, C]    VAE posterior mean (S = 32, C = 4 at 256 px)
    logvar    array f32 [S, S, C]    VAE posterior log-variance, clamped to [-30, 20]
    contexts  array f16|f32 [K, T, D] CLIP context of each caption, aligned with captions
    map_<m>   array u8 [m, m]        category ids pooled to side m (32, 64, 128), 0 = void

where an *array* is the map ``{"dtype": numpy dtype string (e.g. "<f4"), "shape": [..],
"data": raw C-order bytes}``, readable from any language with a msgpack library.
"""

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np

RECORD_VERSION = 1
FORMAT = "pdm_jax.coco_panoptic"
PROGRESS_DIR = "_progress"
EMPTY_CONTEXT_FILE = "empty_context.npy"
_ARRAY_KEYS = frozenset(("dtype", "shape", "data"))


def _pack_value(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value)
        return {"dtype": array.dtype.str, "shape": list(array.shape), "data": array.tobytes()}
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def encode_record(record: Mapping[str, Any]) -> bytes:
    """Serialises one record (str keys; ints, strings, lists of strings, numpy arrays).

    Args:
      record: the record.

    Returns:
      msgpack bytes; keys are written in sorted order, so equal records give equal bytes.
    """
    return msgpack.packb({k: _pack_value(record[k]) for k in sorted(record)}, use_bin_type=True)


def decode_record(data: bytes) -> dict[str, Any]:
    """Inverse of :func:`encode_record`; arrays come back as read-only numpy views.

    Args:
      data: one record's bytes.

    Returns:
      The record.
    """
    record = msgpack.unpackb(data, raw=False)
    if record.get("version") != RECORD_VERSION:
        raise ValueError(
            f"Record version {record.get('version')!r} is not {RECORD_VERSION}; re-run "
            "python -m pdm_jax.data.coco.prepare with this version of pdm_jax."
        )
    for key, value in record.items():
        if isinstance(value, dict) and value.keys() == _ARRAY_KEYS:
            array = np.frombuffer(value["data"], dtype=np.dtype(value["dtype"]))
            record[key] = array.reshape(value["shape"])
    return record


def file_names(split: str, num_files: int) -> list[str]:
    """ArrayRecord file names of a split, ``<split>-%05d-of-%05d.array_record``."""
    return [f"{split}-{i:05d}-of-{num_files:05d}.array_record" for i in range(num_files)]


def marker_path(output_dir: str, file_name: str) -> str:
    """The completion marker of one ArrayRecord file."""
    return os.path.join(output_dir, PROGRESS_DIR, file_name.replace(".array_record", ".json"))


def existing_markers(output_dir: str, split: str) -> list[str]:
    """File names (``*.array_record``) of a split that have a completion marker."""
    directory = os.path.join(output_dir, PROGRESS_DIR)
    if not os.path.isdir(directory):
        return []
    pattern = re.compile(rf"^{re.escape(split)}-\d{{5}}-of-\d{{5}}\.json$")
    return sorted(
        n.replace(".json", ".array_record") for n in os.listdir(directory) if pattern.match(n)
    )


def metadata_path(output_dir: str, split: str) -> str:
    """``<output_dir>/metadata_<split>.json``."""
    return os.path.join(output_dir, f"metadata_{split}.json")


def write_json_atomic(path: str, obj: Any) -> None:
    """Writes JSON through a temporary file and a rename (readers never see half a file)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def write_npy_atomic(path: str, array: np.ndarray) -> None:
    """Saves a ``.npy`` through a temporary file and a rename."""
    tmp = f"{path}.tmp-{os.getpid()}.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def read_json(path: str) -> Any:
    """Reads a JSON file."""
    with open(path) as f:
        return json.load(f)


def read_metadata(data_dir: str, split: str) -> dict[str, Any]:
    """Reads ``metadata_<split>.json`` of a prepared directory.

    Args:
      data_dir: the ``--output_dir`` of ``prepare_coco``.
      split: ``train`` or ``val``.

    Returns:
      The metadata dict.

    Raises:
      FileNotFoundError: when the split is missing or not finished, with what is missing.
    """
    path = metadata_path(data_dir, split)
    if os.path.isfile(path):
        return read_json(path)
    done = existing_markers(data_dir, split)
    hint = (
        f"{len(done)} of its files are finished; re-run prepare_coco with the same flags "
        "(every --shard_index) to finish it"
        if done
        else f"prepare it with: python -m pdm_jax.data.coco.prepare --coco_dir=... "
        f"--output_dir={data_dir} --split={split} --vae=... --clip=..."
    )
    raise FileNotFoundError(f"{path} does not exist: the {split!r} split is not prepared; {hint}.")
