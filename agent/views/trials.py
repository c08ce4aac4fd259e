"""What every view of a sweep (status, report, plots, best) shows the same way: the states' colours, the best
trial and the ranking, the swept parameters and how a value is printed."""

import math

from agent.contract import CRASHED, FAILED, FINISHED, PAUSED, PENDING, RUNNING, STOPPED
from agent.controller.store import Trial

# One colour per state for the terminal table, the report's page and its plots alike.
STATE_COLORS = {FINISHED: "#2a9d4b", RUNNING: "#1f8fc8", PENDING: "#999999", PAUSED: "#6a5acd",
                FAILED: "#d62728", CRASHED: "#a03cb4", STOPPED: "#d08c00"}


def swept(sweep: dict) -> list[str]:
    """The parameters that vary between trials (constants add nothing to a table)."""
    return [name for name, spec in (sweep.get("parameters") or {}).items()
            if not (isinstance(spec, dict) and "value" in spec)]


def best_trial(trials: list[Trial], goal: str) -> Trial | None:
    scored = [t for t in trials if t.metric is not None and not math.isnan(t.metric)]
    pick = max if goal == "maximize" else min
    return pick(scored, key=lambda t: t.metric) if scored else None


def ranked(trials: list[Trial], goal: str) -> list[Trial]:
    """Best first per the goal; trials with no metric last, in their own order."""
    scored = sorted((t for t in trials if t.metric is not None), key=lambda t: t.metric, reverse=goal == "maximize")
    ids = {t.id for t in scored}
    return scored + [t for t in trials if t.id not in ids]


def short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
