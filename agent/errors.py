"""User mistakes: raised with a one-line message, printed by __main__ without a traceback."""

import re

from pydantic import ValidationError

# What ENTITY/PROJECT/SWEEP_ID looks like: how create, launch, report and best tell a W&B sweep
# from a local one.
SWEEP_PATH = re.compile(r"[^/\s]+/[^/\s]+/[^/\s]+")


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
        key = ".".join(str(p) for p in e["loc"]) or "config"
        got = "" if e["type"] == "missing" else f"={e['input']!r}"
        parts.append(f"{key}{got}: {e['msg']}" if e["type"] != "extra_forbidden" else f"unknown key {key!r}")
    return "; ".join(parts)
