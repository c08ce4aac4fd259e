"""The sweep report: real local sweeps (one of them the README's quickstart, as written there) ->
DIR/report.html, opened in a real headless browser; the W&B table."""

import json
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agent.contract import parse_caption
from agent.controller.store import Store, Trial, open_store, sqlite_url
from agent.errors import UsageError
from agent.views.plots import importance, importance_chart
from agent.views.report import learning_curves, report, write_report
from cifar_core.data import CIFAR10_CLASSES
from tests.conftest import write_cifar
from tests.helpers import REPO, agent_command, fresh_env

# One xdist process runs them all: the module's sweeps are made once.
pytestmark = pytest.mark.xdist_group("report")

FOREIGN = REPO / "tests" / "programs" / "foreign_train.py"
PLOTS = ["metric_over_trials", "parallel_coordinates", "importance", "learning_curves"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def run_sweep(root: Path, sweep: dict, *args: str, **env: str) -> Path:
    """A real `python -m agent local` sweep in root/D, offline under root; returns root/D."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    env = fresh_env(root, **env)
    out = subprocess.run(agent_command("local", "sweep.yaml", "--dir", "D", *args), cwd=root, env=env,
                         capture_output=True, text=True, timeout=150)
    assert out.returncode in (0, 1), out.stdout + out.stderr  # 1: failed trials, which we want here
    return root / "D"


@pytest.fixture(scope="module")
def foreign_dir(tmp_path_factory) -> Path:
    """6 trials of a plain W&B program logging `loss`; those with x > 0.8 exit 1 (failed)."""
    root = tmp_path_factory.mktemp("foreign")
    shutil.copy(FOREIGN, root / "foreign_train.py")
    return run_sweep(root, {"program": "foreign_train.py", "method": "grid",
                            "metric": {"name": "loss", "goal": "minimize"},
                            "parameters": {"x": {"values": [0.2, 0.5, 0.9]}, "opt": {"values": ["adam", "sgd"]}}},
                     "--workers", "2", FAIL_ABOVE="0.8")


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> tuple[list[str], subprocess.CompletedProcess, Path]:
    """The README's quickstart with CIFAR10_DATA_DIR, as written there (our program, sweeps/cpu-fast.yaml,
    bayes, hyperband, warm workers, --report), on tiny CIFAR-10 files: its argv, its outcome, its folder."""
    [line] = [line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("CIFAR10_DATA_DIR=")]
    args = shlex.split(line.replace("sweeps/", f"{REPO}/sweeps/"))
    assert args[1:4] == ["python", "-m", "agent"] and "--report" in args
    root = tmp_path_factory.mktemp("quickstart")
    data = write_cifar(root / "data", per_batch=120)  # enough for 60% of an epoch at batch 256 to be a batch
    out = subprocess.run([sys.executable, *args[2:]], env=fresh_env(root, CIFAR10_DATA_DIR=str(data)),
                         capture_output=True, text=True, cwd=root, timeout=240)
    return args, out, root


@pytest.fixture(scope="module")
def ours_dir(quickstart) -> Path:
    _, out, root = quickstart
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    [directory] = (root / "sweeps-local").iterdir()
    return directory


@pytest.mark.slow
def test_the_readme_quickstart_runs_its_trials_and_prints_the_report_last(quickstart, ours_dir):
    args, out, _ = quickstart
    assert out.stdout.strip().splitlines()[-1] == f"report: {ours_dir / 'report.html'}"  # the line to click
    trials = states(ours_dir)
    assert len(trials) == int(args[args.index("--count") + 1])
    assert set(trials.values()) <= {"finished", "stopped"} and "finished" in trials.values()


def states(directory: Path) -> dict[str, str]:
    with sqlite3.connect(directory / "sweep.db") as db:
        return dict(db.execute("SELECT id, state FROM trials"))


# How wide the page and the trial table's box are, and, with the box scrolled all the way right, where the
# id and metric headers are in it and whether the pinned cells hide what scrolls beneath them.
GEOMETRY = """() => {
  const box = document.querySelector(".trials-box"), page = document.documentElement;
  const seen = {pageWidth: page.scrollWidth, viewWidth: innerWidth, boxContent: box.scrollWidth,
                boxWidth: box.clientWidth};
  box.scrollLeft = box.scrollWidth;
  const edges = box.getBoundingClientRect();
  seen.pinned = [...box.querySelectorAll("thead th.id, thead th.metric")].map(th => {
    const r = th.getBoundingClientRect();
    return {name: th.textContent, left: r.left - edges.left, right: r.right - edges.left,
            visible: r.left >= edges.left && r.right <= edges.left + box.clientWidth};
  });
  seen.see_through = [...box.querySelectorAll(".id, .metric")].map(c => getComputedStyle(c).backgroundColor)
    .filter(color => color.startsWith("rgba"));
  return seen;
}"""


def open_in_browser(html: Path, screenshot: Path, width: int = 1280) -> dict:
    """Loads the page in headless Chromium with every network request watched; returns what it saw."""
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (apt-get install chromium) to open the report in")
    from playwright.sync_api import sync_playwright

    seen = {"errors": [], "failed": [], "requests": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": width, "height": 900})
        page.on("console", lambda m: m.type == "error" and seen["errors"].append(m.text))
        page.on("pageerror", lambda e: seen["errors"].append(str(e)))
        page.on("requestfailed", lambda r: seen["failed"].append(r.url))
        page.on("request", lambda r: seen["requests"].append(r.url))
        page.goto(html.as_uri(), wait_until="load")
        seen["rows"] = page.locator("table.trials tbody tr").count()
        seen["row_classes"] = page.eval_on_selector_all("table.trials tbody tr", "rs => rs.map(r => r.className)")
        seen["images"] = page.eval_on_selector_all(
            "img", "is => is.map(i => ({alt: i.alt, width: i.naturalWidth, src: i.src.slice(0, 22)}))")
        seen["text"] = page.inner_text("body")
        seen["geometry"] = page.evaluate(GEOMETRY)
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    return seen


def assert_self_contained(seen: dict):
    assert seen["errors"] == [] and seen["failed"] == []
    assert [u for u in seen["requests"] if not u.startswith(("data:", "file:"))] == []
    assert seen["images"]
    assert all(i["width"] > 0 and i["src"].startswith("data:image/png;base64") for i in seen["images"])


@pytest.mark.slow
def test_report_of_our_program_opens_offline_with_plots_and_prediction_images(ours_dir, tmp_path):
    path = write_report(ours_dir)
    assert path == ours_dir / "report.html"
    trials = states(ours_dir)
    seen = open_in_browser(path, tmp_path / "report.png")
    assert_self_contained(seen)
    assert seen["rows"] == len(trials) == 4
    assert sum("stopped" in c for c in seen["row_classes"]) == list(trials.values()).count("stopped")
    plots = {i["alt"] for i in seen["images"] if i["alt"] in PLOTS}
    finished = list(trials.values()).count("finished")
    assert plots == {"metric_over_trials", "parallel_coordinates", "learning_curves"} | \
        ({"importance"} if finished >= 3 else set())  # importance ranks 3 finished trials or more
    if finished < 3:
        assert f"Needs at least 3 finished trials with a val_acc; {finished} so far" in seen["text"]
    assert sorted(p.stem for p in (ours_dir / "report").glob("*.png")) == sorted(plots)
    examples = [i for i in seen["images"] if i["alt"].startswith("Pred: ")]
    shown = [parse_caption(i["alt"])[1] for i in examples]  # each class alike: 3 of each (fewer if val has fewer)
    assert set(shown) == set(CIFAR10_CLASSES) and max(map(shown.count, shown)) == 3
    if os.environ.get("REPORT_SCREENSHOT"):
        shutil.copy(tmp_path / "report.png", os.environ["REPORT_SCREENSHOT"])


@pytest.mark.slow
def test_report_of_a_foreign_sweep_marks_failures_and_has_no_images(foreign_dir, tmp_path, capsys):
    assert report(str(foreign_dir)) == 0
    assert capsys.readouterr().out.strip() == str(foreign_dir / "report.html")
    trials = states(foreign_dir)
    assert sorted(trials.values()) == ["failed", "failed", "finished", "finished", "finished", "finished"]
    seen = open_in_browser(foreign_dir / "report.html", tmp_path / "report.png")
    assert_self_contained(seen)
    assert seen["rows"] == 6 and [c.split()[0] for c in seen["row_classes"]].count("failed") == 2
    assert seen["row_classes"][0] == "finished best"
    assert "exit code 1" in seen["text"] and "No prediction images" in seen["text"]
    assert {i["alt"] for i in seen["images"]} == set(PLOTS)
    assert sorted(p.stem for p in (foreign_dir / "report").glob("*.png")) == sorted(PLOTS)
    html = (foreign_dir / "report.html").read_text()
    assert "<script" not in html and "<link" not in html and "url(" not in html
    assert {link[:5] for link in re.findall(r'(?:src|href)="([^"]*)"', html)} == {"data:"}
    for name in ("x", "opt"):  # both swept parameters in the importance table
        assert f"<tr><td>{name}</td>" in html
    # the failed trials logged a loss before failing: not a finished trial's, so not ranked
    assert "Ranks the 4 finished trials; 2 failed left out (ended part-way). Fewer than 10: the ranking is " \
           "noise-prone" in seen["text"]


@pytest.mark.slow
def test_stopped_and_running_trials_are_marked_and_metricless_ones_last(foreign_dir, tmp_path):
    copy = tmp_path / "D"
    shutil.copytree(foreign_dir, copy, ignore=shutil.ignore_patterns("wandb", "report*"))
    with sqlite3.connect(copy / "sweep.db") as db:
        db.execute("UPDATE trials SET state = 'running', metric = NULL, history = '[]' WHERE seq = 1")
        db.execute("UPDATE trials SET state = 'stopped', reason = 'early-terminated by hyperband' WHERE seq = 2")
    html = write_report(copy).read_text()
    rows = html.split("<tbody>")[1].split("</tbody>")[0].split("<tr")[1:]
    metrics = [float(re.search(r'<td class="metric">([^<]+)</td>', r)[1]) for r in rows[:-1]]
    assert metrics == sorted(metrics) and rows[-1].startswith(' class="running"')
    [stopped] = [r for r in rows if r.startswith(' class="stopped')]
    assert "early-terminated by hyperband" in stopped
    # its early loss is kept out of the importance ranking, and the page says so
    # its early loss is not ranked (with it, 3 trials would be), and the page says why
    assert ('<h2>Parameter importance</h2><p class="note">Needs at least 3 finished trials with a loss; 2 so far; '
            "1 stopped left out (stopped early: its last value is an early one, not comparable with a finished "
            "trial&#x27;s); 2 failed left out (ended part-way).</p>") in html

    trials = open_store(copy).trials()
    legend = [t.get_text() for t in learning_curves(trials, "loss", "minimize").axes[0].get_legend().get_texts()]
    assert "stopped (hyperband)" in legend and any(trials[1].id in label for label in legend)
    assert len(legend) == 5 + 1  # the top 5 (the stopped one among them) and the marker's entry


def test_a_wide_trial_table_scrolls_in_its_box_with_id_and_metric_pinned(tmp_path):
    names = ["lr", "weight_decay", "drop_path_rate", "label_smoothing", "batch_size", "optimizer", "warmup_epochs",
             "mixup_alpha", "cutmix_alpha", "random_erasing", "ema_decay", "gradient_clip_val"]
    store = Store(sqlite_url(tmp_path))
    store.join("wide", {"program": "train.py", "method": "random", "metric": {"name": "val_acc", "goal": "maximize"},
                        "parameters": {name: {"values": [0.0001, 0.25]} for name in names}})
    for i in range(6):
        store.add_trial(f"trial{i:03d}", {name: {"value": 0.0001 + i / 7} for name in names}, "c")
        store.update(f"trial{i:03d}", state="failed" if i == 0 else "finished", metric=0.5 + i / 20,
                     history=[0.1 * (i + epoch) for epoch in range(4)],
                     reason="exit code 1: torch.OutOfMemoryError: CUDA out of memory" if i == 0 else None)
    store.close()
    seen = open_in_browser(write_report(tmp_path), tmp_path / "report.png", width=1400)
    assert_self_contained(seen)
    geometry = seen["geometry"]
    assert geometry["pageWidth"] <= geometry["viewWidth"] == 1400  # the page never scrolls sideways
    assert geometry["boxContent"] > geometry["boxWidth"]  # the table does, in its box
    id_header, metric_header = geometry["pinned"]
    assert (id_header["name"], metric_header["name"]) == ("id", "val_acc")
    assert id_header["visible"] and metric_header["visible"], geometry
    assert id_header["right"] <= metric_header["left"] + 1, geometry  # side by side, neither over the other
    assert geometry["see_through"] == []


def trial(i: int, state: str, x: float, metric: float | None) -> Trial:
    return Trial(id=f"t{i}", params={"x": {"value": x}, "opt": {"value": "adam" if i % 2 else "sgd"}}, state=state,
                 metric=metric)


def test_importance_ranks_finished_trials_only_and_says_which():
    finished = [trial(i, "finished", x, 1.0 + x) for i, x in enumerate([0.1, 0.2, 0.3, 0.4, 0.5])]
    # hyperband stopped the high-x trials early, at a worse (higher) loss than they would have ended with
    cut_short = [trial(5, "stopped", 0.9, 0.0), trial(6, "stopped", 0.8, 0.2), trial(7, "running", 0.7, 9.0),
                 trial(8, "pending", 0.6, None)]
    result = importance(finished + cut_short, "loss", ["x", "opt"])
    assert result.ranked == 5
    assert dict((p, r) for p, _, r in result.rows)["x"] == pytest.approx(1.0)  # as the finished trials have it
    assert result.note == ("Ranks the 5 finished trials; 2 stopped left out (stopped early: its last value is an "
                           "early one, not comparable with a finished trial's); 1 running left out (not done). "
                           "Fewer than 10: the ranking is noise-prone (one more trial can reorder it), a hint, "
                           "not a finding.")
    assert importance_chart(result, "loss").get_suptitle() == "over 5 finished trials (few: noise-prone)"


def test_importance_of_enough_trials_has_no_warning_and_of_too_few_says_why():
    many = [trial(i, "finished", i / 10, i / 10) for i in range(10)]
    result = importance(many, "loss", ["x", "opt"])
    assert result.note == "Ranks the 10 finished trials." and len(result.rows) == 2
    assert importance_chart(result, "loss").get_suptitle() == "over 10 finished trials"

    few = many[:2] + [trial(i, "stopped", 0.5, 0.5) for i in range(10, 14)]
    result = importance(few, "loss", ["x", "opt"])
    assert result.rows == [] and result.note.startswith(
        "Needs at least 3 finished trials with a loss; 2 so far; 4 stopped left out (stopped early")


@pytest.mark.slow
def test_a_sweep_with_no_trials_yet_gets_placeholders(foreign_dir, tmp_path):
    copy = tmp_path / "D"
    copy.mkdir()
    shutil.copy(foreign_dir / "sweep.db", copy / "sweep.db")
    with sqlite3.connect(copy / "sweep.db") as db:
        db.execute("DELETE FROM trials")
    html = write_report(copy).read_text()
    assert "No trial has logged loss yet" in html and "no trials yet" in html and "<img" not in html
    assert list((copy / "report").glob("*.png")) == []


def test_wandb_sweep_prints_runs_best_first_and_the_dashboard(fake_wandb, capsys):
    fake_wandb.sweep_config = yaml.safe_dump({"method": "bayes", "metric": {"name": "val_acc", "goal": "maximize"},
                                              "parameters": {"lr": {"min": 0.0001, "max": 0.1},
                                                             "epochs": {"value": 3}}})
    fake_wandb.runs = [{"name": i, "state": s, "summaryMetrics": json.dumps({"val_acc": m, "_runtime": 61.0}),
                        "config": json.dumps({"lr": {"value": lr}, "epochs": {"value": 3}})}
                       for i, s, m, lr in [("aaa", "finished", 0.5, 0.01), ("bbb", "killed", 0.7, 0.001),
                                           ("ccc", "running", None, 0.1), ("ddd", "finished", 0.9, 0.003)]]
    fake_wandb.runs.append({"name": "eee", "state": "finished", "config": json.dumps({"lr": {"value": 0.09}}),
                            "summaryMetrics": json.dumps({"ended_by": "diverged", "diverged_at_step": 7})})
    assert report("me/cifar/abc123") == 0
    assert fake_wandb.ops() == ["Viewer", "GetSweep", "Runs"]  # the runs' summaries came with the list
    runs = next(v for op, v in fake_wandb.calls if op == "Runs")
    assert (runs["entity"], runs["project"], json.loads(runs["filters"])) == ("me", "cifar",
                                                                                {"$and": [{"sweep": "abc123"}]})
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines()]
    assert [w[0] for w in lines if w and w[0] in ("aaa", "bbb", "ccc", "ddd", "eee")] == \
        ["ddd", "bbb", "aaa", "ccc", "eee"]
    assert next(" ".join(w) for w in lines if w and w[0] == "eee").endswith("diverged at step 7")
    assert ["ddd", "finished", "0.9", "61s", "0.003"] in lines and ["bbb", "stopped", "0.7", "61s", "0.001"] in lines
    assert "/me/cifar/sweeps/abc123" in out and "best val_acc 0.9 (ddd: lr=0.003)" in out


def test_unknown_target_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no local sweep here"):
        report(str(tmp_path))  # a folder, but no sweep.db
    with pytest.raises(UsageError, match="ENTITY/PROJECT/SWEEP_ID"):
        report("just-a-name")
