"""Compare a sweep's trials: `python -m agent report DIR|ENTITY/PROJECT/SWEEP_ID`.

For a local sweep (DIR holds sweep.db) it writes DIR/report.html, one self-contained file (inline CSS,
plots and images as data: URIs, no script, nothing fetched) that opens offline, and the same plots as
PNGs in DIR/report/. `python -m agent local SWEEP.yaml --report` rewrites it each time a trial ends.
The report holds the trial table (best first; failed and stopped trials marked, with their reason),
the metric over trials with the running best, parallel coordinates of the swept parameters, their
importance (a random forest's, as W&B's importance panel, but over the finished trials only: a stopped
trial's last value is an early one) and correlation with the metric, with how far to trust them, the
learning curves of the top trials and of every stopped one, and the best trial's last prediction images.
A sweep with several objectives (`metrics:`) also gets its Pareto front (views/pareto.py): marked in the trial
table, listed, and drawn: two objectives as one against the other, more as parallel coordinates of them.
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

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from agent.contract import EXAMPLES, parse_caption
from agent.controller.engine import sweep_metric, sweep_metrics
from agent.controller.runlog import RunLogReader, find_run_file
from agent.controller.store import Trial, is_local_target, open_store, state_counts
from agent.online.api import find_sweep, wandb_api
from agent.views.pareto import Front, heading, left_out, objective_values, pareto_front, several
from agent.views.plots import (
    importance,
    importance_chart,
    learning_curves,
    metric_over_trials,
    objectives_coordinates,
    parallel_coordinates,
    pareto_plot,
)
from agent.views.status import console, sweep_table
from agent.views.trials import STATE_COLORS, best_trial, number, ranked, run_trial, short, swept

IMAGE_NAME = re.compile(EXAMPLES + r"_(\d+)_[0-9a-f]+\.png")
CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1200px;
 padding:0 16px;color:#222}
h1{font-size:22px;margin-bottom:4px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
.meta{color:#555}.note{color:#777;font-style:italic}code{background:#f3f3f3;padding:1px 4px}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}th,td{padding:3px 10px;text-align:left}
th{border-bottom:2px solid #ccc}tr{background:#fff}tbody tr:nth-child(even){background:#f7f7f7}
tr.best{font-weight:bold}tr.failed,tr.crashed{background:#fde8e8!important}tr.stopped{background:#fff4d6!important}
.state{font-weight:600}td.reason{color:#666;max-width:420px}
.trials-box{overflow-x:auto}table.trials{border-collapse:separate;border-spacing:0}
.trials .id,.trials .metric{position:sticky;background:inherit;white-space:nowrap}
.trials .id{left:0;box-sizing:border-box;width:7em;min-width:7em}
.trials .metric{left:7em;border-right:1px solid #ccc}
img.plot{max-width:100%;display:block;margin:8px 0}
.grid{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0;width:96px;text-align:center;font-size:11px}
figure img{width:96px;height:96px;image-rendering:pixelated;border:3px solid #2a9d4b}
figure.wrong img{border-color:#d62728}
tr.front .mark{color:#b8860b;font-size:16px}table.pareto{margin-top:8px}
""" + "".join(f".s-{state}{{color:{color}}}" for state, color in STATE_COLORS.items())


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


def prediction_images(root: Path, trial_id: str) -> tuple[int, list[tuple[Path, str]]] | None:
    """The `examples` images of the trial's newest run at its last logged step, with their captions."""
    log = find_run_file(root, trial_id)
    if log is None:
        return None
    by_step: dict[int, list[Path]] = {}
    for f in (log.parent / "files" / "media" / "images").glob(f"{EXAMPLES}_*.png"):
        if match := IMAGE_NAME.fullmatch(f.name):
            by_step.setdefault(int(match[1]), []).append(f)
    if not by_step:
        return None
    captions = {}  # file name -> (its place in the logged list, caption), from the run's log
    try:
        for row in RunLogReader(log).poll():
            names, texts = row.get(f"{EXAMPLES}.filenames") or [], row.get(f"{EXAMPLES}.captions") or []
            captions.update({Path(n).name: (i, str(c)) for i, (n, c) in enumerate(zip(names, texts))})
    except (OSError, ValueError):
        pass
    step = max(by_step)
    files = sorted(by_step[step], key=lambda f: (captions.get(f.name, (1 << 30,))[0], f.name))
    return step, [(f, captions.get(f.name, (0, ""))[1]) for f in files]


# the page

def _trials_html(trials: list[Trial], metric: str, params: list[str], best: Trial | None, hosts: bool,
                 front: Front | None = None) -> str:
    """The trial table; with `hosts` (a sweep that can span boxes: a PostgreSQL store), which box ran each; with a
    `front` (several objectives), a column per objective and the front's trials marked.

    Wider than the page, it scrolls in its own box with id and metric pinned at its left: they come first,
    so the metric's offset is the id column's width, fixed in CSS (ids are 8 characters)."""
    others = [name for name, _ in front.objectives[1:]] if front else []
    columns = [*(["front", *others] if front else []), "state", "duration", *(["host"] if hosts else []), *params,
               "reason"]
    head = f'<th class="id">id</th><th class="metric">{html.escape(metric)}</th>' + \
        "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    rows = []
    for t in trials:
        on_front = front is not None and t.id in front.ids
        values = objective_values(t, front.objectives) if front else {}
        cells = [*([f'<span class="mark">{"★" if on_front else ""}</span>', *(number(values[n]) for n in others)]
                   if front else []),
                 f'<span class="state s-{t.state}">{t.state}</span>', _duration(t.duration),
                 *([html.escape(t.host or "")] if hosts else []),
                 *[html.escape(short(t.config.get(p, ""))) for p in params]]
        classes = t.state + (" best" if best is not None and t.id == best.id else "") + (" front" if on_front else "")
        rows.append(f'<tr class="{classes}"><td class="id">{html.escape(t.id)}</td>'
                    f'<td class="metric">{"" if t.metric is None else f"{t.metric:.4g}"}</td>' +
                    "".join(f"<td>{c}</td>" for c in cells) +
                    f'<td class="reason">{html.escape(t.reason or "")}</td></tr>')
    return f'<div class="trials-box"><table class="trials"><thead><tr>{head}</tr></thead>' \
           f'<tbody>{"".join(rows)}</tbody></table></div>'


