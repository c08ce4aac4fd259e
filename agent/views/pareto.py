"""The Pareto front of a sweep with several objectives (`metrics:`, each with its goal), as every view shows it, and
how `best` takes a point of it by constraints (`--where "latency_ms < 2"`).

A trial is on the front when no other trial is at least as good on every objective and better on one; trials
equal on every objective are all on it. Only finished trials with a finite value of every objective are
considered: a stopped trial's values were measured part-way, not comparable with a finished one's; a failed or
running trial has no final values; a trial of a program that logs only some of the objectives has no place on
it. Each trial not considered has its reason (`no latency_ms logged`, `stopped early`, `failed`).
"""

import re
from dataclasses import dataclass

from agent.contract import COSTS, FINISHED, STOPPED
from agent.controller.store import Trial, is_number
from agent.errors import UsageError, did_you_mean
from agent.views.trials import number

IDS_PER_REASON = 8  # the line of trials left out names this many for each reason, then counts the rest


@dataclass
class Front:
    objectives: list[tuple[str, str]]  # (name, goal), the first the one `best` sorts by
    trials: list[Trial]  # on the front, best first by the first objective
    excluded: dict[str, str]  # trial id -> why it was not considered

    @property
    def ids(self) -> set[str]:
        return {t.id for t in self.trials}


def several(objectives: list[tuple[str, str]]) -> bool:
    return len(objectives) > 1


def _logged(trial: Trial, objectives: list[tuple[str, str]], name: str):
    # A trial of a store older than summaries has its first objective's value as its metric.
    return trial.summary.get(name, trial.metric if name == objectives[0][0] else None)


def objective_values(trial: Trial, objectives: list[tuple[str, str]]) -> dict[str, float | None]:
    """The trial's latest value of each objective, None where it has no finite one."""
    return {name: value if is_number(value := _logged(trial, objectives, name)) else None for name, _ in objectives}


def exclusion(trial: Trial, objectives: list[tuple[str, str]]) -> str | None:
    """Why the trial cannot be on the front; None when it is a candidate."""
    if trial.state == STOPPED:
        return "stopped early"
    if trial.state != FINISHED:
        return trial.state
    for name, _ in objectives:
        if (value := _logged(trial, objectives, name)) is None:
            return f"no {name} logged"
        if not is_number(value):
            return f"{name} is {value!r}"
    return None


def _oriented(trial: Trial, objectives: list[tuple[str, str]]) -> tuple[float, ...]:
    """The trial's objective values, each signed so that greater is better."""
    values = objective_values(trial, objectives)
    return tuple(values[name] if goal == "maximize" else -values[name] for name, goal in objectives)


def best_first(trials: list[Trial], objectives: list[tuple[str, str]]) -> list[Trial]:
    """Trials with every objective, best first by the first objective, ties by the next."""
    return sorted(trials, key=lambda t: _oriented(t, objectives), reverse=True)


def pareto_front(trials: list[Trial], objectives: list[tuple[str, str]]) -> Front:
    excluded = {t.id: why for t in trials if (why := exclusion(t, objectives)) is not None}
    ordered = best_first([t for t in trials if t.id not in excluded], objectives)
    # A trial's dominators all come before it in this order (each is at least as good on the first objective and
    # better somewhere), and one of them is on the front: comparing with the front so far is enough.
    front: list[tuple[Trial, tuple[float, ...]]] = []
    for trial in ordered:
        mine = _oriented(trial, objectives)
        if not any(all(a >= b for a, b in zip(theirs, mine)) and theirs != mine for _, theirs in front):
            front.append((trial, mine))
    return Front(objectives, [t for t, _ in front], excluded)


def goals(front: Front) -> str:
    return ", ".join(f"{name} {goal[:3]}" for name, goal in front.objectives)


