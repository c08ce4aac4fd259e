"""The trial table of a local sweep: `python -m agent status DIR [--json]`, and the live view."""

import json
import os
import sys
from pathlib import Path

from rich.console import Console, ConsoleOptions, Group
from rich.live import Live
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from agent.controller.engine import sweep_metric
from agent.controller.store import Trial, open_store, state_counts
from agent.views.trials import STATE_COLORS, best_trial, short, swept


def console() -> Console:
    # Off a terminal (logs, pipes) rich assumes 80 columns, which tables outgrow; COLUMNS, when set, is how a
    # user (or a test) asks for a width, and rich reads it itself.
    asked = os.environ.get("COLUMNS", "").isdigit()
    return Console() if sys.stdout.isatty() or asked else Console(width=200)


def print_line(out: Console, text: str):
    """One line as it is: no markup (commands and reasons hold brackets), no folding (a pipe gets it whole)."""
    out.print(text, markup=False, highlight=False, soft_wrap=True)


def print_wrapped(out: Console, text: str):
    """A line of values (the sweep, the summary) at the console's width: wrapped between words, never inside a
    value."""
    out.print(Text(text), highlight=False)


def summary_line(trials: list[Trial], metric: str | None, goal: str, params: list[str]) -> str:
    line = state_counts(trials)
    best = best_trial(trials, goal)
    if best is not None:
        line += f" | best {metric} {best.metric:.4g} ({best.id}: " + \
            " ".join(f"{p}={short(best.config.get(p))}" for p in params) + ")"
    return line


SHORTEST_REASON = 16  # still says what happened: "exit code 1: CUD…"


class TrialTable:
    """The trial table at the width it is drawn at (a live view's terminal can be resized in between).

    No value is ever folded: to fit, the reason column is shortened first, with an ellipsis (never below
    SHORTEST_REASON), then the time column goes, then the swept parameters from the last one, then the
    reason; id, state and the metric always stay. A line under the table names what went.
    """

    def __init__(self, trials: list[Trial], metric: str | None, params: list[str],
                 remedy: str = "widen the terminal or use --json"):
        self.headers = ["id", "state", metric or "metric", "time", *params, "reason"]
        self.remedy = remedy
        # Cells are Text, never markup: a reason or a value may hold brackets, and markup would be printed
        # raw whenever a caller prints with markup off (the live view's event lines do).
        self.rows = [[Text(t.id), Text(t.state, style=STATE_COLORS[t.state]),
                      Text("" if t.metric is None else f"{t.metric:.4g}"),
                      Text("" if t.duration is None else f"{t.duration:.0f}s"),
                      *[Text(short(t.config.get(p, ""))) for p in params], Text(t.reason or "")]
                     for t in trials]
        # A table of one row, each column's widest cell, measures as wide as the whole one, and far sooner.
        self.widest = [[max(column, key=lambda cell: cell.cell_len) for column in zip(*self.rows)]] if trials else []

    def table(self, shown: list[int], reason_width: int | None = None, rows: list[list[Text]] | None = None) -> Table:
        reason = len(self.headers) - 1
        table = Table(box=None, header_style="bold")
        for i in shown:
            table.add_column(Text(self.headers[i]), no_wrap=True, overflow="ellipsis",
                             max_width=reason_width if i == reason else None)
        for row in self.rows if rows is None else rows:
            table.add_row(*(row[i] for i in shown))
        return table

    def __rich_console__(self, console: Console, options: ConsoleOptions):
        time_column, reason = 3, len(self.headers) - 1
        # unbounded: a measurement is capped at the width it is asked within, which would hide the overflow
        unbounded = options.update_width(1 << 20)

        def overflow(shown: list[int], reason_width: int | None = None) -> int:
            table = self.table(shown, reason_width, self.widest)
            return Measurement.get(console, unbounded, table).maximum - options.max_width

        shown, left_out, reason_width = list(range(len(self.headers))), [], None
        for drop in [None, time_column, *range(reason - 1, time_column, -1), reason]:
            if drop is not None:
                shown.remove(drop)
                left_out.append(self.headers[drop])
            if overflow(shown) <= 0:
                break
            if reason in shown and (spare := -overflow(shown, SHORTEST_REASON)) >= 0:
                reason_width = SHORTEST_REASON + spare
                break
        yield self.table(shown, reason_width)
        if left_out:
            yield Text(f"left out to fit {options.max_width} columns: {', '.join(left_out)}; {self.remedy}")


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
    print_wrapped(out, f"sweep {sweep_id} ({sweep['method']}) in {directory}")
    out.print(TrialTable(trials, metric, swept(sweep)))
    print_wrapped(out, summary_line(trials, metric, goal, swept(sweep)))
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
        print_wrapped(self.console, self.last_summary)

    def event(self, text: str):
        print_line(self.console, text)

    def update(self, trials: list[Trial]):
        self.last_summary = summary_line(trials, self.metric, self.goal, self.params)
        if self.live:
            recent = sorted(trials, key=lambda t: t.created)[-12:]
            self.live.update(Group(TrialTable(recent, self.metric, self.params), Text(self.last_summary)),
                             refresh=True)
