"""Sweeps with several objectives: the Pareto front itself, `status` and its --json, the report opened in a real
browser, and `best` taking any point of the front: stores built here, W&B's API mocked, and one real sweep of our
program on synthetic data with val_acc and latency_ms as its objectives."""

import json
import math
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from agent.__main__ import main
from agent.contract import COSTS
from agent.controller.store import Store, Trial, open_store, sqlite_url
from agent.errors import UsageError
from agent.program.use import best
from agent.views.pareto import Constraint, left_out, pareto_front, parse_where
from agent.views.report import write_report
from agent.views.trials import run_trial
from cifar_core.checkpoints import save_network
from cifar_core.config import TrainConfig
from cifar_core.model import create_model
from tests.helpers import QUICK_VAL, agent_command, fresh_env
from tests.test_report import assert_self_contained, open_in_browser

TWO = [("val_acc", "maximize"), ("latency_ms", "minimize")]


def trial(trial_id: str, state: str = "finished", acc: float | None = None, latency: float | None = None,
          **summary) -> Trial:
    values = {"val_acc": acc, "latency_ms": latency, **summary}
    return Trial(id=trial_id, params={}, state=state, metric=acc,
                 summary={k: v for k, v in values.items() if v is not None})


def test_the_front_is_the_non_dominated_trials_each_goal_its_own_way_ties_all_on_it():
    trials = [trial("a", acc=0.9, latency=3.0), trial("b", acc=0.8, latency=1.0), trial("c", acc=0.7, latency=0.5),
              trial("d", acc=0.8, latency=2.0),  # b is as accurate and faster
              trial("e", acc=0.8, latency=1.0),  # b's twin: both on the front
              trial("f", acc=0.6, latency=0.5),  # as fast as c, less accurate: beaten on one objective only
              trial("g", acc=0.9, latency=3.5)]  # as accurate as a, slower
    front = pareto_front(trials, TWO)
    assert [t.id for t in front.trials] == ["a", "b", "e", "c"]  # best val_acc first
    assert front.excluded == {}
    # the goals decide: with both minimized, f is the lowest of each and beats every other trial
    assert [t.id for t in pareto_front(trials, [("val_acc", "minimize"), ("latency_ms", "minimize")]).trials] == ["f"]
    # a third objective can put a beaten trial back on the front; the trials without it are left out
    trials[3].summary["params"] = 10
    three = pareto_front(trials, [*TWO, ("params", "minimize")])
    assert [t.id for t in three.trials] == ["d"] and set(three.excluded.values()) == {"no params logged"}


def test_only_finished_trials_with_every_objective_are_considered_and_each_other_says_why():
    stopped_on_wandb = SimpleNamespace(id="w", state="finished", config={"lr": 0.1},
                                       summary={"val_acc": 0.99, "latency_ms": 0.1, "ended_by": "stop"})
    trials = [trial("ok", acc=0.5, latency=2.0), trial("f", "failed"), trial("s", "stopped", acc=0.9, latency=0.1),
              trial("r", "running", acc=0.95, latency=0.2), trial("foreign", acc=0.99),
              trial("nolat", latency=0.1), trial("nan", acc=0.99, latency=math.nan),
              Trial(id="old", params={}, state="finished", metric=0.99),  # a store older than summaries
              run_trial(stopped_on_wandb, "val_acc")]
    front = pareto_front(trials, TWO)
    assert [t.id for t in front.trials] == ["ok"]
    assert front.excluded == {"f": "failed", "s": "stopped early", "r": "running", "foreign": "no latency_ms logged",
                              "nolat": "no val_acc logged", "nan": "latency_ms is nan",
                              "old": "no latency_ms logged", "w": "stopped early"}
    assert left_out(front) == ("left out of the front: failed: f; stopped early: s, w; running: r; no latency_ms "
                               "logged: foreign, old; no val_acc logged: nolat; latency_ms is nan: nan")


@pytest.mark.parametrize("text, expected", [("latency_ms < 2", ("latency_ms", "<", 2.0)),
                                            ("latency_ms<=2.5", ("latency_ms", "<=", 2.5)),
                                            (" params >= 1e6 ", ("params", ">=", 1e6)),
                                            ("val_acc > .5", ("val_acc", ">", 0.5)),
                                            ("flops<-3", ("flops", "<", -3.0))])
