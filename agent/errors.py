"""User mistakes: raised with a one-line message, printed by __main__ without a traceback."""

import difflib
import re
from collections.abc import Iterable

from pydantic import ValidationError

# What ENTITY/PROJECT/SWEEP_ID looks like: how create, launch, report and best tell a W&B sweep
# from a local one.
SWEEP_PATH = re.compile(r"[^/\s]+/[^/\s]+/[^/\s]+")


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


class UsageError(Exception):
    """Bad input from the user (flag, file, value); exits 2 with its message."""


class RunEndedEarly(Exception):
    """The run ended on a preemption (its state saved, to be requeued) or a Ctrl-C: exit with `exit_code`."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def describe_validation_error(error: ValidationError) -> str:
    """pydantic's multi-line report as one line: `key=value: what is allowed; ...`."""
    parts = []
    for e in error.errors():
        key = ".".join(str(p) for p in e["loc"])
        message = e["msg"].removeprefix("Value error, ")
        got = "" if e["type"] == "missing" else f"={e['input']!r}"
        if not key:  # a check across keys: its message names them
            parts.append(message)
        elif e["type"] == "extra_forbidden":
            parts.append(f"unknown key {key!r}")
        else:
            parts.append(f"{key}{got}: {message}")
    return "; ".join(parts)


def did_you_mean(key: str, known: Iterable[str]) -> str:
    """`did you mean 'lr'?` when known keys are close to `key`, else every known key.

    Close: a typo (difflib), a word of `key` (`lr_rate`), or an abbreviation by initials either
    way (`learning_rate` for `lr`, `bs` for `batch_size`)."""
    known = list(known)
    close = [k for k in known if k in key.split("_") or key == _initials(k) or k == _initials(key)]
    close = list(dict.fromkeys(close + difflib.get_close_matches(key, known, n=3, cutoff=0.6)))[:3]
    if close:
        return f"did you mean {' or '.join(map(repr, close))}?"
    return f"allowed: {', '.join(known)}"


def _initials(name: str) -> str | None:
    words = name.split("_")
    return "".join(w[:1] for w in words) if len(words) > 1 else None
