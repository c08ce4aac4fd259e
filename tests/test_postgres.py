"""Offline sweeps across boxes on one PostgreSQL server (a real one, started by the tests: conftest.postgres):
three controllers, as three boxes would run them, share one sweep with every guarantee of the single-box one."""

import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

import agent.controller.store
from agent.__main__ import main
from agent.controller.runlog import find_run_file
from agent.controller.store import open_store
from tests.helpers import PROGRAMS, agent_command, fresh_env, run_dirs, wait_for

pytestmark = pytest.mark.postgres

GRID = {"program": "foreign_train.py", "method": "grid", "metric": {"name": "loss", "goal": "minimize"},
        "parameters": {"x": {"values": [round(0.1 * i, 1) for i in range(1, 10)]}}}


def write_sweep(tmp_path: Path, sweep: dict) -> Path:
    shutil.copy(PROGRAMS / "foreign_train.py", tmp_path / "foreign_train.py")
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    return tmp_path / "sweep.yaml"


def controller(tmp_path: Path, url: str, *args: str, **env: str) -> subprocess.Popen:
    """`agent local` as one box runs it: the shared store, the shared sweep id, DIR on the shared filesystem."""
    return subprocess.Popen(agent_command("local", "sweep.yaml", "--store", url, "--sweep-id", "shared1", "--dir", "D",
                                          *args), cwd=tmp_path, env=fresh_env(tmp_path, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(procs: list[subprocess.Popen]) -> list[str]:
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), "\n".join(o[-2000:] for o in outputs)
    return outputs


@pytest.mark.slow
def test_three_controllers_share_a_sweep_with_no_duplicate_and_run_cap_exact(tmp_path, postgres, capsys):
    write_sweep(tmp_path, {**GRID, "run_cap": 7})
    url = postgres.url("three")
    outputs = finish([controller(tmp_path, url, "--workers", "2") for _ in range(3)])
    trials = open_store(tmp_path / "D").trials()
    assert len(trials) == 7 and all(t.state == "finished" for t in trials)  # the cap, not the grid's 9
    assert len({t.config["x"] for t in trials}) == 7  # no grid point twice
    assert all(len(run_dirs(tmp_path / "D", t.id)) == 1 for t in trials)
    started = [o.count(" started: ") for o in outputs]
    assert sum(started) == 7 and sum(n > 0 for n in started) >= 2  # the boxes shared the work
    capsys.readouterr()
    assert main(["status", str(tmp_path / "D"), "--json"]) == 0  # any box reads the shared store from DIR
    assert sorted(t["id"] for t in json.loads(capsys.readouterr().out)) == sorted(t.id for t in trials)
    assert main(["report", str(tmp_path / "D")]) == 0  # with the box of each trial
    page = (tmp_path / "D" / "report.html").read_text()
    assert "<th>host</th>" in page and page.count(f"<td>{trials[0].host}</td>") == 7


@pytest.mark.slow
def test_hyperband_stops_a_trial_on_the_metrics_of_another_controllers_trials(tmp_path, postgres):
    write_sweep(tmp_path, {**GRID, "parameters": {"x": {"values": [0.3, 0.35, 1.0]}},
                           "early_terminate": {"type": "hyperband", "min_iter": 1, "eta": 2}})
    url = postgres.url("hyperband")
    finish([controller(tmp_path, url, "--count", "2")])  # box 1: the two good trials
    finish([controller(tmp_path, url, "--count", "3", SLEEP="1")])  # box 2: the third, judged by box 1's
    first, second, third = open_store(tmp_path / "D").trials()
    assert (first.state, second.state) == ("finished", "finished")
    assert (third.state, third.reason) == ("stopped", "early-terminated by hyperband")
    assert len(third.history) < 3  # stopped before its last step


@pytest.mark.slow
def test_a_controller_killed_with_9_is_reaped_by_a_running_one_that_retries_its_trials(tmp_path, postgres):
    write_sweep(tmp_path, GRID)
    url = postgres.url("reaped")
    doomed = controller(tmp_path, url, "--workers", "2", "--count", "4", SLEEP="2")

    def logging_of(proc: subprocess.Popen) -> list[str]:  # its running trials whose runs have begun
        if not (tmp_path / "D" / "store.json").exists():
            return []
        return [t.id for t in open_store(tmp_path / "D").trials()
                if t.state == "running" and t.pid and find_run_file(tmp_path / "D", t.id)]

    orphans = wait_for(lambda: len(ids := logging_of(doomed)) == 2 and ids, "two trials of the first box", proc=doomed)
    survivor = controller(tmp_path, url, "--workers", "2", "--count", "4", "--retry-crashed", SLEEP="2")
    doomed.send_signal(signal.SIGKILL)
    doomed.communicate()
    output = finish([survivor])[0]
    assert all(f"{i} crashed: its controller died; retrying it" in output for i in orphans)
    trials = {t.id: t for t in open_store(tmp_path / "D").trials()}
    assert len(trials) == 4 and all(t.state == "finished" for t in trials.values())
    assert all(len(run_dirs(tmp_path / "D", i)) == 2 for i in orphans)  # retried under its own id


def test_a_store_that_cannot_be_used_is_one_line_and_nothing_is_made(tmp_path, postgres, capsys, monkeypatch,
                                                                     started):
    sweep = write_sweep(tmp_path, GRID)
    url = postgres.url("refusals")
    assert main(["local", str(sweep), "--store", url, "--sweep-id", "s1", "--dir", str(tmp_path / "D1")]) == 0
    other = write_sweep(tmp_path, {**GRID, "method": "random"})

    def refused(store: str, sweep_id: str = "s2", path: Path = sweep) -> str:
        assert main(["local", str(path), "--store", store, "--sweep-id", sweep_id, "--dir", str(tmp_path / "D")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and not (tmp_path / "D").exists()
        return err.strip()

    closed = f"postgresql://sweeps@127.0.0.1:{postgres.port + 1 if postgres.port < 65535 else 1}/refusals"
    assert "cannot use the store" in refused(closed) and "fix: start the server" in refused(closed)
    wrong = f"postgresql://sweeps:not-it@127.0.0.1:{postgres.port}/refusals"
    assert refused(wrong) == (f"agent local: postgresql://sweeps@127.0.0.1:{postgres.port}/refusals: cannot use the "
                              "store (connection failed: connection to server at \"127.0.0.1\", port "
                              f"{postgres.port} failed: FATAL: password authentication failed for user \"sweeps\"); "
                              "fix: set PGPASSWORD, or put the password in ~/.pgpass")
    assert refused(url, "s1", other).endswith(": holds sweep s1 made from another YAML; use a new --sweep-id")
    monkeypatch.setattr(agent.controller.store, "POSTGRES_MIN", 990000)
    assert refused(url).endswith(": PostgreSQL 15 is older than the store needs (99 or newer)")
    assert refused("mysql://sweeps@host/db") == ("agent local: --store='mysql://sweeps@host/db': expected "
                                                 "postgresql://USER@HOST[:PORT]/DB (without it, the store is SQLite, "
                                                 "DIR/sweep.db)")