def _pareto_html(folder: Path, trials: list[Trial], front: Front, params: list[str]) -> str:
    """The front: two objectives as a plot of one against the other, more as parallel coordinates of them; its
    trials as a table, best first by the first objective; the trials left out and why."""
    fig = pareto_plot(trials, front) if len(front.objectives) == 2 else objectives_coordinates(trials, front)
    names = [name for name, _ in front.objectives]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["id", *names, *params])
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in [
        t.id, *(number(v) for v in objective_values(t, front.objectives).values()),
        *(short(t.config.get(p, "")) for p in params)]) + "</tr>" for t in front.trials)
    notes = [heading(front), *filter(None, [left_out(front)])]
    return "".join(f'<p class="meta">{html.escape(n)}</p>' for n in notes) + \
        _plot_html(folder, "pareto", fig, "No trial has logged every objective yet.") + \
        (f'<table class="pareto"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>' if rows else "")


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
        said = parse_caption(caption)
        wrong = " wrong" if said and said[0] != said[1] else ""
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
        hosts = store.postgres
    finally:
        store.close()
    objectives = sweep_metrics(sweep)
    metric, goal = sweep_metric(sweep)
    metric = metric or "metric"
    params = swept(sweep)
    front = pareto_front(trials, objectives) if several(objectives) else None
    # With several objectives, the best by the first is the front's first: a trial off the front is beaten.
    best = front.trials[0] if front and front.trials else best_trial(trials, goal)
    folder = directory / "report"
    folder.mkdir(exist_ok=True)
    no_metric = f"No trial has logged {metric} yet."
    ranked_by = importance(trials, metric, params)
    if not ranked_by.rows:
        importance_html = _plot_html(folder, "importance", None, ranked_by.note)
    else:
        table = "".join(f"<tr><td>{html.escape(p)}</td><td>{imp:.3f}</td>"
                        f"<td>{'' if math.isnan(r) else f'{r:+.3f}'}</td></tr>" for p, imp, r in ranked_by.rows)
        importance_html = (f'<p class="note">{html.escape(ranked_by.note)}</p><table class="importance"><thead>'
                           f'<tr><th>parameter</th><th>importance</th><th>correlation</th></tr></thead>'
                           f'<tbody>{table}</tbody></table>' +
                           _plot_html(folder, "importance", importance_chart(ranked_by, metric), ""))
    counts = state_counts(trials)
    aim = f"objectives {', '.join(f'{n} ({g})' for n, g in objectives)}" if front else f"metric {metric} ({goal})"
    which = f"Best on the Pareto front by {metric}" if front and front.trials else "Best"
    best_html = "No trial has a metric yet." if best is None else (
        f"{html.escape(which)}: <b>{best.id}</b>, {html.escape(metric)} = {best.metric:.4g}; config: <code>" +
        html.escape(" ".join(f"{k}={short(v)}" for k, v in best.config.items())) + "</code>")
    in_order = ranked(trials, goal) if front is None else \
        front.trials + [t for t in ranked(trials, goal) if t.id not in front.ids]
    sections = [
        ("Trials", _trials_html(in_order, metric, params, best, hosts, front)),
        *([("Pareto front", _pareto_html(folder, trials, front, params))] if front else []),
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
            f'<p class="meta">method {html.escape(str(sweep.get("method")))} · {html.escape(aim)} · {counts} · '
            f'written {time.strftime("%Y-%m-%d %H:%M:%S")}</p><p>{best_html}</p>' +
            "".join(f"<h2>{title}</h2>{body}" for title, body in sections) + "</body></html>")
    path = directory / "report.html"
    partial = directory / ".report.html.partial"
    partial.write_text(page, encoding="utf-8")
    partial.replace(path)  # whoever has it open never reads half a page
    return path


def wandb_report(path: str) -> int:
    entity, project, sweep_id = path.split("/")
    with wandb_api(path, entity=entity) as api:
        sweep = find_sweep(api, path)
        config, url = sweep.config or {}, sweep.url
        # Not sweep.runs: its runs fetch their config and summary one request each.
        runs = list(api.runs(f"{entity}/{project}", filters={"$and": [{"sweep": sweep_id}]}, lazy=False))
    metric, goal = sweep_metric(config)
    trials = [run_trial(run, metric) for run in runs]
    out = console()
    out.print(f"sweep {path} ({config.get('method', '?')}): {len(trials)} runs")
    table, lines = sweep_table(trials, config, ranked(trials, goal), remedy="widen the terminal or see the dashboard")
    out.print(table)
    for line in lines:
        out.print(line)
    out.print(f"dashboard: {url}", soft_wrap=True)
    return 0


def report(target: str) -> int:
    """`python -m agent report`: a local sweep's HTML report, or a W&B sweep's table in the terminal."""
    if is_local_target(target):
        print(write_report(Path(target)))
        return 0
    return wandb_report(target)
