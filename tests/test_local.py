"""The offline sweep controller, end to end: real trials, real offline runs, W&B's engine."""

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

from agent.controller.local import trial_command
from agent.controller.store import open_store
from agent.errors import UsageError
from agent.install import matching_pair_command, this_python_first
from tests.conftest import HYPERBAND
from tests.helpers import (
    PROGRAMS,
    QUICK_VAL,
    REPO,
    agent_command,
    fresh_env,
    history,
    leet_records,
    model_artifacts,
    records_of,
    run_dirs,
    run_record,
    signalled,
    validated_epochs,
    wait_for,
)

FOREIGN = PROGRAMS / "foreign_train.py"


def write_yaml(path: Path, sweep: dict) -> Path:
    path.write_text(yaml.safe_dump(sweep))
    return path


@pytest.fixture
def foreign_sweep(tmp_path, offline_env) -> Path:
    """A bayes sweep of a plain W&B program, run from tmp_path as `wandb agent` would."""
    shutil.copy(FOREIGN, tmp_path / "foreign_train.py")
    return write_yaml(tmp_path / "sweep.yaml", {
        "program": "foreign_train.py", "method": "bayes", "metric": {"name": "loss", "goal": "minimize"},
        "parameters": {"x": {"min": 0.0, "max": 1.0}}})


def local(sweep: Path, *args: str, timeout: float = 150, **popen) -> subprocess.CompletedProcess:
    """`agent local SWEEP ARGS` from the sweep's folder, `python` on PATH this one (as in an activated environment:
    the commands it prints to resume start with `python`)."""
    popen.setdefault("env", this_python_first(dict(os.environ)))
    return subprocess.run(agent_command("local", str(sweep), *args), capture_output=True, text=True,
                          cwd=sweep.parent, timeout=timeout, **popen)


def status(directory: Path) -> list[dict]:
    out = subprocess.run(agent_command("status", str(directory), "--json"), capture_output=True, text=True,
                         check=True, timeout=60)
    return json.loads(out.stdout)


def test_trial_command_expands_wandb_macros_like_the_agent(tmp_path):
    params = {"lr": {"value": 0.01}, "nesterov": {"value": False}, "opt": {"value": "sgd"}}
    sweep = {"program": "train.py", "command": [
        "${env}", "${interpreter}", "${program}", "${args_no_boolean_flags}", "${args_no_hyphens}",
        "${args_json}", "${args_json_file}", "--fixed", "${envvar:HOME}"]}
    assert trial_command(sweep, params, tmp_path / "a.json") == [
        "/usr/bin/env", "python", "train.py", "--lr=0.01", "--opt=sgd", "lr=0.01", "nesterov=False", "opt=sgd",
        '{"lr": 0.01, "nesterov": false, "opt": "sgd"}', str(tmp_path / "a.json"), "--fixed", os.environ["HOME"]]
    assert trial_command({"program": "t.py"}, params, tmp_path / "a.json") == [
        "/usr/bin/env", "python", "t.py", "--lr=0.01", "--nesterov=False", "--opt=sgd"]


@pytest.mark.slow
def test_foreign_bayes_sweep_runs_offline_on_two_workers(foreign_sweep, tmp_path):
    out = local(foreign_sweep, "--count", "6", "--workers", "2", "--dir", "D")
    assert out.returncode == 0, out.stdout + out.stderr
    trials = status(tmp_path / "D")
    assert [t["state"] for t in trials] == ["finished"] * 6
    assert len({t["id"] for t in trials}) == 6 and all(isinstance(t["metric"], float) for t in trials)
    [sweep_dir] = (tmp_path / "D" / "wandb").glob("sweep-*")
    sweep_id = sweep_dir.name.removeprefix("sweep-")
    for t in trials:
        [run_dir] = run_dirs(tmp_path / "D", t["id"])
        records = leet_records(run_dir)
        [run] = records_of(records, "run")
        assert run["sweep_id"] == sweep_id
        losses = [row["loss"] for row in history(records)]
        assert losses[0] == pytest.approx((t["config"]["x"] - 0.3) ** 2 + 1.0)  # the trial ran its own config
        assert losses[-1] == pytest.approx(t["metric"])