def heading(front: Front) -> str:
    """`Pareto front (val_acc max, latency_ms min): 3 trials: a1, b2, c3`."""
    if not front.trials:
        return f"Pareto front ({goals(front)}): none yet (no finished trial with every objective)"
    return f"Pareto front ({goals(front)}): {len(front.trials)} trial{'s' * (len(front.trials) > 1)}: " + \
        ", ".join(t.id for t in front.trials)


def left_out(front: Front) -> str | None:
    """The trials not considered, by reason, in one line: `left out of the front: stopped early: s1, s2; ...`."""
    by_reason: dict[str, list[str]] = {}
    for trial_id, why in front.excluded.items():
        by_reason.setdefault(why, []).append(trial_id)
    if not by_reason:
        return None
    parts = [f"{why}: {', '.join(ids[:IDS_PER_REASON])}" + (f" and {len(ids) - IDS_PER_REASON} more"
                                                          if len(ids) > IDS_PER_REASON else "")
             for why, ids in by_reason.items()]
    return "left out of the front: " + "; ".join(parts)


# `best --where`: constraints on a pick

WHERE = re.compile(r"\s*(?P<name>[^\s<>=]+)\s*(?P<op><=|>=|<|>)\s*"
                   r"(?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*")
OPERATORS = {"<": float.__lt__, "<=": float.__le__, ">": float.__gt__, ">=": float.__ge__}


@dataclass
class Constraint:
    name: str
    op: str
    bound: float

    def __str__(self) -> str:
        return f"{self.name} {self.op} {self.bound:g}"

    def met_by(self, value: float | None) -> bool:
        return value is not None and OPERATORS[self.op](float(value), self.bound)


def constraint_names(objectives: list[tuple[str, str]]) -> list[str]:
    return list(dict.fromkeys([name for name, _ in objectives] + list(COSTS)))


def parse_where(text: str, objectives: list[tuple[str, str]]) -> Constraint:
    """NAME OP NUMBER, OP one of < <= > >=, NAME one of the sweep's objectives or the costs our program logs."""
    names = constraint_names(objectives)
    match = WHERE.fullmatch(text)
    if match is None:
        raise UsageError(f"--where {text!r}: expected NAME OP NUMBER, e.g. 'latency_ms < 2' (OP one of <, <=, >, >=; "
                         f"NAME one of {', '.join(names)})")
    if match["name"] not in names:
        raise UsageError(f"--where {text!r}: {match['name']!r} is not one of the sweep's objectives or costs; "
                         f"{did_you_mean(match['name'], names)}")
    return Constraint(match["name"], match["op"], float(match["number"]))


def value_of(trial: Trial, name: str, objectives: list[tuple[str, str]]) -> float | None:
    """An objective's value (objective_values) or a cost's, None where the trial has none."""
    if name in dict(objectives):
        return objective_values(trial, objectives)[name]
    value = trial.summary.get(name)
    return value if is_number(value) else None


def pick(pool: list[Trial], constraints: list[Constraint], objectives: list[tuple[str, str]],
         who: str = "trial on the front", whose: str = "the front's") -> Trial:
    """The first trial of `pool` (best first, not empty) that meets every constraint. When none does: one line that
    names the constraint no trial of the pool meets (`who`) and that metric's range over the pool (`whose`)."""
    values = {c.name: [value_of(t, c.name, objectives) for t in pool] for c in constraints}
    for i, trial in enumerate(pool):
        if all(c.met_by(values[c.name][i]) for c in constraints):
            return trial

    def range_of(name: str) -> str:
        known = sorted({v for v in values[name] if v is not None})
        if not known:
            return f"no {name} logged"
        return f"{whose} {name}: {number(known[0])}" + (f" to {number(known[-1])}" if len(known) > 1 else "")

    unmet = next((c for c in constraints if not any(map(c.met_by, values[c.name]))), None)
    if unmet is not None:
        raise UsageError(f"no {who} has {unmet} ({range_of(unmet.name)})")
    raise UsageError(f"no {who} meets {' and '.join(map(str, constraints))} together "
                     f"({'; '.join(range_of(name) for name in values)})")