def test_where_reads_name_op_number(text, expected):
    assert parse_where(text, TWO) == Constraint(*expected)


@pytest.mark.parametrize("text, said", [
    ("latency_ms = 2", "expected NAME OP NUMBER, e.g. 'latency_ms < 2' (OP one of <, <=, >, >=; NAME one of "
                       "val_acc, latency_ms, params, flops, latency_ms_batch)"),
    ("latency_ms < two", "expected NAME OP NUMBER"), ("latency_ms < nan", "expected NAME OP NUMBER"),
    ("2 > latency_ms", "expected NAME OP NUMBER"), ("latency_ms < 2 and params < 3", "expected NAME OP NUMBER"),
    ("", "expected NAME OP NUMBER"),
    ("latency < 2", "'latency' is not one of the sweep's objectives or costs; did you mean 'latency_ms'"),
    ("test_acc > 0.5", "'test_acc' is not one of the sweep's objectives or costs")])
def test_a_bad_where_is_one_line_saying_what_was_expected_exit_2(tmp_path, capsys, text, said):
    hand_sweep(tmp_path, TWO_SWEEP)
    assert main(["best", str(tmp_path), "--where", text]) == 2
    out = capsys.readouterr()
    assert out.err.startswith(f"agent best: --where {text!r}: {said}") and out.err.count("\n") == 1
    assert out.out == "" and "Traceback" not in out.err


# stores built by hand: a1, b2, e5 (b2's twin) and c3 on the front; d4 and g9 beaten; s6, f7 and x8 left out

TWO_SWEEP = {"method": "custom", "scheduler": {"engine": "optuna"},
             "metrics": [{"name": "val_acc", "goal": "maximize"}, {"name": "latency_ms", "goal": "minimize"}],
             "parameters": {"width": {"values": [8, 16, 32, 64]}, "lr": {"value": 0.01}}}
ROWS = [("a1", "finished", 0.91, 3.1, 64), ("b2", "finished", 0.85, 1.2, 32), ("c3", "finished", 0.70, 0.82, 16),
        ("d4", "finished", 0.80, 2.0, 32), ("e5", "finished", 0.85, 1.2, 32), ("s6", "stopped", 0.5, 0.3, 8),
        ("f7", "failed", None, None, 8), ("x8", "finished", 0.95, None, 64), ("g9", "finished", 0.6, 2.5, 16)]
FRONT = ["a1", "b2", "e5", "c3"]
LEFT_OUT = "left out of the front: stopped early: s6; failed: f7; no latency_ms logged: x8"


def hand_sweep(folder: Path, sweep: dict) -> Path:
    store = Store(sqlite_url(folder))
    store.join("s1", sweep)
    for trial_id, state, acc, latency, width in ROWS:
        store.add_trial(trial_id, {"width": {"value": width}, "lr": {"value": 0.01}}, "c")
        summary = {"val_acc": acc, "latency_ms": latency, "params": width * 10_000, "flops": width * 10**6}
        store.update(trial_id, state=state, metric=acc, history=[acc] if acc else [], started=1.0, ended=5.0,
                     summary={k: v for k, v in summary.items() if v is not None},
                     reason="exit code 1: RuntimeError: CUDA out of memory" if state == "failed" else None)
    store.close()
    return folder


def status_lines(folder: Path, capsys, monkeypatch, columns: int | None = None) -> list[str]:
    if columns:
        monkeypatch.setenv("COLUMNS", str(columns))
    assert main(["status", str(folder)]) == 0
    return capsys.readouterr().out.splitlines()