@pytest.mark.slow
def test_kill_9_then_resume_loses_and_repeats_nothing(foreign_sweep, tmp_path, monkeypatch):
    monkeypatch.setenv("SLEEP", "0.4")
    command = agent_command("local", str(foreign_sweep), "--count", "6", "--workers", "2", "--dir", "D")
    controller = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def two_finished_and_one_running() -> bool:
        try:
            states = [t.state for t in open_store(tmp_path / "D").trials()]
        except UsageError:  # no sweep.db yet, or not its tables yet
            return False
        return states.count("finished") >= 2 and "running" in states

    wait_for(two_finished_and_one_running, "2 finished trials and a running one", proc=controller)
    controller.send_signal(signal.SIGKILL)
    controller.wait()
    before = {t["id"]: t for t in status(tmp_path / "D")}
    finished_before = {i: t for i, t in before.items() if t["state"] == "finished"}
    assert len(finished_before) >= 2 and len(before) < 6

    out = local(foreign_sweep, "--count", "6", "--workers", "2", "--dir", "D")
    assert out.returncode == 0, out.stdout + out.stderr
    after = status(tmp_path / "D")
    ids = [t["id"] for t in after]
    assert len(ids) == len(set(ids)) == 6  # the count is the total across resumes, no id twice
    by_id = {t["id"]: t for t in after}
    assert all(by_id[i] == t for i, t in finished_before.items())  # kept, not rerun
    crashed = {i for i in before if i not in finished_before}
    assert {by_id[i]["state"] for i in crashed} == {"crashed"}
    assert all(t["state"] == "finished" for t in after if t["id"] not in before)

    retried = local(foreign_sweep, "--count", "6", "--dir", "D", "--retry-crashed")
    assert retried.returncode == 0, retried.stdout + retried.stderr
    final = {t["id"]: t for t in status(tmp_path / "D")}
    assert set(final) == set(by_id) and all(t["state"] == "finished" for t in final.values())
    for trial_id in crashed:  # rerun under its own run id, with its own config
        assert final[trial_id]["config"] == by_id[trial_id]["config"]
        records, _ = run_record(tmp_path / "D", trial_id)  # its newest attempt's
        losses = [row["loss"] for row in history(records)]
        assert len(losses) == 3 and losses[-1] == pytest.approx(final[trial_id]["metric"])


@pytest.mark.slow
def test_two_controllers_on_one_dir_share_the_count_without_duplicates(foreign_sweep, tmp_path):
    command = agent_command("local", str(foreign_sweep), "--count", "6", "--dir", "D")
    first = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for(lambda: (tmp_path / "D" / "sweep.db").exists(), "the first controller's sweep.db", proc=first)
    second = local(foreign_sweep, "--count", "6", "--dir", "D")
    assert first.wait(timeout=150) == 0 and second.returncode == 0, second.stdout + second.stderr
    trials = status(tmp_path / "D")
    assert len({t["id"] for t in trials}) == len(trials) == 6
    assert all(t["state"] == "finished" for t in trials)


@pytest.mark.slow
def test_the_same_yaml_again_resumes_its_sweep_says_when_it_is_finished_and_new_starts_another(foreign_sweep,
                                                                                               tmp_path):
    assert local(foreign_sweep, "--count", "2").returncode == 0
    [first] = (tmp_path / "sweeps-local").iterdir()
    renamed = tmp_path / "same.yaml"  # the same settings under another name and layout: the same sweep
    renamed.write_text("# a copy\n" + yaml.safe_dump(yaml.safe_load(foreign_sweep.read_text()), indent=4))
    done = local(renamed, "--count", "2")
    assert done.returncode == 0 and done.stdout.splitlines() == [
        f"sweep {first.name} of this YAML (sweeps-local/{first.name}) is finished: 2 finished of 2; for more trials, "
        f"raise --count (the total across runs), or start another sweep of it: python -m agent local {renamed} "
        "--count 2 --new"]
    more = local(renamed, "--count", "3")
    assert more.returncode == 0, more.stdout + more.stderr
    assert more.stdout.startswith(f"resuming sweep {first.name} (sweeps-local/{first.name}): 2 finished of 3; "
                                  "--new starts another")
    assert [t["state"] for t in status(first)] == ["finished"] * 3
    assert local(renamed, "--count", "1", "--new").returncode == 0
    assert len(list((tmp_path / "sweeps-local").iterdir())) == 2


