"""The trial table of a local sweep: `python -m agent status DIR [--json]`, and the live view. A sweep with several
objectives gets a column for each, its Pareto front marked and named under the table (views/pareto.py)."""

import json
import os
import sys
from pathlib import Path

from rich.console import Console, ConsoleOptions, Group
from rich.live import Live
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from agent.contract import LATENCY_MS, PARAMS
from agent.controller.engine import sweep_metrics
from agent.controller.store import Trial, is_number, open_store, state_counts
from agent.views.pareto import Front, heading, left_out, objective_values, pareto_front, several
from agent.views.trials import STATE_COLORS, best_trial, logged_costs, number, short, swept


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


def summary_lines(trials: list[Trial], objectives: list[tuple[str, str]], params: list[str],
                  front: Front | None) -> list[str]:
    """The lines under a table: the states and the best trial; with several objectives, the front instead of a
    best, and the trials left out of it with why."""
    if front is None:
        metric, goal = (objectives or [(None, "minimize")])[0]
        return [summary_line(trials, metric, goal, params)]
    return [f"{state_counts(trials)} | {heading(front)}", *filter(None, [left_out(front)])]


SHORTEST_REASON = 16  # still says what happened: "exit code 1: CUD…"
TABLE_COSTS = (LATENCY_MS, PARAMS)  # the costs a reader weighs when choosing a model; --json has every one


def cost_columns(trials: list[Trial], objectives: list[tuple[str, str]]) -> list[str]:
    """The table's cost columns: those some trial logged, unless an objective's column shows it already."""
    names = {name for name, _ in objectives}
    return [c for c in TABLE_COSTS if c not in names and any(is_number(t.summary.get(c)) for t in trials)]


class TrialTable:
    """The trial table at the width it is drawn at (a live view's terminal can be resized in between).

    Columns: id, state, the front mark (`*`, a sweep with several objectives), the first objective, the other
    objectives, the costs (latency_ms, params), time, the swept parameters, the reason. No value is ever folded:
    to fit, the reason column is shortened first, with an ellipsis (never below SHORTEST_REASON), then columns go
    in this order: time, the costs from the last one, the swept parameters from the last one, the reason, the
    objectives after the first from the last one. id, state, the front mark and the first objective always stay.
    A line under the table names what went.
    """

    def __init__(self, trials: list[Trial], objectives: list[tuple[str, str]], params: list[str],
                 remedy: str = "widen the terminal or use --json", front: Front | None = None,
                 costs: list[str] = ()):
        metric = objectives[0][0] if objectives else None
        others = [name for name, _ in objectives[1:]] if front is not None else []
        mark = ["front"] if front is not None else []
        self.headers = ["id", "state", *mark, metric or "metric", *others, *costs, "time", *params, "reason"]
        objective_columns = range(3 + len(mark), 3 + len(mark) + len(others))
        cost_columns = range(objective_columns.stop, objective_columns.stop + len(costs))
        self.time_column, self.reason = cost_columns.stop, len(self.headers) - 1
        param_columns = range(self.time_column + 1, self.reason)
        self.drop_order = [self.time_column, *reversed(cost_columns), *reversed(param_columns), self.reason,
                           *reversed(objective_columns)]
        self.remedy = remedy

        def row(t: Trial) -> list[Text]:
            values = objective_values(t, front.objectives) if front is not None else {}
            return [Text(t.id), Text(t.state, style=STATE_COLORS[t.state]),
                    *[Text("*" if t.id in front.ids else "") for _ in mark],
                    Text("" if t.metric is None else f"{t.metric:.4g}"),
                    *[Text(number(values[name])) for name in others],
                    *[Text(number(logged_costs(t).get(c))) for c in costs],
                    Text("" if t.duration is None else f"{t.duration:.0f}s"),
                    *[Text(short(t.config.get(p, ""))) for p in params], Text(t.reason or "")]

        # Cells are Text, never markup: a reason or a value may hold brackets, and markup would be printed
        # raw whenever a caller prints with markup off (the live view's event lines do).
        self.rows = [row(t) for t in trials]
        # A table of one row, each column's widest cell, measures as wide as the whole one, and far sooner.
        self.widest = [[max(column, key=lambda cell: cell.cell_len) for column in zip(*self.rows)]] if trials else []

    def table(self, shown: list[int], reason_width: int | None = None, rows: list[list[Text]] | None = None) -> Table:
        table = Table(box=None, header_style="bold")
        for i in shown:
            table.add_column(Text(self.headers[i]), no_wrap=True, overflow="ellipsis",
                             max_width=reason_width if i == self.reason else None)
        for row in self.rows if rows is None else rows:
            table.add_row(*(row[i] for i in shown))
        return table

    def __rich_console__(self, console: Console, options: ConsoleOptions):
        reason = self.reason
        # unbounded: a measurement is capped at the width it is asked within, which would hide the overflow
        unbounded = options.update_width(1 << 20)

        def overflow(shown: list[int], reason_width: int | None = None) -> int:
            table = self.table(shown, reason_width, self.widest)
            return Measurement.get(console, unbounded, table).maximum - options.max_width

        shown, dropped, reason_width = list(range(len(self.headers))), [], None
        for drop in [None, *self.drop_order]:
            if drop is not None:
                shown.remove(drop)
                dropped.append(self.headers[drop])
            if overflow(shown) <= 0:
                break
            if reason in shown and (spare := -overflow(shown, SHORTEST_REASON)) >= 0:
                reason_width = SHORTEST_REASON + spare
                break
        yield self.table(shown, reason_width)
        if dropped:
            yield Text(f"left out to fit {options.max_width} columns: {', '.join(dropped)}; {self.remedy}")


