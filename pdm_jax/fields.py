"""Config fields declared once: a default, a one-line doc, and whether the value is a path.

Every config group is a frozen dataclass (``pdm_jax.specs`` lists them) whose config fields
are declared with :func:`option`; the ``ConfigDict`` of ``configs/pdm.py``, the path
resolution of ``pdm_jax.paths`` and the configuration reference in the docs are all read
off these declarations. Fields declared without :func:`option` (e.g. ``DataSpec``'s sizes,
which derive from other groups) are not config fields.

This module imports nothing of the package, so models, diffusion and data can use it (and
raise its ``ConfigError``, which ``pdm_jax.specs`` re-exports).
"""

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

_DOC = "pdm_jax.doc"
_PATH = "pdm_jax.path"
_MINIMUM = "pdm_jax.minimum"


class ConfigError(ValueError):
    """A config field is missing, unknown or of the wrong type; the message names it."""


def option(default: Any, doc: str, *, path: bool = False, minimum: int | None = None) -> Any:
    """A config field: its single default and its one-line documentation.

    Args:
      default: the value every variant starts from (immutable: numbers, strings, tuples).
      doc: what the field does, one line (the configuration reference prints it).
      path: the value is a path the user types (made absolute at start-up).
      minimum: the smallest value the field takes (numbers only; None: no bound).

    Returns:
      A ``dataclasses.field`` carrying ``doc``, ``path`` and ``minimum`` in its metadata.
    """
    metadata = {_DOC: doc, _PATH: path, _MINIMUM: minimum}
    return dataclasses.field(default=default, metadata=metadata)


def is_config_field(field: dataclasses.Field) -> bool:
    """Whether ``field`` was declared with :func:`option`."""
    return _DOC in field.metadata


def doc(field: dataclasses.Field) -> str:
    """The one-line documentation of a config field."""
    return field.metadata[_DOC]


def is_path(field: dataclasses.Field) -> bool:
    """Whether a config field holds a path."""
    return bool(field.metadata.get(_PATH, False))


def minimum(field: dataclasses.Field) -> int | None:
    """The smallest value a config field takes (None: unbounded)."""
    return field.metadata.get(_MINIMUM)


def check_minimum(field: dataclasses.Field, value: Any, where: str) -> None:
    """Refuses a value below the field's minimum.

    Args:
      field: the config field.
      value: its value, already of the field's type.
      where: the field as the user names it, e.g. ``config.train.batch_size``.

    Raises:
      ConfigError: naming the field, the value and the smallest one it takes.
    """
    low = minimum(field)
    if low is not None and value < low:
        raise ConfigError(
            f"--{where}={value}: must be at least {low} ({doc(field).rstrip('.')}); pass "
            f"--{where}= a value of {low} or more."
        )


def config_fields(cls: type) -> tuple[dataclasses.Field, ...]:
    """The config fields of a group dataclass, in declaration order.

    Args:
      cls: a dataclass whose config fields are declared with :func:`option`.

    Returns:
      Those fields (derived fields left out).
    """
    return tuple(f for f in dataclasses.fields(cls) if is_config_field(f))


def defaults(cls: type) -> dict[str, Any]:
    """``{name: default}`` of the config fields of ``cls``."""
    return {f.name: f.default for f in config_fields(cls)}


def tuple_item(annotation: Any) -> type | None:
    """The item type of a tuple field's annotation (``tuple[int, ...]`` → ``int``), else None."""
    if typing.get_origin(annotation) is not tuple:
        return None
    (item,) = {a for a in typing.get_args(annotation) if a is not Ellipsis}
    return item


def _type_name(annotation: Any) -> str:
    item = tuple_item(annotation)
    return f"tuple of {item.__name__}" if item else annotation.__name__


def spelled(value: Any) -> str:
    """A default as it is spelled on the command line."""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return '""' if value == "" else str(value)


def _cell(text: str) -> str:
    """Text for a Markdown table cell (``|``, ``<`` and ``>`` escaped)."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _table(cls: type, prefix: str) -> list[str]:
    hints = typing.get_type_hints(cls)
    lines = ["| Field | Type | Default | Description |", "| --- | --- | --- | --- |"]
    for f in config_fields(cls):
        kind = _type_name(hints[f.name]) + (", path" if is_path(f) else "")
        if minimum(f) is not None:
            kind += f", ≥ {minimum(f)}"
        lines.append(f"| `{prefix}{f.name}` | {kind} | `{spelled(f.default)}` | {_cell(doc(f))} |")
    return [*lines, ""]


def reference_markdown(preamble: str, top: type, groups: Mapping[str, type]) -> str:
    """A configuration reference: one Markdown table per group (field, type, default, doc).

    Args:
      preamble: Markdown put before the tables (title and introduction).
      top: the dataclass whose config fields are the top-level ones.
      groups: ``{group name: group dataclass}``; each group's heading is followed by the
        first line of its class docstring.

    Returns:
      The Markdown text; path fields are marked in the type column.
    """
    lines = [preamble, "## Top level", "", *_table(top, "")]
    for name, cls in groups.items():
        summary = (cls.__doc__ or "").strip().splitlines()[0]
        lines += [f"## `{name}`", "", summary, "", *_table(cls, f"{name}.")]
    return "\n".join(lines)
