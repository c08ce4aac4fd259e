"""What every view of a sweep (status, report, plots, best) shows the same way: the states' colours, the best
trial and the ranking, the swept parameters, how a value is printed, the costs, and a W&B run as a trial."""

import math

from agent.contract import (
    COSTS,
    CRASHED,
    CUT_SHORT,
    ENDED_BY,
    FAILED,
    FINISHED,
    PAUSED,
    PENDING,
    RUNNING,
    STATES,
    STOPPED,
)
from agent.controller.outcome import diverged
from agent.controller.store import Trial, is_number

# One colour per state for the terminal table, the report's page and its plots alike.
STATE_COLORS = {FINISHED: "#2a9d4b", RUNNING: "#1f8fc8", PENDING: "#999999", PAUSED: "#6a5acd",
                FAILED: "#d62728", CRASHED: "#a03cb4", STOPPED: "#d08c00"}


# W&B's run states that a trial's do not name, as the views count them.
WANDB_STATES = {"killed": STOPPED, "preempted": CRASHED, "preempting": RUNNING, "pending": PENDING}


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


def number(value) -> str:
    """A metric's value as the tables print it: 4 significant digits; a count (an int: params, flops) with k, M or
    G, whose last digits say nothing; "" for none."""
    if value is None:
        return ""
    if isinstance(value, int) and not isinstance(value, bool):
        size, suffix = next(((s, x) for s, x in ((10**9, "G"), (10**6, "M"), (10**3, "k")) if abs(value) >= s), (1, ""))
        return f"{value / size:.3g}{suffix}" if suffix else str(value)
    return f"{value:.4g}"


def logged_costs(trial: Trial) -> dict:
    """What serving the trial's model costs, as our program measures it (contract.COSTS), where it logged it."""
    return {name: trial.summary[name] for name in COSTS if is_number(trial.summary.get(name))}


def run_trial(run, metric: str | None) -> Trial:
    """A W&B run (the public API's, its summary fetched) as a trial, as the views read one: its numbers as its
    summary, `metric`'s as its metric."""
    summary = dict(run.summary or {})
    value, runtime = summary.get(metric) if metric else None, summary.get("_runtime")
    state = run.state if run.state in STATES else WANDB_STATES.get(run.state, CRASHED)
    if state == FINISHED and summary.get(ENDED_BY) in CUT_SHORT:  # W&B marks a run a sweep's stop ended finished
        state = STOPPED
    # Not finite ones too: a NaN a run logged is why it has no place on a front.
    numbers = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
               and not k.startswith("_")}
    return Trial(id=run.id, params={k: {"value": v} for k, v in dict(run.config).items()}, state=state,
                 metric=float(value) if is_number(value) else None, reason=diverged(summary),
                 started=0.0 if is_number(runtime) and runtime > 0 else None,
                 ended=float(runtime) if is_number(runtime) and runtime > 0 else None, summary=numbers)
