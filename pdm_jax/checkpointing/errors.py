"""The errors checkpoint reads raise, and the fixes their messages suggest.

Each error names what was looked for or what differs, and how to go on; ``RESUME_FIX``
and ``LOAD_FIX`` are the ways to use an intact step instead of a damaged one, and
``RESET_DATA_POSITION`` is the option that resumes without the saved data position.
"""


class CheckpointNotFoundError(FileNotFoundError):
    """No checkpoint where one was asked for; the message names the path looked in."""


class ConfigMismatchError(ValueError):
    """A checkpoint's parameters do not fit the config; the message lists the differences."""


class CorruptCheckpointError(RuntimeError):
    """A checkpoint's files cannot be read (truncated by a full disk, an incomplete copy).

    The message names the unreadable step directory, the newest earlier step that was read
    in full, and the flag that uses it. Nothing falls back to another step on its own.
    """


# How to use an intact step instead, per caller; ``{step}`` and ``{path}`` name it.
RESUME_FIX = (
    "To resume training from it, rerun with --config.ckpt.resume_from={path} (a step of the "
    "run's own checkpoints: the later steps are then moved to <workdir>/checkpoints_superseded)"
)
LOAD_FIX = "Pass that step directory ({path}) instead"

# The option that resumes a checkpoint without its saved data position.
RESET_DATA_POSITION = "ckpt.reset_data_position"
