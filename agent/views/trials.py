"""What a trial is, and what every view of a sweep (status, report, plots, best) reads the same way:
the states and their colours, the sweep's metric and goal, the best trial and the ranking, the swept
parameters and how a value is printed."""

import math
import time
from dataclasses import dataclass, field

# in the order tables count them; paused: saved its state on Ctrl-C, resumed by the same command
STATES = ("finished", "running", "pending", "paused", "failed", "crashed", "stopped")
LIVE = ("pending", "running")
# One colour per state for the terminal table, the report's page and its plots alike.
STATE_COLORS = {"finished": "#2a9d4b", "running": "#1f8fc8", "pending": "#999999", "paused": "#6a5acd",
                "failed": "#d62728", "crashed": "#a03cb4", "stopped": "#d08c00"}


@dataclass
class Trial:
    id: str
    params: dict
    state: str
    metric: float | None = None
    history: list = field(default_factory=list)
    exit_code: int | None = None
    reason: str | None = None
    pid: int | None = None
    gpu: str | None = None
    host: str | None = None  # the box it ran on
    created: float = 0.0
    started: float | None = None
    ended: float | None = None
    stop_requested: float | None = None

    @property
    def config(self) -> dict:
        return {name: spec.get("value") for name, spec in self.params.items()}

    @property
    def duration(self) -> float | None:
        return None if self.started is None else (self.ended or time.time()) - self.started


def is_number(value) -> bool:
    """A finite int or float (not a bool): a usable metric or parameter value."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def sweep_metric(sweep: dict) -> tuple[str | None, str]:
    """The sweep's metric name (None when it has none) and goal, W&B's default goal included."""
    metric = sweep.get("metric") or {}
    return metric.get("name"), metric.get("goal", "minimize")


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


def state_counts(trials: list[Trial]) -> str:
    """"3 finished, 1 stopped", in the order of STATES; "no trials yet" when there are none."""
    return ", ".join(f"{n} {s}" for s in STATES if (n := sum(t.state == s for t in trials))) or "no trials yet"


def short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
