"""Compare a sweep's trials: `python -m agent report DIR|ENTITY/PROJECT/SWEEP_ID`.

For a local sweep (DIR holds sweep.db) it writes DIR/report.html, one self-contained file (inline CSS,
plots and images as data: URIs, no script, nothing fetched) that opens offline, and the same plots as
PNGs in DIR/report/. `python -m agent local SWEEP.yaml --report` rewrites it each time a trial ends.
The report holds the trial table (best first; failed and stopped trials marked, with their reason),
the metric over trials with the running best, parallel coordinates of the swept parameters, their
importance (a random forest's, as W&B's importance panel) and correlation with the metric, the learning
curves of the top trials and of every stopped one, and the best trial's last logged prediction images.
Any program's sweep works: a foreign metric, any parameters, no images, no finished trial yet.

For a W&B sweep it prints the runs as `status` prints trials, best first, and the dashboard URL.
"""

import base64
import html
import io
import math
import re
import time
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from agent.errors import UsageError
from agent.runlog import RunLogReader
from agent.status import STATE_STYLE, best_trial, console, open_store, summary_line, swept, trial_table
from agent.store import Trial

SWEEP_PATH = re.compile(r"[^/\s]+/[^/\s]+/[^/\s]+")
IMAGE_NAME = re.compile(r"examples_(\d+)_[0-9a-f]+\.png")
CAPTION = re.compile(r"Pred: (.*), Label: (.*)")
COLORS = {"finished": "#2a9d4b", "running": "#1f8fc8", "pending": "#999999", "failed": "#d62728",
          "crashed": "#a03cb4", "stopped": "#e09b00"}
WANDB_STATES = {"killed": "stopped", "preempted": "crashed", "preempting": "running", "pending": "pending"}
TOP_CURVES, MIN_FOR_IMPORTANCE = 5, 3
CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1200px;
 padding:0 16px;color:#222}
