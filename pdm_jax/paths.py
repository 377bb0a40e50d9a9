"""Paths as users type them: relative, with ``~``, or URLs such as ``gs://bucket/run``.

Entry points resolve every path they are given once, before anything reads or writes it:
local paths become absolute (orbax refuses relative checkpoint paths, and a relative path
would change meaning if the working directory did); URLs (anything with a ``scheme://``)
and empty strings (unset) are left as they are.

* ``resolve(path)`` — one path;
* ``resolve_config_paths(config, fields)`` — the given path fields of a config, in place;
  ``python -m pdm_jax.main`` calls it first, with the fields the config schema marks as
  paths (``pdm_jax.specs.path_fields()``).
"""

import os
import re
from collections.abc import Iterable

import ml_collections

# ``scheme://...``: gs://, s3://, file://, http(s)://; a Windows drive ("C:\") has no "//".
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def is_url(path: str) -> bool:
    """Whether ``path`` is a URL (``gs://...``), which is used as it is."""
    return bool(_URL.match(path))


def resolve(path: str | None) -> str | None:
    """``~`` expanded and made absolute; URLs, ``""`` and ``None`` unchanged.

    Args:
      path: a path as the user typed it.

    Returns:
      The path to use.
    """
    if not path or is_url(path):
        return path
    return os.path.abspath(os.path.expanduser(path))


def resolve_config_paths(
    config: ml_collections.ConfigDict, fields: Iterable[str]
) -> dict[str, str]:
    """Resolves the path fields ``fields`` of ``config`` in place (those it lacks are skipped).

    Args:
      config: the full config (may be locked: only existing fields are written).
      fields: ``"group.field"`` names, e.g. ``pdm_jax.specs.path_fields()``.

    Returns:
      ``{field: new value}`` of the fields that changed.
    """
    changed = {}
    for field in fields:
        group_name, key = field.split(".")
        group = config.get(group_name, None)
        if group is None or key not in group:
            continue
        value = group[key]
        if isinstance(value, str) and resolve(value) != value:
            group[key] = changed[field] = resolve(value)
    return changed