@pytest.mark.slow
def test_a_trial_runs_under_this_python_whatever_python_comes_first_on_path(foreign_sweep, tmp_path):
    other = tmp_path / "bin" / "python"  # an environment that is not activated: another `python` first on PATH
    other.parent.mkdir()
    other.write_text("#!/bin/sh\necho 'the wrong python' >&2\nexit 3\n")
    other.chmod(0o755)
    out = local(foreign_sweep, "--count", "1", "--dir", "D",
                env={**os.environ, "PATH": f"{other.parent}{os.pathsep}{os.environ['PATH']}"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert [t["state"] for t in status(tmp_path / "D")] == ["finished"]


@pytest.mark.slow
def test_gpus_pin_one_trial_per_listed_gpu(foreign_sweep, tmp_path):
    out = local(foreign_sweep, "--count", "2", "--gpus", "0,1", "--dir", "D")
    assert out.returncode == 0, out.stdout + out.stderr
    trials = status(tmp_path / "D")
    assert sorted(t["gpu"] for t in trials) == ["0", "1"]
    for t in trials:
        log = (tmp_path / "D" / "logs" / f"{t['id']}.log").read_text()
        assert f"CUDA_VISIBLE_DEVICES {t['gpu']}" in log


@pytest.mark.slow
def test_failures_are_recorded_with_their_own_error_and_too_many_stop_the_sweep(foreign_sweep, tmp_path,
                                                                                monkeypatch):
    monkeypatch.setenv("FAIL_ABOVE", "-1")  # every trial raises
    out = local(foreign_sweep, "--count", "10", "--dir", "D", "--max-consecutive-failures", "2")
    assert out.returncode == 1
    assert "2 trials failed in a row" in out.stdout
    trials = status(tmp_path / "D")
    assert [t["state"] for t in trials] == ["failed", "failed"]
    for t in trials:  # the exception line, not wandb's last line or its colour codes
        assert t["reason"] == f"exit code 1: ValueError: x={t['config']['x']:.3f} is above FAIL_ABOVE"


@pytest.mark.slow
def test_a_sweep_that_ends_with_no_finished_trial_exits_non_zero(foreign_sweep, tmp_path, monkeypatch):
    monkeypatch.setenv("FAIL_ABOVE", "-1")
    out = local(foreign_sweep, "--count", "2", "--dir", "D")
    assert out.returncode == 1 and "no trial finished; 2 failed" in out.stdout, out.stdout


def start_signalled_sweep(tmp_path: Path, monkeypatch, modes: list[str], *args: str) -> tuple[subprocess.Popen, Path]:
    """A controller running one tests/programs/signalled_trial.py per mode, all at once; returns it once every
    trial has its SIGTERM handler in place, and the folder of the trials' marks."""
    marks = tmp_path / "marks"
    marks.mkdir()
    monkeypatch.setenv("MARKS", str(marks))
    sweep = write_yaml(tmp_path / "sweep.yaml", {"program": str(PROGRAMS / "signalled_trial.py"), "method": "grid",
                                                 "parameters": {"mode": {"values": modes}}})
    controller = signalled(agent_command("local", str(sweep), "--workers", str(len(modes)), "--dir", "D", *args),
                           cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env=this_python_first(dict(os.environ)))
    wait_for(lambda: len(list(marks.glob("*.started"))) == len(modes), "every trial started", proc=controller)
    return controller, marks


def test_ctrl_c_pauses_the_trials_and_kills_one_that_ignores_its_notice_after_grace(tmp_path, offline_env,
                                                                                       monkeypatch):
    controller, marks = start_signalled_sweep(tmp_path, monkeypatch, ["obedient", "stubborn"], "--grace", "1")
    controller.send_signal(signal.SIGINT)
    out = controller.communicate(timeout=60)[0]
    assert controller.returncode == 130, out
    assert "interrupted: pausing running trials" in out
    trials = {t.config["mode"]: t for t in open_store(tmp_path / "D").trials()}
    resume = f"python -m agent local {tmp_path / 'sweep.yaml'} --workers 2 --dir D --grace 1"
    assert {(t.state, t.reason) for t in trials.values()} == {("paused", f"paused by Ctrl-C; resume: {resume}")}
    assert f"2 trial(s) paused; resume: {resume}" in out
    obedient, stubborn = trials["obedient"], trials["stubborn"]
    assert obedient.exit_code == 0 and (marks / f"{obedient.id}.sigterm").exists()  # not ours: a stop is its notice
    assert stubborn.exit_code == -signal.SIGKILL
    assert stubborn.ended - (marks / f"{stubborn.id}.sigterm").stat().st_mtime >= 1.0  # the grace it was given


def test_a_second_ctrl_c_kills_at_once_and_report_path_ends_the_output(tmp_path, offline_env, monkeypatch):
    controller, marks = start_signalled_sweep(tmp_path, monkeypatch, ["stubborn"], "--grace", "600", "--report")
    controller.send_signal(signal.SIGINT)
    wait_for(lambda: list(marks.glob("*.sigterm")), "the trial's SIGTERM", proc=controller)
    controller.send_signal(signal.SIGINT)
    out = controller.communicate(timeout=60)[0]  # far less than --grace
    assert controller.returncode == 130, out
    assert "interrupted again: killing running trials" in out
    [trial] = open_store(tmp_path / "D").trials()
    assert (trial.state, trial.exit_code) == ("paused", -signal.SIGKILL)
    report = tmp_path / "D" / "report.html"
    assert out.splitlines()[-1] == f"report: {report.resolve()}" and report.is_file()


def test_a_misspelt_parameter_is_refused_before_any_trial(tmp_path, offline_env):
    sweep = yaml.safe_load((REPO / "sweeps" / "bayes.yaml").read_text())
    sweep["parameters"]["learning_rate"] = sweep["parameters"].pop("lr")
    out = local(write_yaml(tmp_path / "bad.yaml", sweep), "--dir", "D")
    assert out.returncode == 2 and "parameters.learning_rate: not a config key" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "D").exists()


@pytest.mark.slow
@HYPERBAND
def test_hyperband_stops_bad_trials_of_our_program_and_each_keeps_its_best_model(hyperband_sweep):
    trials = [(t.id, t.state, t.reason) for t in hyperband_sweep.trials]
    assert [state for _, state, _ in trials] == ["finished", "finished", "stopped"], trials
    for trial_id, *_ in trials:
        [run_dir] = run_dirs(hyperband_sweep.dir, trial_id)
        final = model_artifacts(leet_records(run_dir))[-1]
        assert "best" in final["aliases"] and "test_acc" in final["metadata"]
        log = (hyperband_sweep.dir / "logs" / f"{trial_id}.log").read_text()
        assert "litlogger" not in log and "Ignoring project" not in log  # other tools' noise, left out


OURS_SWEEP = {"method": "grid", "metric": {"name": "val_acc", "goal": "maximize"},
              "parameters": {"lr": {"values": [1e-3, 3e-3]}, "dataset": {"value": "synthetic"},
                             "val_fraction": {"value": QUICK_VAL}, "max_epochs": {"value": 3},
                             "limit_train_batches": {"value": 8}, "early_stopping_patience": {"value": 10}},
              "command": ["${env}", "${interpreter}", "-m", "agent", "run", "${args}"]}


# The same sweep under W&B's scheduler (Optuna): the paused trial is told to the rebuilt study as an active one
# (tell_existing_active_run), and run_cap stays the total.
OURS_SCHEDULED = {**OURS_SWEEP, "method": "custom", "scheduler": {"engine": "optuna"}, "run_cap": 2}


@pytest.mark.slow
@pytest.mark.parametrize("sweep", [OURS_SWEEP, OURS_SCHEDULED], ids=["grid", "optuna"])
def test_ctrl_c_pauses_our_trials_and_the_same_command_resumes_them_first(tmp_path, hold_at, sweep):
    write_yaml(tmp_path / "ours.yaml", sweep)
    command, env = agent_command("local", "ours.yaml"), fresh_env(tmp_path)
    hold = hold_at("train_batch", 8 + 3)  # batch 3 of epoch 1 (limit_train_batches: 8)
    controller = signalled(command, cwd=tmp_path, env={**env, **hold.env}, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    hold.wait(proc=controller, timeout=300)
    [directory] = (tmp_path / "sweeps-local").iterdir()
    [first] = [t.id for t in open_store(directory).trials() if t.state == "running"]
    # Ctrl-C to the controller; its trials get a preemption notice
    hold.deliver(lambda: controller.send_signal(signal.SIGINT), signal.SIGUSR1, proc=controller)
    out = controller.communicate(timeout=120)[0]
    assert controller.returncode == 130, out
    [paused] = open_store(directory).trials()
    assert (paused.id, paused.state, paused.exit_code) == (first, "paused", 128 + signal.SIGUSR1)
    assert paused.reason == "paused by Ctrl-C; resume: python -m agent local ours.yaml"
    assert out.splitlines()[-1] == "1 trial(s) paused; resume: python -m agent local ours.yaml"
    log = (directory / "logs" / f"{first}.log").read_text()
    assert "agent run: preempted after batch 3 of epoch 1, step 11; state saved" in log.splitlines()

    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.startswith(f"resuming sweep {directory.name} (sweeps-local/{directory.name}): 1 paused")
    assert "resuming 1 paused trial(s) first" in again.stdout
    trials = open_store(directory).trials()
    assert [(t.id == first, t.state) for t in trials] == [(True, "finished"), (False, "finished")]
    assert len(trials[0].history) == 3  # one val_acc per epoch, across both attempts
    earlier, resumed = run_dirs(directory, first)
    assert validated_epochs(leet_records(earlier)) == [0] and validated_epochs(leet_records(resumed)) == [1, 2]


@pytest.mark.slow
def test_an_install_every_trial_would_trip_on_is_one_line_before_the_first_trial(tmp_path):
    broken = tmp_path / "site" / "torchmetrics"  # what a torchvision built for another torch raises on import
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    write_yaml(tmp_path / "ours.yaml", OURS_SWEEP)
    env = fresh_env(tmp_path, PYTHONPATH=f"{tmp_path / 'site'}:{REPO}")
    out = subprocess.run(agent_command("local", "ours.yaml", "--dir", "D"), cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stdout + out.stderr
    [line] = out.stderr.splitlines()
    assert line.startswith("agent local: the sweep's program cannot start here: RuntimeError: operator "
                           "torchvision::nms does not exist (torch and torchvision do not match; fix: "
                           f"{matching_pair_command()})"), line
    assert open_store(tmp_path / "D").trials() == []