def test_status_has_a_column_per_objective_marks_the_front_and_names_it(tmp_path, capsys, monkeypatch):
    _, header, *rows = status_lines(hand_sweep(tmp_path, TWO_SWEEP), capsys, monkeypatch)
    assert header.split() == ["id", "state", "front", "val_acc", "latency_ms", "params", "time", "width", "reason"]
    table = {r.split()[0]: r.split() for r in rows[:len(ROWS)]}
    assert table["a1"] == ["a1", "finished", "*", "0.91", "3.1", "640k", "4s", "64"]
    assert table["d4"] == ["d4", "finished", "0.8", "2", "320k", "4s", "32"]
    assert [i for i, r in table.items() if "*" in r] == ["a1", "b2", "c3", "e5"]
    assert rows[len(ROWS):] == ["7 finished, 1 failed, 1 stopped | Pareto front (val_acc max, latency_ms min): "
                                "4 trials: a1, b2, e5, c3", LEFT_OUT]


@pytest.mark.parametrize("columns, dropped", [
    (80, ["time"]), (70, ["time", "params"]), (64, ["time", "params", "width"]),
    (50, ["time", "params", "width", "reason"]), (40, ["time", "params", "width", "reason", "latency_ms"])])
def test_a_narrow_status_drops_costs_then_parameters_then_objectives_never_the_front(tmp_path, capsys, monkeypatch,
                                                                                   columns, dropped):
    lines = status_lines(hand_sweep(tmp_path, TWO_SWEEP), capsys, monkeypatch, columns)
    assert all(len(line) <= columns for line in lines)
    shown = [c for c in ["id", "state", "front", "val_acc", "latency_ms", "params", "time", "width", "reason"]
             if c not in dropped]
    assert next(line.split() for line in lines if line.split()[:1] == ["id"]) == shown
    said = " ".join(" ".join(lines).split())
    assert f"left out to fit {columns} columns: {', '.join(dropped)}; widen the terminal or use --json" in said


def test_status_json_has_objectives_the_front_why_not_and_costs(tmp_path, capsys):
    hand_sweep(tmp_path, TWO_SWEEP)
    assert main(["status", str(tmp_path), "--json"]) == 0
    trials = {t["id"]: t for t in json.loads(capsys.readouterr().out)}
    assert [i for i, t in trials.items() if t["pareto"]] == ["a1", "b2", "c3", "e5"]
    assert {i: t["pareto_excluded"] for i, t in trials.items() if "pareto_excluded" in t} == \
        {"s6": "stopped early", "f7": "failed", "x8": "no latency_ms logged"}
    assert trials["d4"]["objectives"] == {"val_acc": 0.8, "latency_ms": 2.0} and not trials["d4"]["pareto"]
    assert trials["x8"]["objectives"] == {"val_acc": 0.95, "latency_ms": None}
    assert trials["a1"]["costs"] == {"params": 640_000, "flops": 64 * 10**6, "latency_ms": 3.1}


def test_a_single_objective_sweep_shows_the_costs_its_trials_logged_and_no_front(tmp_path, capsys, monkeypatch):
    hand_sweep(tmp_path, {**{k: v for k, v in TWO_SWEEP.items() if k not in ("metrics", "scheduler")},
                          "method": "random", "metric": {"name": "val_acc", "goal": "maximize"}})
    lines = status_lines(tmp_path, capsys, monkeypatch)
    assert lines[1].split() == ["id", "state", "val_acc", "latency_ms", "params", "time", "width", "reason"]
    assert lines[-1] == "7 finished, 1 failed, 1 stopped | best val_acc 0.95 (x8: width=64)"
    narrow = status_lines(tmp_path, capsys, monkeypatch, 56)
    assert next(line.split() for line in narrow if line.split()[:1] == ["id"]) == \
        ["id", "state", "val_acc", "width", "reason"]  # the costs went before the parameters
    assert main(["status", str(tmp_path), "--json"]) == 0
    trials = json.loads(capsys.readouterr().out)
    assert trials[0]["costs"] == {"params": 640_000, "flops": 64 * 10**6, "latency_ms": 3.1}
    assert not {"objectives", "pareto", "pareto_excluded"} & set(trials[0])
    assert "Pareto" not in write_report(tmp_path).read_text() and not (tmp_path / "report" / "pareto.png").exists()
    # --where picks among the trials `best` ranks (finished or stopped, with a val_acc): c3, which has no model here
    assert main(["best", str(tmp_path), "--where", "latency_ms < 1"]) == 2
    assert capsys.readouterr().err.startswith("agent best: trial c3: no best model")
    assert main(["best", str(tmp_path), "--where", "latency_ms < 0.1"]) == 2
    assert capsys.readouterr().err == ("agent best: no finished or stopped trial with a val_acc has latency_ms < 0.1 "
                                       "(their latency_ms: 0.3 to 3.1)\n")


