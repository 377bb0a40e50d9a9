"""What the absl command lines share: config and flag errors as one line, no traceback.

A command whose ``--config`` flag is an ``ml_collections`` config file flag (built on the
schema of ``pdm_jax.specs``) runs its ``main`` with :func:`run` instead of ``app.run``:

* :func:`parse_flags` parses the flags, then checks the config against the schema and
  turns tuple fields given as ``a,b,c`` into tuples (``--config.sharding.mesh_axes=
  data,fsdp,tensor``). An override of a field the schema lacks (``--config.train.bogus=1``),
  a value of the wrong type, a config file that does not load or whose arg its
  ``get_config`` refuses (``configs/pdm.py:nosuch``), and any other flag error print
  ``error: <what is wrong and how to fix it>`` and exit with status 1 (as absl's own flag
  errors do).
* a ``specs.ConfigError`` that ``main`` raises prints ``error: <message>``, exit status 1.
"""

import difflib
import functools
import re
import sys
import typing
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import ml_collections
from absl import app, flags

from pdm_jax import fields, specs

# ``--config.a.b=value``, ``--config.a.b value``, ``--noconfig.a.b`` (booleans).
_OVERRIDE = re.compile(r"^--?(?:no)?{name}\.([^=]+)")
# absl's message for a value its parser refused: ``flag --name=value: reason``.
_BAD_VALUE = re.compile(r"^flag --([^=]+)=(.*?): (.*)$", re.DOTALL)


def _exit(message: str, status: int = 1) -> NoReturn:
    """Prints ``error: message`` (its first line) to stderr and exits."""
    first = str(message).strip().splitlines()[0] if str(message).strip() else "bad arguments"
    print(f"error: {first}", file=sys.stderr)
    sys.exit(status)


def check_override(path: str, config_flag: str = "config") -> None:
    """Refuses an override ``--config.<path>`` of a field the config schema lacks.

    Args:
      path: the dotted path after ``config.``, e.g. ``train.batch_size``.
      config_flag: the name of the config file flag (for the message).

    Raises:
      specs.ConfigError: naming the unknown group or field, and the nearest known ones.
    """
    top = [f.name for f in fields.config_fields(specs.RunSpec)]
    group, _, rest = path.partition(".")
    if group in top:
        if rest:
            raise specs.ConfigError(f"--{config_flag}.{path}: {group} is a field, not a group.")
        return
    if group not in specs.GROUPS:
        known = [*top, *specs.GROUPS]
        raise specs.ConfigError(
            f"--{config_flag}.{path}: the config has no {group!r}{_nearest(group, known)}; its "
            f"groups and top-level fields are {', '.join(known)} (docs/configuration.md)."
        )
    names = [f.name for f in fields.config_fields(specs.GROUPS[group])]
    if rest and rest not in names:
        raise specs.ConfigError(
            f"--{config_flag}.{path}: config.{group} has no field {rest!r}"
            f"{_nearest(rest, names)}; its fields are {', '.join(names)} (docs/configuration.md)."
        )


def _nearest(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _kind(annotation: Any) -> str:
    """How a field's type reads in a message: ``an int``, ``comma-separated ints``, ..."""
    item = fields.tuple_item(annotation)
    if item is not None:
        return f"comma-separated {item.__name__} values"
    if annotation is bool:
        return "true or false"
    return {int: "an int", float: "a float"}.get(annotation, annotation.__name__)


def _bad_value_message(error: flags.Error, config_flag: str) -> str:
    """The one-line message for a flag value absl refused, with an example for config fields."""
    match = _BAD_VALUE.match(str(error))
    if not match or not match.group(1).startswith(f"{config_flag}."):
        return str(error)
    name, value, reason = match.groups()
    group, _, field = name[len(config_flag) + 1 :].partition(".")
    cls = specs.GROUPS.get(group)
    known = {f.name: f for f in fields.config_fields(cls)} if cls else {}
    if field not in known:
        return f"--{name}={value}: {reason.strip().splitlines()[-1]}"
    example = fields.spelled(known[field].default)
    hint = typing.get_type_hints(cls)[field]
    return f"--{name}={value}: config.{group}.{field} takes {_kind(hint)}, e.g. --{name}={example}."


def _flag_error_message(error: flags.Error, config_flag: str) -> str:
    """One line for a flag error; for a config file that raised, what it raised."""
    match = _BAD_VALUE.match(str(error))
    if not (match and match.group(1) == config_flag):
        return _bad_value_message(error, config_flag)
    # The config file raised: ml_collections re-raises it with its traceback as the message.
    root = error
    while root.__cause__ is not None or root.__context__ is not None:
        root = root.__cause__ or root.__context__
    if isinstance(root, specs.ConfigError):  # its get_config refused the arg: says the fix
        return str(root)
    return f"--{config_flag}={match.group(2)}: {type(root).__name__}: {root}"


def normalize_config(config: ml_collections.ConfigDict) -> None:
    """Checks ``config`` against the schema and writes its tuple fields back as tuples.

    Args:
      config: a full config (``configs/pdm.py``); may be locked.

    Raises:
      specs.ConfigError: a field is missing, unknown or of the wrong type.
    """
    run = specs.from_config(config)
    for group, cls in specs.GROUPS.items():
        hints = typing.get_type_hints(cls)
        for f in fields.config_fields(cls):
            if fields.tuple_item(hints[f.name]) is not None:
                config[group][f.name] = getattr(getattr(run, group), f.name)


def parse_flags(
    argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS, config_flag: str = "config"
) -> list[str]:
    """Parses ``argv`` into ``flag_values``; a bad flag or config exits with one line.

    Use as ``app.run(main, flags_parser=parse_flags)`` (:func:`run` does).

    Args:
      argv: the command line, program name first.
      flag_values: the flags to parse into.
      config_flag: the name of the config file flag.

    Returns:
      The arguments that are not flags (``argv[0]`` first).
    """
    pattern = re.compile(_OVERRIDE.pattern.format(name=re.escape(config_flag)))
    try:
        for arg in argv[1:]:
            match = pattern.match(arg)
            if match:
                check_override(match.group(1), config_flag)
        rest = flag_values(list(argv))
        config = flag_values[config_flag].value if config_flag in flag_values else None
        if config is not None:
            normalize_config(config)
    except specs.ConfigError as e:
        _exit(str(e))
    except flags.Error as e:
        _exit(_flag_error_message(e, config_flag))
    except OSError as e:  # a config file that did not load (absl defers that error to its use)
        reason = str(e).strip().splitlines()[-1].strip()
        _exit(f"--{config_flag}: the config file does not load: {reason}")
    return rest


def run(main: Callable[[list[str]], Any], config_flag: str = "config") -> None:
    """``app.run(main)`` with :func:`parse_flags`; a ``ConfigError`` from ``main`` is one line.

    Args:
      main: the command's ``main(argv)``.
      config_flag: the name of its config file flag.
    """

    def guarded(argv: list[str]) -> Any:
        try:
            return main(argv)
        except specs.ConfigError as e:
            _exit(str(e))

    app.run(guarded, flags_parser=functools.partial(parse_flags, config_flag=config_flag))