h1{font-size:22px;margin-bottom:4px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
.meta{color:#555}.note{color:#777;font-style:italic}code{background:#f3f3f3;padding:1px 4px}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}th,td{padding:3px 10px;text-align:left}
th{border-bottom:2px solid #ccc}tbody tr:nth-child(even){background:#f7f7f7}
tr.best{font-weight:bold}tr.failed,tr.crashed{background:#fde8e8!important}tr.stopped{background:#fff4d6!important}
.state{font-weight:600}.s-finished{color:#2a9d4b}.s-failed{color:#d62728}.s-stopped{color:#b07800}
.s-crashed{color:#a03cb4}.s-running{color:#1f8fc8}.s-pending{color:#999}td.reason{color:#666;max-width:420px}
img.plot{max-width:100%;display:block;margin:8px 0}
.grid{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0;width:96px;text-align:center;font-size:11px}
figure img{width:96px;height:96px;image-rendering:pixelated;border:3px solid #2a9d4b}
figure.wrong img{border-color:#d62728}
"""


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def ranked(trials: list[Trial], goal: str) -> list[Trial]:
    """Best first per the goal; trials with no metric last, in their own order."""
    scored = sorted((t for t in trials if t.metric is not None), key=lambda t: t.metric, reverse=goal == "maximize")
    ids = {t.id for t in scored}
    return scored + [t for t in trials if t.id not in ids]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds:.0f}s" if seconds < 60 else f"{int(seconds // 60)}m {seconds % 60:02.0f}s"


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer)
    return buffer.getvalue()


def _data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


# the plots: each a Figure, or None when there is nothing to draw yet

def metric_over_trials(trials: list[Trial], metric: str, goal: str) -> Figure | None:
    started = sorted((t for t in trials if t.started is not None), key=lambda t: t.started)
    points = [(i, t) for i, t in enumerate(started, 1) if t.metric is not None]
    if not points:
        return None
    fig = Figure(figsize=(9, 3.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for state, color in COLORS.items():
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
    if all(_number(v) for v in values):
        lo, hi = min(values), max(values)
        log = lo > 0 and hi / lo > 100
        scale = math.log10 if log else float
        a, b = scale(lo), scale(hi)
        if a == b:
            return [0.5] * len(values), [(0.5, _short(lo))], False
        if log:  # the ends and the whole decades between them
            inner = [k for k in range(math.ceil(a), math.floor(b) + 1) if min(k - a, b - k) > 0.08 * (b - a)]
            ticks = [(0.0, _short(lo)), *(((k - a) / (b - a), f"1e{k}") for k in inner), (1.0, _short(hi))]
        else:
            ticks = [(k / 4, _short(a + k * (b - a) / 4)) for k in range(5)]
        return [(scale(v) - a) / (b - a) for v in values], ticks, log
    categories = sorted({_short(v) for v in values})
    where = {c: (i / (len(categories) - 1) if len(categories) > 1 else 0.5) for i, c in enumerate(categories)}
    return [where[_short(v)] for v in values], [(p, c) for c, p in where.items()], False


def parallel_coordinates(trials: list[Trial], metric: str, goal: str, params: list[str]) -> Figure | None:
    scored = [t for t in trials if t.metric is not None]
    if not scored or not params:
        return None
    names = [*params, metric]
    axes = [_axis([t.config.get(p) for t in scored]) for p in params] + [_axis([t.metric for t in scored])]
    fig = Figure(figsize=(max(6.0, 2.0 * len(names)), 4.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    cmap = "viridis" if goal == "maximize" else "viridis_r"
    colors = ScalarMappable(Normalize(min(t.metric for t in scored), max(t.metric for t in scored)), cmap)
    order = sorted(range(len(scored)), key=lambda i: scored[i].metric, reverse=goal != "maximize")
    for i in order:  # the best drawn last, on top
        ax.plot(range(len(names)), [positions[i] for positions, _, _ in axes],
                color=colors.to_rgba(scored[i].metric), lw=1.8, alpha=0.85)
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


def importance(trials: list[Trial], metric: str, params: list[str]) -> list[tuple[str, float, float]] | str:
    """(param, importance, correlation) rows, most important first, as W&B's panel computes them; or why not."""
    scored = [t for t in trials if t.metric is not None]
    if not params:
        return "No parameter varies in this sweep."
    if len(scored) < MIN_FOR_IMPORTANCE:
        return f"Needs at least {MIN_FOR_IMPORTANCE} trials with a {metric}; {len(scored)} so far."
    from sklearn.ensemble import RandomForestRegressor  # slow to import; only here

    y = np.array([t.metric for t in scored])
    columns, owners, correlation = [], [], {}
    for p in params:
        values = [t.config.get(p) for t in scored]
        if all(_number(v) for v in values):
            mine = [np.array(values, dtype=float)]
        else:  # one-hot; the correlation of its most correlated category
            labels = [_short(v) for v in values]
            mine = [np.array([v == c for v in labels], dtype=float) for c in sorted(set(labels))]
        rs = [float(np.corrcoef(c, y)[0, 1]) for c in mine if c.std() > 0 and y.std() > 0]
        correlation[p] = max(rs, key=abs) if rs else math.nan
        columns += mine
        owners += [p] * len(mine)
    forest = RandomForestRegressor(n_estimators=100, random_state=0).fit(np.column_stack(columns), y)
    total = dict.fromkeys(params, 0.0)
    for owner, value in zip(owners, forest.feature_importances_):
        total[owner] += float(value)
    return sorted(((p, total[p], correlation[p]) for p in params), key=lambda row: -row[1])


def importance_chart(rows: list[tuple[str, float, float]], metric: str) -> Figure:
    fig = Figure(figsize=(9, 0.45 * len(rows) + 1.4), dpi=100, layout="constrained")
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
    chosen = top + [t for t in trials if t.state == "stopped" and t.id not in {s.id for s in top}]
    curves = [(t, [(i, v) for i, v in enumerate(t.history, 1) if _number(v)]) for t in chosen]
    curves = [(t, points) for t, points in curves if points]
    if not curves:
        return None
    fig = Figure(figsize=(9, 4), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for t, points in curves:
        xs, ys = zip(*points)
        label = f"{t.id} ({t.state}" + (f", {t.metric:.4g})" if t.metric is not None else ")")
        [line] = ax.plot(xs, ys, marker="o", ms=3, label=label)
        if t.state == "stopped":
            ax.plot(xs[-1], ys[-1], marker="x", ms=11, mew=2.5, color=line.get_color())
    if any(t.state == "stopped" for t, _ in curves):
        ax.plot([], [], "x", color="#333", ms=9, mew=2.5, label="stopped (hyperband)")
    ax.set(xlabel="logged step (epoch, for our program)", ylabel=metric, title=f"{metric} per trial")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig


def prediction_images(root: Path, trial_id: str) -> tuple[int, list[tuple[Path, str]]] | None:
    """The `examples` images of the trial's newest run at its last logged step, with their captions."""
    runs = sorted(root.glob(f"wandb/offline-run-*-{trial_id}"))
    if not runs:
        return None
    by_step: dict[int, list[Path]] = {}
    for f in (runs[-1] / "files" / "media" / "images").glob("examples_*.png"):
        if match := IMAGE_NAME.fullmatch(f.name):
            by_step.setdefault(int(match[1]), []).append(f)
    if not by_step:
        return None
    captions = {}  # file name -> (its place in the logged list, caption), from the run's log
    try:
        for row in RunLogReader(runs[-1] / f"run-{trial_id}.wandb").poll():
            names, texts = row.get("examples.filenames") or [], row.get("examples.captions") or []
            captions.update({Path(n).name: (i, str(c)) for i, (n, c) in enumerate(zip(names, texts))})
    except (OSError, ValueError):
        pass
    step = max(by_step)
    files = sorted(by_step[step], key=lambda f: (captions.get(f.name, (1 << 30,))[0], f.name))
    return step, [(f, captions.get(f.name, (0, ""))[1]) for f in files]


# the page

def _trials_html(trials: list[Trial], metric: str, params: list[str], best: Trial | None) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["id", "state", metric, "duration", *params, "reason"])
    rows = []
    for t in trials:
        cells = [html.escape(t.id), f'<span class="state s-{t.state}">{t.state}</span>',
                 "" if t.metric is None else f"{t.metric:.4g}", _duration(t.duration),
                 *[html.escape(_short(t.config.get(p, ""))) for p in params]]
        classes = t.state + (" best" if best is not None and t.id == best.id else "")
        rows.append(f'<tr class="{classes}">' + "".join(f"<td>{c}</td>" for c in cells) +
                    f'<td class="reason">{html.escape(t.reason or "")}</td></tr>')
    return f'<table class="trials"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _plot_html(folder: Path, name: str, fig: Figure | None, note: str) -> str:
    path = folder / f"{name}.png"
    if fig is None:
        path.unlink(missing_ok=True)  # an earlier report's plot would no longer match the table
        return f'<p class="note">{html.escape(note)}</p>'
    data = _png(fig)
    path.write_bytes(data)
    return f'<img class="plot" alt="{name}" src="{_data_uri(data)}">'


def _images_html(root: Path, best: Trial | None) -> str:
    found = best and prediction_images(root, best.id)
    if not found:
        return '<p class="note">No prediction images: the best trial logged no <code>examples</code> images ' \
               '(only our program logs them).</p>'
    step, images = found
    figures = []
    for path, caption in images:
        match = CAPTION.fullmatch(caption)
        wrong = " wrong" if match and match[1] != match[2] else ""
        figures.append(f'<figure class="example{wrong}"><img alt="{html.escape(caption or path.name)}" '
                       f'src="{_data_uri(path.read_bytes())}"><figcaption>{html.escape(caption)}</figcaption></figure>')
    return f'<p class="meta">Trial {best.id}, step {step} (its last logged), {len(images)} validation images; ' \
           f'a red frame is a wrong prediction.</p><div class="grid">{"".join(figures)}</div>'


def write_report(directory: Path) -> Path:
    """Writes DIR/report.html and DIR/report/*.png for the local sweep in DIR; returns the HTML's path."""
    directory = Path(directory)
    store = open_store(str(directory))
    try:
        sweep_id, sweep = store.sweep()
        trials = store.trials()
    finally:
        store.db.close()
    metric = (sweep.get("metric") or {}).get("name") or "metric"
    goal = (sweep.get("metric") or {}).get("goal", "minimize")
    params = swept(sweep)
    best = best_trial(trials, goal)
    folder = directory / "report"
    folder.mkdir(exist_ok=True)
    no_metric = f"No trial has logged {metric} yet."
    rows = importance(trials, metric, params)
    if isinstance(rows, str):
        importance_html = _plot_html(folder, "importance", None, rows)
    else:
        table = "".join(f"<tr><td>{html.escape(p)}</td><td>{imp:.3f}</td>"
                        f"<td>{'' if math.isnan(r) else f'{r:+.3f}'}</td></tr>" for p, imp, r in rows)
        importance_html = (f'<table class="importance"><thead><tr><th>parameter</th><th>importance</th>'
                           f'<th>correlation</th></tr></thead><tbody>{table}</tbody></table>' +
                           _plot_html(folder, "importance", importance_chart(rows, metric), ""))
    counts = ", ".join(f"{n} {s}" for s in STATE_STYLE if (n := sum(t.state == s for t in trials))) or "no trials yet"
    best_html = "No trial has a metric yet." if best is None else (
        f"Best: <b>{best.id}</b>, {html.escape(metric)} = {best.metric:.4g}; config: <code>" +
        html.escape(" ".join(f"{k}={_short(v)}" for k, v in best.config.items())) + "</code>")
    sections = [
        ("Trials", _trials_html(ranked(trials, goal), metric, params, best)),
        ("Metric over trials", _plot_html(folder, "metric_over_trials", metric_over_trials(trials, metric, goal),
                                          no_metric)),
        ("Parallel coordinates", _plot_html(folder, "parallel_coordinates",
                                            parallel_coordinates(trials, metric, goal, params),
                                            no_metric if params else "No parameter varies in this sweep.")),
        ("Parameter importance", importance_html),
        ("Learning curves", _plot_html(folder, "learning_curves", learning_curves(trials, metric, goal), no_metric)),
        ("Best trial's predictions", _images_html(directory, best)),
    ]
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Sweep {html.escape(sweep_id)}'
            f'</title><style>{CSS}</style></head><body><h1>Sweep {html.escape(sweep_id)}</h1>'
            f'<p class="meta">method {html.escape(str(sweep.get("method")))} · metric {html.escape(metric)} '
            f'({html.escape(goal)}) · {counts} · written {time.strftime("%Y-%m-%d %H:%M:%S")}</p><p>{best_html}</p>' +
            "".join(f"<h2>{title}</h2>{body}" for title, body in sections) + "</body></html>")
    path = directory / "report.html"
    partial = directory / ".report.html.partial"
    partial.write_text(page, encoding="utf-8")
    partial.replace(path)  # whoever has it open never reads half a page
    return path


def wandb_report(path: str) -> int:
    import wandb

    try:
        sweep = wandb.Api().sweep(path)
        config, runs = sweep.config or {}, list(sweep.runs)
    except (wandb.errors.Error, ValueError) as e:
        raise UsageError(f"{path}: {e}") from e
    metric = (config.get("metric") or {}).get("name")
    goal = (config.get("metric") or {}).get("goal", "minimize")
    trials = []
    for run in runs:
        value = run.summary.get(metric) if metric else None
        runtime = run.summary.get("_runtime")
        state = run.state if run.state in STATE_STYLE else WANDB_STATES.get(run.state, "crashed")
        trials.append(Trial(id=run.id, params={k: {"value": v} for k, v in dict(run.config).items()}, state=state,
                            metric=float(value) if _number(value) else None,
                            started=0.0 if _number(runtime) and runtime > 0 else None,
                            ended=float(runtime) if _number(runtime) and runtime > 0 else None))
    params = swept(config)
    url = getattr(sweep, "url", None)
    out = console()
    out.print(f"sweep {path} ({config.get('method', '?')}): {len(trials)} runs")
    out.print(trial_table(ranked(trials, goal), metric, params))
    out.print(summary_line(trials, metric, goal, params))
    entity, project, sweep_id = path.split("/")
    out.print(f"dashboard: {url if isinstance(url, str) else f'https://wandb.ai/{entity}/{project}/sweeps/{sweep_id}'}",
              soft_wrap=True)
    return 0


def report(target: str) -> int:
    """`python -m agent report`: a local sweep's HTML report, or a W&B sweep's table in the terminal."""
    if (Path(target) / "sweep.db").is_file():
        print(write_report(Path(target)))
        return 0
    if SWEEP_PATH.fullmatch(target) and not Path(target).exists():
        return wandb_report(target)
    raise UsageError(f"{target}: neither a local sweep folder (no sweep.db in it) nor ENTITY/PROJECT/SWEEP_ID")