def front_table(text: str) -> list[list[str]]:
    """The rows of the report's front table, as the browser renders the page's text (cells tab-separated)."""
    section = text.split("\nPareto front\n", 1)[1].split("\nMetric over trials\n", 1)[0]
    return [line.split("\t") for line in section.splitlines() if "\t" in line][1:]


@pytest.mark.parametrize("objectives", [TWO, [*TWO, ("params", "minimize")]])
def test_the_report_draws_the_front_lists_it_and_marks_it_in_the_trial_table(tmp_path, objectives):
    sweep = {**TWO_SWEEP, "metrics": [{"name": n, "goal": g} for n, g in objectives]}
    seen = open_in_browser(write_report(hand_sweep(tmp_path, sweep)), tmp_path / "report.png")
    assert_self_contained(seen)
    [plot] = [i for i in seen["images"] if i["alt"] == "pareto"]  # two: one against the other; three: coordinates
    assert plot["width"] > 0 and (tmp_path / "report" / "pareto.png").is_file()
    rows = front_table(seen["text"])
    assert [r[0] for r in rows] == FRONT  # best val_acc first
    assert rows[0] == ["a1", "0.91", "3.1", *(["640k"] if len(objectives) == 3 else []), "64"]
    assert LEFT_OUT in seen["text"]
    marked = [c for c in seen["row_classes"] if "front" in c.split()]
    assert seen["row_classes"][:len(FRONT)] == marked and len(marked) == 4  # the front first in the trial table
    assert seen["text"].count("★") == 4


# best: W&B's API mocked, a network saved here as a run's model artifact

@pytest.fixture
def wandb_sweep(mocker, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)  # `best` checks that there is one before it asks W&B
    config = TrainConfig(dataset="synthetic", model="resnet9", width=4)
    save_network(tmp_path / "model.ckpt", config, 10, create_model(config, 10, pretrained=False).state_dict())
    api = mocker.patch("wandb.Api").return_value
    api.sweep.return_value.config = TWO_SWEEP
    api.runs.return_value = [SimpleNamespace(id=i, state=state, config={"width": width, "lr": 0.01},
                                             summary={k: v for k, v in {"val_acc": acc, "latency_ms": lat,
                                                                         "test_acc": 0.5}.items() if v is not None})
                             for i, state, acc, lat, width in ROWS if state != "stopped"]
    api.runs.return_value.append(SimpleNamespace(id="s6", state="finished", config={"width": 8},
                                                 summary={"val_acc": 0.5, "latency_ms": 0.3, "ended_by": "stop"}))
    api.artifact.return_value.download.return_value = str(tmp_path)
    return api


def test_best_of_a_wandb_sweep_lists_the_front_from_the_runs_and_downloads_the_pick(wandb_sweep, capsys):
    assert best("ent/proj/swp") == 0
    wandb_sweep.runs.assert_called_once_with("ent/proj", filters={"$and": [{"sweep": "swp"}]}, lazy=False)
    wandb_sweep.artifact.assert_called_once_with("ent/proj/model-a1:best")
    out = capsys.readouterr().out.splitlines()
    assert out[:6] == ["Pareto front (val_acc max, latency_ms min): 4 trials: a1, b2, e5, c3, best val_acc first",
                       "  a1  val_acc=0.91  latency_ms=3.1   width=64", "  b2  val_acc=0.85  latency_ms=1.2   width=32",
                       "  e5  val_acc=0.85  latency_ms=1.2   width=32", "  c3  val_acc=0.7   latency_ms=0.82  width=16",
                       "left out of the front: failed: f7; no latency_ms logged: x8; stopped early: s6"]
    assert out[6] == ("best: run a1 of sweep ent/proj/swp, finished, val_acc=0.91 (maximize), latency_ms=3.1 "
                      "(minimize); the front's best val_acc")
    assert out[7].startswith("config: python -m agent run ") and "--width=4" in out[7]


