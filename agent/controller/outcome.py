"""What a trial's end means: its state and the reason shown for it in the live view, `status` and the
report, from its exit code, its output and what its run logged. Any W&B program's trials.

A program may say in its run's summary how its training ended (`ended_by`, as ours does): a stop or an
interrupt cut it short; anything else means it ended on its own (all its epochs, early stopping, a
diverging loss: `diverged_at_step`), so the trial is finished even if a hyperband stop came after it.
"""

import re

from agent.contract import CUT_SHORT, DIVERGED_AT_STEP, ENDED_BY, FAILED, FINISHED, PAUSED, STOPPED
from agent.install import interpreter_hint, matching_pair_command

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
WANDB_LINE = re.compile(r"wandb:( |$)")  # wandb's own closing lines (find logs at, sync with ...)
# An error every trial will hit, and its fix: a broken installation, not a bad config.
ENVIRONMENT = [re.compile(r"operator torchvision::\w+ does not exist"), re.compile(r"No module named '([\w.]+)'"),
               re.compile(r"^(ImportError|OSError): .*(lib\w*\.so|undefined symbol)")]


def own_error(output: str) -> str:
    """The trial's own error, one line: the exception line of its last traceback, else the last line it
    wrote before wandb's closing lines; without colour codes."""
    lines = [line.rstrip() for line in ANSI.sub("", output).splitlines()]
    lines = [line for line in lines if line.strip() and not WANDB_LINE.match(line)]
    if not lines:
        return "no output"
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if starts:  # frames are indented; the exception line is the first one that is not
        after = [line for line in lines[starts[-1] + 1:] if not line[0].isspace()]
        if after:
            return after[0][:300]
    return lines[-1][:300]


def environment_error(reason: str, env: dict) -> str | None:
    """`reason` with its fix, when it is an error every trial will hit (a broken install); else None. `env`: the
    trials' environment (which `python` they run)."""
    torchvision, module, library = (pattern.search(reason) for pattern in ENVIRONMENT)
    if torchvision:
        return f"{reason} (torch and torchvision do not match; fix: {matching_pair_command()})"
    if module:
        return f"{reason} ({interpreter_hint(env)})"
    if library:
        return f"{reason} (a compiled library does not load; fix: reinstall the package it belongs to)"
    return None

def diverged(summary: dict) -> str | None:
    """The reason a run's summary gives for a loss that stopped being finite, if it does."""
    return f"diverged at step {summary[DIVERGED_AT_STEP]}" if DIVERGED_AT_STEP in summary else None


def outcome(code: int, stop_requested: bool, paused: bool, summary: dict, metric: str | None,
            metric_value: float | None, history: list, output: str) -> tuple[str, str | None]:
    """(state, reason) of a trial that exited with `code`."""
    ended_by = summary.get(ENDED_BY)
    # A trial that says it completed (ours exits 0 only then) finished before the pause could matter.
    if paused and (code != 0 or ended_by is None or ended_by in CUT_SHORT):
        return PAUSED, None  # why, and how to resume it: the controller's to say
    if stop_requested and (ended_by is None or ended_by in CUT_SHORT):  # ended by the stop, however it exited
        return STOPPED, None  # what stopped it (hyperband, a pruner): the controller's to say
    if code != 0:
        return FAILED, f"exit code {code}: {own_error(output)}"
    if metric and metric_value is None and not diverged(summary):
        return FAILED, f"{metric} is NaN or infinite" if history else f"no {metric} logged"
    return FINISHED, diverged(summary)
