"""W&B's scheduler sweeps (`scheduler: {engine: optuna | ax | wandb}`) offline: W&B's own optimizer asked and told by
`agent local`, its pruner's decisions as stops, a resume after kill -9, two controllers on one sweep, and every
mistake refused before any trial."""

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agent.controller.store import open_store
from agent.errors import UsageError
from agent.program.validate import validate
from tests.helpers import PROGRAMS, REPO, agent_command, fresh_env, model_artifacts, run_record, wait_for

OURS = ["${env}", "${interpreter}", "-m", "agent", "run", "${args}"]
STUDY = '''
import optuna


def make_study(sweep):
    return optuna.create_study(direction=sweep.config["metric"]["goal"], sampler=optuna.samplers.TPESampler(seed=0),
                               pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2))


def minimizing(sweep):
    return optuna.create_study(direction="minimize")


def takes_nothing():
    return None


def two_good_then_hopeless(trial):
    """Define-by-run: the third trial can only do worse than the two before it; what it returns is the config."""
    return {"lr": [3.0e-3, 1.0e-3, 1.0e-7][trial.number % 3], "dataset": "synthetic", "val_fraction": 0.02,
            "max_epochs": 6, "limit_train_batches": 12, "early_stopping_patience": 6}
'''


def write(folder: Path, sweep: dict, study: str = STUDY) -> Path:
    (folder / "study.py").write_text(study)
    (folder / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    return folder / "sweep.yaml"


def foreign(folder: Path, engine: str = "optuna", **changes) -> Path:
    """A scheduler sweep of a plain W&B program (tests/programs/foreign_train.py: `loss` from x)."""
    shutil.copy(PROGRAMS / "foreign_train.py", folder / "foreign_train.py")
    sweep = {"program": "foreign_train.py", "method": "custom" if engine != "wandb" else "random",
             "metric": {"name": "loss", "goal": "minimize"}, "parameters": {"x": {"min": 0.0, "max": 1.0}},
             "scheduler": {"engine": engine}, **changes}
    return write(folder, sweep)


def local(sweep: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(agent_command("local", sweep.name, *args), cwd=sweep.parent, capture_output=True,
                          text=True, timeout=240, env=fresh_env(sweep.parent, **env))


@pytest.mark.slow
def test_optunas_pruner_stops_the_hopeless_trial_which_tests_and_logs_its_best_model(tmp_path):
    sweep = write(tmp_path, {
        "method": "custom", "metric": {"name": "val_acc", "goal": "maximize"}, "command": OURS,
        "scheduler": {"engine": "optuna", "source": "study.py", "optimizer": "make_study",
                      "search_space": "two_good_then_hopeless"}, "run_cap": 3})
    out = local(sweep, "--workers", "2")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("scheduling the sweep: W&B's optuna optimizer") == 1
    [directory] = (tmp_path / "sweeps-local").iterdir()
    trials = open_store(directory).trials()
    assert sorted(t.config["lr"] for t in trials) == [1.0e-7, 1.0e-3, 3.0e-3]  # the define-by-run space's
    [hopeless] = [t for t in trials if t.config["lr"] == 1.0e-7]
    assert (hopeless.state, hopeless.reason) == ("stopped", "pruned by Optuna's SuccessiveHalvingPruner")
    # The two good ones start together: at the first rung the later of them competes with the earlier, and
    # outside the best half it is pruned too (asynchronous successive halving); the leader trains on.
    assert "finished" in {t.state for t in trials if t is not hopeless}
    assert all(row["_step"] == i for i, row in enumerate(trials[0].rows, 1))  # W&B's _step: epochs trained
    records, _ = run_record(directory, hopeless.id)
    final = model_artifacts(records)[-1]
    assert "best" in final["aliases"] and "test_acc" in json.loads(final["metadata"])  # tested, then logged


@pytest.mark.slow
def test_kill_9_then_the_same_command_goes_on_with_the_study_and_repeats_nothing(tmp_path):
    sweep = foreign(tmp_path, run_cap=6)
    controller = subprocess.Popen(agent_command("local", sweep.name, "--workers", "2"), cwd=tmp_path,
                                  env=fresh_env(tmp_path, SLEEP="0.3"), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)

    def two_finished() -> bool:
        try:
            [directory] = (tmp_path / "sweeps-local").iterdir()
            return sum(t.state == "finished" for t in open_store(directory).trials()) >= 2
        except (ValueError, FileNotFoundError, UsageError):  # no sweep folder or store yet
            return False

    wait_for(two_finished, "two finished trials", proc=controller)
    controller.send_signal(signal.SIGKILL)
    controller.wait()
    [directory] = (tmp_path / "sweeps-local").iterdir()
    before = {t.id: t for t in open_store(directory).trials()}
    again = local(sweep, "--workers", "2", "--retry-crashed")
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.startswith(f"resuming sweep {directory.name}")
    trials = open_store(directory).trials()
    assert len(trials) == len({t.id for t in trials}) == 6 and all(t.state == "finished" for t in trials)
    assert all(before[t.id].config == t.config for t in trials if t.id in before)  # kept, not redrawn
    assert len({t.config["x"] for t in trials}) == 6  # the study knew the earlier trials: no point twice


@pytest.mark.slow
def test_two_controllers_on_one_sweep_run_one_optimizer_and_the_exact_count(tmp_path):
    sweep = foreign(tmp_path, run_cap=6)
    command = agent_command("local", sweep.name, "--dir", "D")
    env = fresh_env(tmp_path, SLEEP="0.2")
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    wait_for(lambda: (tmp_path / "D" / "sweep.db").exists(), "the first controller's store", proc=first)
    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    first_out = first.communicate(timeout=240)[0]
    assert first.returncode == 0 and second.returncode == 0, first_out + second.stdout + second.stderr
    trials = open_store(tmp_path / "D").trials()
    assert len(trials) == len({t.id for t in trials}) == 6 and all(t.state == "finished" for t in trials)
    # One optimizer at a time (the store's lease): the first controller's; the second ran what it queued ahead.
    assert first_out.count("scheduling the sweep") == 1 and "started:" in second.stdout


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["wandb", "ax"])
def test_the_other_engines_run_offline(tmp_path, engine):
    out = local(foreign(tmp_path, engine, run_cap=4), "--workers", "2")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    [directory] = (tmp_path / "sweeps-local").iterdir()
    trials = open_store(directory).trials()
    assert [t.state for t in trials] == ["finished"] * 4 and len({t.config["x"] for t in trials}) == 4


@pytest.mark.parametrize("scheduler, changes, expected", [
    ({"source": "missing.py", "optimizer": "make_study"}, {}, "scheduler.source: missing.py: no such file here"),
    ({"source": "study.py", "optimizer": "no_such"}, {}, "scheduler: study.py has no attribute 'no_such'"),
    ({"source": "study.py", "optimizer": "takes_nothing"}, {},
     "scheduler: 'takes_nothing' in study.py cannot be called with one SweepInfo argument."),
    ({"source": "study.py", "optimizer": "minimizing"}, {},
     "scheduler: Study direction 'minimize' does not match the sweep metric goal 'maximize'"),
    ({}, {"early_terminate": {"type": "hyperband", "min_iter": 1}},
     "`early_terminate` cannot be used together with `scheduler`"),
    ({}, {"metric": {"name": "val_accuracy", "goal": "maximize"}}, "metric.name='val_accuracy': not a key the program"),
])
def test_validate_refuses_each_mistake_in_one_line_before_any_trial(tmp_path, capsys, monkeypatch, scheduler, changes,
                                                                   expected):
    monkeypatch.chdir(tmp_path)  # a relative source is relative to where the command runs, as W&B resolves it
    sweep = {"method": "custom", "metric": {"name": "val_acc", "goal": "maximize"}, "command": OURS,
             "parameters": {"lr": {"min": 1.0e-4, "max": 1.0e-2}},
             "scheduler": {"engine": "optuna", **scheduler}, **changes}
    assert validate([str(write(tmp_path, sweep))]) == 1
    [line] = capsys.readouterr().out.splitlines()
    assert line.startswith(f"{tmp_path / 'sweep.yaml'}: ") and expected in line, line


def test_a_missing_engine_is_refused_naming_the_extra_that_installs_it(tmp_path, capsys, mocker):
    real = __import__("importlib.util").util.find_spec
    mocker.patch("importlib.util.find_spec", lambda name, *a: None if name == "ax" else real(name, *a))
    assert validate([str(foreign(tmp_path, "ax"))]) == 1
    assert capsys.readouterr().out.rstrip().endswith(
        "scheduler.engine: ax needs the ax package, which is not installed here; fix: pip install 'cifar-sweeps[ax]'")


def test_the_shipped_scheduler_sweeps_validate(capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # their source is relative to the repository, where the README runs them
    files = sorted(str(p) for p in (REPO / "sweeps").glob("*.yaml") if "scheduler" in p.read_text())
    assert files and validate(files) == 0, capsys.readouterr().out


# On W&B: `create` prints where the scheduler runs; `launch --scheduler` runs W&B's own `wandb sweep-scheduler` once
# beside its agents (here a stand-in that records how it was started), ending it with them. W&B's scheduler itself
# talks to W&B's server through wandb-core, which no test here can stand in for.
RECORDER = """\
import json, os, signal, sys, threading
from pathlib import Path
stopped = threading.Event()
signal.signal(signal.SIGINT, lambda *a: stopped.set())
Path(sys.argv[1]).write_text(json.dumps({"argv": sys.argv[2:], "cwd": os.getcwd()}))
print("Agent Starting Run: r1 with config:", flush=True) if sys.argv[2] == "agent" else stopped.wait(60)
Path(sys.argv[1] + ".ended").write_text("SIGINT" if stopped.is_set() else "exit")
"""


def test_create_says_which_box_runs_the_scheduler_and_launch_runs_it_once_there(fake_wandb, tmp_path, monkeypatch,
                                                                              capsys):
    import agent.online.launch as launch
    from agent.__main__ import main

    monkeypatch.chdir(tmp_path)
    sweep = foreign(tmp_path, scheduler={"engine": "optuna", "source": "study.py", "optimizer": "make_study"})
    assert main(["create", str(sweep), "--project", "proj"]) == 0
    out = capsys.readouterr().out
    assert "on one GPU box (with study.py, in this folder): python -m agent launch ent/proj/new123 --gpus all " \
           "--scheduler" in out and "on each other GPU box: python -m agent launch ent/proj/new123 --gpus all" in out

    fake_wandb.sweep_config = sweep.read_text()
    (tmp_path / "recorder.py").write_text(RECORDER)
    started = tmp_path / "started"
    started.mkdir()
    monkeypatch.setattr(launch, "agent_command", lambda path, count: [
        sys.executable, str(tmp_path / "recorder.py"), str(started / "agent"), "agent", path])
    monkeypatch.setattr(launch, "scheduler_command", lambda path: [
        sys.executable, str(tmp_path / "recorder.py"), str(started / "scheduler"), "sweep-scheduler", path])
    assert main(["launch", "ent/proj/abc123", "--gpus", "0,1", "--stagger", "0", "--cold", "--scheduler"]) == 0
    scheduler = json.loads((started / "scheduler").read_text())
    assert scheduler == {"argv": ["sweep-scheduler", "ent/proj/abc123"], "cwd": str(tmp_path)}  # where study.py is
    assert (started / "scheduler.ended").read_text() == "SIGINT"  # its graceful stop, once the agents were done
    (started / "scheduler").unlink()
    assert main(["launch", "ent/proj/abc123", "--gpus", "0", "--cold"]) == 0  # another box: agents only
    assert not (started / "scheduler").exists()
    assert "needs W&B's scheduler on one box: there, python -m agent launch ent/proj/abc123 --scheduler" in \
        capsys.readouterr().err