def test_best_of_a_wandb_sweep_takes_a_trial_by_id_or_by_constraints(wandb_sweep, capsys):
    assert best("ent/proj/swp", trial_id="d4") == 0
    assert "picked: run d4 of sweep ent/proj/swp, finished, val_acc=0.8 (maximize)" in capsys.readouterr().out
    assert best("ent/proj/swp", where=["latency_ms < 2", "val_acc > 0.8"]) == 0
    assert ("best: run b2 of sweep ent/proj/swp, finished, val_acc=0.85 (maximize), latency_ms=1.2 (minimize); the "
            "front's best val_acc with latency_ms < 2 and val_acc > 0.8") in capsys.readouterr().out
    assert [c.args for c in wandb_sweep.artifact.call_args_list] == [("ent/proj/model-d4:best",),
                                                                     ("ent/proj/model-b2:best",)]
    with pytest.raises(UsageError) as e:
        best("ent/proj/swp", where=["latency_ms < 0.5"])
    assert str(e.value) == "no trial on the front has latency_ms < 0.5 (the front's latency_ms: 0.82 to 3.1)"
    with pytest.raises(UsageError) as e:
        best("ent/proj/swp", where=["latency_ms < 1", "val_acc > 0.8"])
    assert str(e.value) == ("no trial on the front meets latency_ms < 1 and val_acc > 0.8 together (the front's "
                            "latency_ms: 0.82 to 3.1; the front's val_acc: 0.7 to 0.91)")
    with pytest.raises(UsageError, match=r"^--trial zz: no such trial in ent/proj/swp \(its trials: a1, b2, "):
        best("ent/proj/swp", trial_id="zz")


# best on a real sweep of our program: each trial logs its costs, and its model

STUDY = """import optuna


def grid(sweep):
    # Each width once, in a fixed order: a grid, as a sweep with two objectives needs a scheduler.
    return optuna.create_study(directions=["maximize", "minimize"],
                               sampler=optuna.samplers.GridSampler({"width": [4, 8, 16]}, seed=0))
"""
REAL_SWEEP = {"method": "custom", "scheduler": {"engine": "optuna", "source": "grid.py", "optimizer": "grid"},
              "metrics": [{"name": "val_acc", "goal": "maximize"}, {"name": "latency_ms", "goal": "minimize"}],
              "parameters": {"model": {"value": "resnet9"}, "width": {"values": [4, 8, 16]},
                             "dataset": {"value": "synthetic"}, "val_fraction": {"value": QUICK_VAL},
                             "max_epochs": {"value": 1}, "limit_train_batches": {"value": 4}},
              "command": ["${env}", "${interpreter}", "-m", "agent", "run", "${args}"]}
REAL = pytest.mark.xdist_group("pareto-sweep")  # one test process runs the sweep, once


