"""The plots of a sweep report: each a matplotlib Figure (Agg, no display), or None when there
is nothing to draw yet. Used by agent/views/report.py."""

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from agent.contract import CRASHED, FAILED, FINISHED, PAUSED, RUNNING, STOPPED
from agent.controller.store import Trial, is_number
from agent.views.pareto import Front, objective_values
from agent.views.trials import STATE_COLORS, ranked, short

TOP_CURVES, MIN_FOR_IMPORTANCE = 5, 3
# Below this many ranked trials a random forest's ranking (and a correlation) moves with every trial added.
TRUSTED_IMPORTANCE = 10
# Why a trial with a metric is not ranked: its value was not measured at the end of a full training.
LEFT_OUT = {STOPPED: "stopped early: its last value is an early one, not comparable with a finished trial's",
            RUNNING: "not done", PAUSED: "paused part-way", FAILED: "ended part-way", CRASHED: "ended part-way"}


# the plots: each a Figure, or None when there is nothing to draw yet

def metric_over_trials(trials: list[Trial], metric: str, goal: str) -> Figure | None:
    started = sorted((t for t in trials if t.started is not None), key=lambda t: t.started)
    points = [(i, t) for i, t in enumerate(started, 1) if t.metric is not None]
    if not points:
        return None
    fig = Figure(figsize=(9, 3.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for state, color in STATE_COLORS.items():
        mine = [(i, t.metric) for i, t in points if t.state == state]
        if mine:
            ax.scatter(*zip(*mine), color=color, label=state, zorder=3)
    best = (np.maximum if goal == "maximize" else np.minimum).accumulate([t.metric for _, t in points])
    ax.step([i for i, _ in points], best, where="post", color="#333", label="best so far")
    ax.set(xlabel="trial, in start order", ylabel=metric, title=f"{metric} over trials ({goal})",
           xlim=(0.5, len(started) + 0.5))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _axis(values: list) -> tuple[list[float], list[tuple[float, str]], bool]:
    """Each value's position in [0, 1], the axis ticks, whether it is a log axis."""
    if all(is_number(v) for v in values):
        lo, hi = min(values), max(values)
        log = lo > 0 and hi / lo > 100
        scale = math.log10 if log else float
        a, b = scale(lo), scale(hi)
        if a == b:
            return [0.5] * len(values), [(0.5, short(lo))], False
        if log:  # the ends and the whole decades between them
            inner = [k for k in range(math.ceil(a), math.floor(b) + 1) if min(k - a, b - k) > 0.08 * (b - a)]
            ticks = [(0.0, short(lo)), *(((k - a) / (b - a), f"1e{k}") for k in inner), (1.0, short(hi))]
        else:
            ticks = [(k / 4, short(a + k * (b - a) / 4)) for k in range(5)]
        return [(scale(v) - a) / (b - a) for v in values], ticks, log
    categories = sorted({short(v) for v in values})
    where = {c: (i / (len(categories) - 1) if len(categories) > 1 else 0.5) for i, c in enumerate(categories)}
    return [where[short(v)] for v in values], [(p, c) for c, p in where.items()], False


def parallel_coordinates(trials: list[Trial], metric: str, goal: str, params: list[str],
                         highlight: set[str] | None = None) -> Figure | None:
    """A line per trial with a metric through its parameters' axes to the metric's, coloured by the metric; with
    `highlight`, those trials' lines drawn bold on top and the others faint."""
    scored = [t for t in trials if t.metric is not None]
    if not scored or not params:
        return None
    names = [*params, metric]
    axes = [_axis([t.config.get(p) for t in scored]) for p in params] + [_axis([t.metric for t in scored])]
    fig = Figure(figsize=(max(6.0, 2.0 * len(names)), 4.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    cmap = "viridis" if goal == "maximize" else "viridis_r"
    colors = ScalarMappable(Normalize(min(t.metric for t in scored), max(t.metric for t in scored)), cmap)
    sign = 1 if goal == "maximize" else -1
    bold = highlight or set()
    order = sorted(range(len(scored)), key=lambda i: (scored[i].id in bold, sign * scored[i].metric))
    for i in order:  # the best (the highlighted first) drawn last, on top
        faint = highlight is not None and scored[i].id not in bold
        ax.plot(range(len(names)), [positions[i] for positions, _, _ in axes], color=colors.to_rgba(scored[i].metric),
                lw=1.2 if faint else 3.0 if highlight else 1.8, alpha=0.3 if faint else 0.85)
    for x, (_, ticks, _) in enumerate(axes):
        ax.axvline(x, color="#444", lw=1)
        for y, label in ticks:
            ax.text(x + 0.03, y, label, fontsize=8, va="center",
                    bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.8))
    ax.set_xticks(range(len(names)), [n + (" (log)" if log else "") for n, (_, _, log) in zip(names, axes)])
    ax.xaxis.tick_top()
    ax.set_yticks([])
    ax.set_xlim(-0.1, len(names) - 0.6)
    ax.set_ylim(-0.05, 1.05)
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.colorbar(colors, ax=ax, label=metric, pad=0.01)
    return fig


def pareto_plot(trials: list[Trial], front: Front) -> Figure | None:
    """Two objectives: each trial with both values a point, coloured by state and named by its id; the front a step
    line through its points, its corners where the region its trials dominate ends."""
    (x_name, x_goal), (y_name, y_goal) = front.objectives
    points = [(t, v[x_name], v[y_name]) for t in trials
              if None not in (v := objective_values(t, front.objectives)).values()]
    if not points:
        return None
    fig = Figure(figsize=(9, 5.4), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for state, color in STATE_COLORS.items():
        mine = [(x, y) for t, x, y in points if t.state == state]
        if mine:
            ax.scatter(*zip(*mine), color=color, label=state, zorder=3)
    on = sorted((x, y) for t, x, y in points if t.id in front.ids)
    if on:
        worse_x, worse_y = (min if x_goal == "maximize" else max), (min if y_goal == "maximize" else max)
        path = on[:1]
        for a, b in zip(on, on[1:]):  # the corner between two neighbours is worse than both: dominated by both
            path += [(worse_x(a[0], b[0]), worse_y(a[1], b[1])), b]
        ax.plot(*zip(*path), color="#333", lw=1.5, marker="o", ms=11, mfc="none", markevery=slice(0, None, 2),
                zorder=2, label=f"Pareto front ({len(on)} trial{'s' * (len(on) > 1)})")
    named: dict[tuple[float, float], list[str]] = {}
    for t, x, y in points:  # trials at the same point share one label, not labels drawn over each other
        named.setdefault((x, y), []).append(t.id)
    for (x, y), ids in named.items():
        ax.annotate(", ".join(ids), (x, y), xytext=(5, 4), textcoords="offset points", fontsize=7, color="#333")
    ax.set(xlabel=f"{x_name} ({x_goal})", ylabel=f"{y_name} ({y_goal})", title=f"{y_name} against {x_name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def objectives_coordinates(trials: list[Trial], front: Front) -> Figure | None:
    """Three objectives or more: parallel coordinates of the objectives, the front's trials in bold."""
    labels = {name: f"{name} ({goal[:3]})" for name, goal in front.objectives}
    (first, goal), others = front.objectives[0], [name for name, _ in front.objectives[1:]]
    as_params = [Trial(t.id, {labels[n]: {"value": v[n]} for n in others}, t.state, metric=v[first]) for t in trials
                 if None not in (v := objective_values(t, front.objectives)).values()]
    return parallel_coordinates(as_params, labels[first], goal, [labels[n] for n in others], highlight=front.ids)


@dataclass
class Importance:
    rows: list[tuple[str, float, float]]  # (param, importance, correlation), most important first; [] if too few
    ranked: int  # how many trials are ranked
    note: str  # which trials are ranked, which are left out and why, how far to trust it; or why there are no rows


def importance(trials: list[Trial], metric: str, params: list[str]) -> Importance:
    """Each parameter's importance (a random forest's, as W&B's panel computes it) and correlation with the
    metric, over the finished trials only. W&B's panel ranks every run with the metric; but a hyperband-stopped
    trial's last value was logged early in its training and reads as "worse" next to finished ones: ranked
    with them, it would reward what makes a trial start fast rather than end well."""
    scored = [t for t in trials if t.state == FINISHED and t.metric is not None]
    left_out = Counter(t.state for t in trials if t.metric is not None and t.state != FINISHED)
    left = "".join(f"; {n} {state} left out ({LEFT_OUT.get(state, 'not finished')})" for state, n in left_out.items())
    if not params:
        return Importance([], 0, "No parameter varies in this sweep.")
    if len(scored) < MIN_FOR_IMPORTANCE:
        return Importance([], len(scored), f"Needs at least {MIN_FOR_IMPORTANCE} finished trials with a {metric}; "
                                           f"{len(scored)} so far{left}.")
    note = f"Ranks the {len(scored)} finished trials{left}."
    if len(scored) < TRUSTED_IMPORTANCE:
        note += (f" Fewer than {TRUSTED_IMPORTANCE}: the ranking is noise-prone (one more trial can reorder it), "
                 "a hint, not a finding.")
    from sklearn.ensemble import RandomForestRegressor  # slow to import; only here

    y = np.array([t.metric for t in scored])
    columns, owners, correlation = [], [], {}
    for p in params:
        values = [t.config.get(p) for t in scored]
        if all(is_number(v) for v in values):
            mine = [np.array(values, dtype=float)]
        else:  # one-hot; the correlation of its most correlated category
            labels = [short(v) for v in values]
            mine = [np.array([v == c for v in labels], dtype=float) for c in sorted(set(labels))]
        rs = [float(np.corrcoef(c, y)[0, 1]) for c in mine if c.std() > 0 and y.std() > 0]
        correlation[p] = max(rs, key=abs) if rs else math.nan
        columns += mine
        owners += [p] * len(mine)
    forest = RandomForestRegressor(n_estimators=100, random_state=0).fit(np.column_stack(columns), y)
    total = dict.fromkeys(params, 0.0)
    for owner, value in zip(owners, forest.feature_importances_):
        total[owner] += float(value)
    return Importance(sorted(((p, total[p], correlation[p]) for p in params), key=lambda row: -row[1]),
                      len(scored), note)


def importance_chart(result: Importance, metric: str) -> Figure:
    rows = result.rows
    fig = Figure(figsize=(9, 0.45 * len(rows) + 1.4), dpi=100, layout="constrained")
    fig.suptitle(f"over {result.ranked} finished trials" +
                 (" (few: noise-prone)" if result.ranked < TRUSTED_IMPORTANCE else ""), fontsize=10)
    left, right = fig.subplots(1, 2, sharey=True)
    names = [r[0] for r in rows][::-1]
    left.barh(names, [r[1] for r in rows][::-1], color="#6a5acd")
    left.set(title="importance", xlim=(0, 1))
    corr = [0.0 if math.isnan(r[2]) else r[2] for r in rows][::-1]
    right.barh(names, corr, color=["#2a9d4b" if c >= 0 else "#d62728" for c in corr])
    right.set(title=f"correlation with {metric}", xlim=(-1, 1))
    right.axvline(0, color="#444", lw=0.8)
    return fig


def learning_curves(trials: list[Trial], metric: str, goal: str) -> Figure | None:
    top = [t for t in ranked(trials, goal) if t.metric is not None][:TOP_CURVES]
    chosen = top + [t for t in trials if t.state == STOPPED and t.id not in {s.id for s in top}]
    curves = [(t, [(i, v) for i, v in enumerate(t.history, 1) if is_number(v)]) for t in chosen]
    curves = [(t, points) for t, points in curves if points]
    if not curves:
        return None
    fig = Figure(figsize=(9, 4), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for t, points in curves:
        xs, ys = zip(*points)
        label = f"{t.id} ({t.state}" + (f", {t.metric:.4g})" if t.metric is not None else ")")
        [line] = ax.plot(xs, ys, marker="o", ms=3, label=label)
        if t.state == STOPPED:
            ax.plot(xs[-1], ys[-1], marker="x", ms=11, mew=2.5, color=line.get_color())
    if any(t.state == STOPPED for t, _ in curves):
        ax.plot([], [], "x", color="#333", ms=9, mew=2.5, label="stopped (hyperband)")
    ax.set(xlabel="logged step (epoch, for our program)", ylabel=metric, title=f"{metric} per trial")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig
