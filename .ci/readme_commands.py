"""Prints command N (1-based) of README.md's "## Two commands" section.

    python3 .ci/readme_commands.py 1   # install + demo
    python3 .ci/readme_commands.py 2   # install + checks + tests

The section runs from its heading to the next ``## `` heading and must hold exactly two
fenced ``bash`` blocks; each block is one command, printed as written. Anything else is
an error (exit status 1, message on stderr), so CI fails loudly instead of running
something other than what the README says. Standard library only: CI runs it with the
system ``python3`` before any virtual environment exists.
"""

import pathlib
import sys

SECTION = "## Two commands"
EXPECTED = 2
README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def section_lines(text: str, heading: str = SECTION) -> list[str]:
    """The lines between ``heading`` and the next level-2 heading."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.rstrip() == heading]
    if len(starts) != 1:
        raise ValueError(f"README.md needs exactly one {heading!r} heading, found {len(starts)}")
    body = []
    for line in lines[starts[0] + 1 :]:
        if line.startswith("## "):
            break
        body.append(line)
    return body


def bash_blocks(lines: list[str]) -> list[str]:
    """The contents of the fenced ``bash`` blocks among ``lines``, in order."""
    blocks, lang, body = [], None, []
    for line in lines:
        fence = line.strip()
        if lang is None:
            if fence.startswith("```"):
                lang, body = fence[3:].strip(), []
        elif fence == "```":
            if lang == "bash":
                blocks.append("\n".join(body).strip())
            lang = None
        else:
            body.append(line)
    if lang is not None:
        raise ValueError("unterminated code fence in the README section")
    return blocks


def commands(text: str) -> list[str]:
    """The section's commands; raises ValueError unless there are exactly two, non-empty."""
    blocks = bash_blocks(section_lines(text))
    if len(blocks) != EXPECTED or not all(blocks):
        raise ValueError(
            f"{SECTION!r} must hold exactly {EXPECTED} non-empty ```bash blocks, "
            f"found {len(blocks)}: {blocks!r}"
        )
    return blocks


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in {str(n) for n in range(1, EXPECTED + 1)}:
        print(f"usage: readme_commands.py N   (N = 1..{EXPECTED})", file=sys.stderr)
        return 1
    try:
        found = commands(README.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        print(f"readme_commands.py: {err}", file=sys.stderr)
        return 1
    print(found[int(argv[0]) - 1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