def brute_front(trials: list[Trial]) -> list[str]:
    """The front by the definition, every pair compared, best val_acc first (then lowest latency_ms)."""
    points = {t.id: (t.summary["val_acc"], t.summary["latency_ms"]) for t in trials}
    on = [i for i, (a, lat) in points.items()
          if not any(a2 >= a and l2 <= lat and (a2, l2) != (a, lat) for a2, l2 in points.values())]
    return sorted(on, key=lambda i: (-points[i][0], points[i][1]))


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> SimpleNamespace:
    """`agent local` of our program: 3 trials of resnet9, widths 4, 8 and 16 (so latencies differ), 4 batches of
    synthetic data each; its folder, environment, trials and front."""
    root = tmp_path_factory.mktemp("pareto-sweep")
    (root / "grid.py").write_text(STUDY)
    (root / "sweep.yaml").write_text(yaml.safe_dump(REAL_SWEEP))
    env = fresh_env(root)
    out = subprocess.run(agent_command("local", "sweep.yaml", "--dir", "D"), cwd=root, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    trials = open_store(root / "D").trials()
    assert [t.state for t in trials] == ["finished"] * 3, [(t.id, t.state, t.reason) for t in trials]
    assert all(set(COSTS) <= set(t.summary) for t in trials), [t.summary for t in trials]
    return SimpleNamespace(dir=root / "D", env=env, trials={t.id: t for t in trials}, front=brute_front(trials))


def said(capsys, target, *args, **kwargs) -> dict:
    """What best printed: its lines, and those of the form `key: value` by key."""
    assert best(str(target), *args, **kwargs) == 0
    lines = capsys.readouterr().out.splitlines()
    return {"lines": lines, **dict(line.split(": ", 1) for line in lines
                                   if line.split(":")[0] in ("best", "picked", "config", "checkpoint", "test_acc",
                                                             "exported"))}


@pytest.mark.slow
@REAL
def test_status_of_a_real_sweep_has_every_cost_and_the_front(real, capsys):
    assert main(["status", str(real.dir), "--json"]) == 0
    trials = {t["id"]: t for t in json.loads(capsys.readouterr().out)}
    assert [i for i, t in trials.items() if t["pareto"]] == [i for i in trials if i in real.front]
    assert all(set(t["costs"]) == set(COSTS) and t["objectives"]["latency_ms"] == t["costs"]["latency_ms"]
               for t in trials.values())
    widths = sorted(trials.values(), key=lambda t: t["config"]["width"])
    assert widths[0]["costs"]["params"] < widths[1]["costs"]["params"] < widths[2]["costs"]["params"]


@pytest.mark.slow
@REAL
def test_best_lists_the_real_front_takes_its_best_and_evaluates_it(real, capsys):
    out = said(capsys, real.dir, evaluate=True)
    listed = out["lines"][1:1 + len(real.front)]
    assert [line.split()[0] for line in listed] == real.front
    pick = real.trials[real.front[0]]
    assert out["best"].startswith(f"trial {pick.id} of sweep ") and "the front's best val_acc" in out["best"]
    assert f"--width={pick.config['width']}" in out["config"] and pick.id in out["checkpoint"]
    logged = f"{pick.summary['test_acc']:.4f}"
    assert out["test_acc"].startswith(f"{logged} (logged by the trial: {logged})")


@pytest.mark.slow
@REAL
def test_best_where_takes_the_fastest_on_the_front_and_exports_it(real, capsys, tmp_path):
    fastest = min(real.front, key=lambda i: real.trials[i].summary["latency_ms"])
    bound = real.trials[fastest].summary["latency_ms"]
    out = said(capsys, real.dir, export=str(tmp_path / "pick.pt2"),
               where=[f"latency_ms <= {bound!r}", f"params <= {real.trials[fastest].summary['params']}"])
    assert out["best"].startswith(f"trial {fastest} of sweep ") and f"with latency_ms <= {bound:g}" in out["best"]
    extra = {"trial.json": ""}
    model = torch.export.load(tmp_path / "pick.pt2", extra_files=extra).module()
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert json.loads(extra["trial.json"])["latency_ms"] == bound and json.loads(extra["trial.json"])["id"] == fastest


@pytest.mark.slow
@REAL
def test_best_trial_takes_any_trial_with_a_model_off_the_front_too(real, capsys):
    other = next((i for i in real.trials if i not in real.front), real.front[-1])
    out = said(capsys, real.dir, trial_id=other, evaluate=True)
    assert out["picked"].startswith(f"trial {other} of sweep ") and other in out["checkpoint"]
    assert f"--width={real.trials[other].config['width']}" in out["config"]
    assert out["test_acc"].startswith(f"{real.trials[other].summary['test_acc']:.4f}")


@pytest.mark.slow
@REAL
def test_a_constraint_no_trial_on_the_real_front_meets_is_one_line_exit_2(real):
    latencies = sorted(real.trials[i].summary["latency_ms"] for i in real.front)
    out = subprocess.run(agent_command("best", str(real.dir), "--where", f"latency_ms < {latencies[0] / 2}"),
                         env=real.env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    span = f"{latencies[0]:.4g}" + (f" to {latencies[-1]:.4g}" if latencies[-1] != latencies[0] else "")
    assert out.stderr == (f"agent best: no trial on the front has latency_ms < {latencies[0] / 2:g} "
                          f"(the front's latency_ms: {span})\n")
