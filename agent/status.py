"""The trial table of a local sweep: `python -m agent status DIR [--json]`, and the live view."""

import json
import sys
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from agent.store import open_store
from agent.trials import STATE_COLORS, Trial, best_trial, short, state_counts, sweep_metric, swept


def console() -> Console:
    # Off a terminal (logs, pipes) rich assumes 80 columns and folds every row; tables want more.
    return Console() if sys.stdout.isatty() else Console(width=200)


def print_line(out: Console, text: str):
    """One line as it is: no markup (commands and reasons hold brackets), no folding (a pipe gets it whole)."""
    out.print(text, markup=False, highlight=False, soft_wrap=True)


def summary_line(trials: list[Trial], metric: str | None, goal: str, params: list[str]) -> str:
    line = state_counts(trials)
    best = best_trial(trials, goal)
    if best is not None:
        line += f" | best {metric} {best.metric:.4g} ({best.id}: " + \
            " ".join(f"{p}={short(best.config.get(p))}" for p in params) + ")"
    return line


def trial_table(trials: list[Trial], metric: str | None, params: list[str]) -> Table:
    # Cells are Text, never markup: a reason or a value may hold brackets, and markup would be printed
    # raw whenever a caller prints with markup off (the live view's event lines do).
    table = Table(box=None, header_style="bold")
    for column in ["id", "state", metric or "metric", "time", *params, "reason"]:
        table.add_column(Text(column), overflow="fold")
    for t in trials:
        duration = "" if t.duration is None else f"{t.duration:.0f}s"
        cells = ["" if t.metric is None else f"{t.metric:.4g}", duration,
                 *[short(t.config.get(p, "")) for p in params], t.reason or ""]
        table.add_row(Text(t.id), Text(t.state, style=STATE_COLORS[t.state]), *map(Text, cells))
    return table


def status(directory: str, as_json: bool) -> int:
    store = open_store(directory)
    sweep_id, sweep = store.sweep()
    trials = store.trials()
    if as_json:
        print(json.dumps([{"id": t.id, "state": t.state, "metric": t.metric, "config": t.config,
                           "reason": t.reason, "exit_code": t.exit_code, "duration_s": t.duration, "gpu": t.gpu,
                           "host": t.host}
                          for t in trials], indent=1))
        return 0
    metric, goal = sweep_metric(sweep)
    out = console()
    print_line(out, f"sweep {sweep_id} ({sweep['method']}) in {directory}")
    out.print(trial_table(trials, metric, swept(sweep)))
    print_line(out, summary_line(trials, metric, goal, swept(sweep)))
    return 0


class SweepView:
    """On a terminal, a live table of trials; elsewhere (logs, CI), a line per event."""

    def __init__(self, sweep_id: str, sweep: dict, directory: Path):
        self.metric, self.goal = sweep_metric(sweep)
        self.params = swept(sweep)
        self.console = console()
        print_line(self.console, f"sweep {sweep_id} ({sweep['method']}) in {directory}  "
                                 f"(status: python -m agent status {directory})")
        self.live = Live(console=self.console, auto_refresh=False) if self.console.is_terminal else None
        self.last_summary = ""

    def __enter__(self):
        if self.live:
            self.live.start()
        return self

    def __exit__(self, *exc):
        if self.live:
            self.live.stop()
        print_line(self.console, self.last_summary)

    def event(self, text: str):
        print_line(self.console, text)

    def update(self, trials: list[Trial]):
        self.last_summary = summary_line(trials, self.metric, self.goal, self.params)
        if self.live:
            recent = sorted(trials, key=lambda t: t.created)[-12:]
            self.live.update(Group(trial_table(recent, self.metric, self.params), Text(self.last_summary)),
                             refresh=True)