def sweep_table(trials: list[Trial], sweep: dict, shown: list[Trial] | None = None,
                remedy: str = "widen the terminal or use --json") -> tuple[TrialTable, list[str]]:
    """The table of the trials `shown` (default: all) and the lines under it; the front, if the sweep has several
    objectives, is the one of all the trials."""
    objectives, params = sweep_metrics(sweep), swept(sweep)
    front = pareto_front(trials, objectives) if several(objectives) else None
    table = TrialTable(trials if shown is None else shown, objectives, params, remedy, front,
                       cost_columns(trials, objectives))
    return table, summary_lines(trials, objectives, params, front)


def as_json(trials: list[Trial], sweep: dict) -> list[dict]:
    """`status --json`: every trial with its costs; with several objectives, its objectives' values and whether it
    is on the front, or why it was not considered."""
    objectives = sweep_metrics(sweep)
    front = pareto_front(trials, objectives) if several(objectives) else None
    items = []
    for t in trials:
        item = {"id": t.id, "state": t.state, "metric": t.metric, "config": t.config, "reason": t.reason,
                "exit_code": t.exit_code, "duration_s": t.duration, "gpu": t.gpu, "host": t.host,
                "costs": logged_costs(t)}
        if front is not None:
            item.update(objectives=objective_values(t, objectives), pareto=t.id in front.ids)
            if t.id in front.excluded:
                item["pareto_excluded"] = front.excluded[t.id]
        items.append(item)
    return items


def status(directory: str, as_json_list: bool) -> int:
    store = open_store(directory)
    sweep_id, sweep = store.sweep()
    trials = store.trials()
    if as_json_list:
        print(json.dumps(as_json(trials, sweep), indent=1))
        return 0
    out = console()
    print_wrapped(out, f"sweep {sweep_id} ({sweep['method']}) in {directory}")
    table, lines = sweep_table(trials, sweep)
    out.print(table)
    for line in lines:
        print_wrapped(out, line)
    return 0


class SweepView:
    """On a terminal, a live table of trials; elsewhere (logs, CI), a line per event."""

    def __init__(self, sweep_id: str, sweep: dict, directory: Path):
        self.sweep = sweep
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
        recent = sorted(trials, key=lambda t: t.created)[-12:]
        table, lines = sweep_table(trials, self.sweep, recent)
        self.last_summary = "\n".join(lines)
        if self.live:
            self.live.update(Group(table, Text(self.last_summary)), refresh=True)
