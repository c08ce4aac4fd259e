"""The controller's command line, state and views, in process (bar one `status` through its real entry point):
flags, damaged state, the reaper, the tables."""

import io
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from sqlalchemy import insert, select
from sqlalchemy.dialects import sqlite
from sqlalchemy.schema import CreateTable

import agent.views.status
from agent.__main__ import main
from agent.controller.store import CONTROLLERS, SWEEPS, TRIALS, Store, Trial, sqlite_url
from tests.helpers import agent_command

SWEEP = {"program": "train.py", "method": "bayes", "metric": {"name": "loss", "goal": "minimize"},
         "parameters": {"x": {"min": 0.0, "max": 1.0}, "opt": {"value": "sgd"}}}


def sweep_yaml(tmp_path: Path) -> str:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(SWEEP))
    return str(path)


def one_line(text: str) -> str:
    assert text.count("\n") == 1 and "Traceback" not in text, text
    return text


@pytest.mark.parametrize("command, flag, value, expected", [
    ("local", "--grace", "-1", "a number of seconds >= 0"),
    ("local", "--grace", "soon", "a number of seconds >= 0"),
    ("local", "--workers", "0", "an integer >= 1"),
    ("local", "--count", "0", "an integer >= 1"),
    ("local", "--count", "2.5", "an integer >= 1"),
    ("local", "--max-consecutive-failures", "0", "an integer >= 1"),
    ("launch", "--stagger", "nan", "a number of seconds >= 0"),
    ("launch", "--count", "-3", "an integer >= 1"),
    ("launch", "--agents-per-gpu", "0", "an integer >= 1"),
    ("launch", "--max-restarts", "-1", "an integer >= 0"),
])
def test_a_senseless_number_is_refused_in_one_line_naming_the_flag(tmp_path, capsys, command, flag, value, expected):
    target = sweep_yaml(tmp_path) if command == "local" else "ent/proj/sweep"
    rest = ["--dir", str(tmp_path / "D")] if command == "local" else ["--dry-run"]
    with pytest.raises(SystemExit) as e:
        main([command, target, flag, value, *rest])
    assert e.value.code == 2
    err = one_line(capsys.readouterr().err)
    assert err == f"agent {command}: argument {flag}: expected {expected}, got {value!r}\n"
    assert not (tmp_path / "D").exists()


def test_help_still_works_and_says_what_count_counts(capsys):
    for command, count in [("local", "total number of trials"), ("launch", "runs per agent")]:
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0
        assert count in " ".join(capsys.readouterr().out.split())


def test_unknown_flags_and_commands_get_one_line(capsys):
    assert main(["status", "D", "--bogus"]) == 2
    assert one_line(capsys.readouterr().err) == "agent status: unrecognized arguments: --bogus\n"
    with pytest.raises(SystemExit) as e:
        main(["statuss", "D"])
    assert e.value.code == 2 and "invalid choice: 'statuss'" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("spec, visible, per_trial, gpus", [
    ("all", ["2", "3"], 1, ["2", "3"]), ("all", [], 1, [None]), ("1, 3", [], 1, ["1", "3"]),
    ("all", ["0", "1", "2", "3"], 2, ["0,1", "2,3"]), ("4,5,6,7", [], 4, ["4,5,6,7"])])
def test_gpus_is_parsed_as_launch_parses_it(tmp_path, capsys, monkeypatch, started, spec, visible, per_trial, gpus):
    monkeypatch.setattr("agent.online.launch.visible_gpus", lambda: visible)
    assert main(["local", sweep_yaml(tmp_path), "--gpus", spec, "--gpus-per-trial", str(per_trial),
                 "--dir", str(tmp_path / "D")]) == 0
    assert started["gpus"] == gpus  # a slot's CUDA_VISIBLE_DEVICES
    assert ("no GPU visible" in capsys.readouterr().err) == (gpus == [None])
    assert main(["launch", "ent/proj/s", "--gpus", spec, "--gpus-per-trial", str(per_trial), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0].removeprefix("CUDA_VISIBLE_DEVICES=") for line in lines if gpus != [None]] == \
        [g for g in gpus if g]


@pytest.mark.parametrize("args, expected", [
    (["--gpus", "0,x"], "--gpus='0,x'"),
    (["--gpus", "0,1,2", "--gpus-per-trial", "2"], "--gpus-per-trial=2: 3 GPUs (0,1,2) do not split into groups of 2"),
    (["--gpus-per-trial", "2"], "--gpus-per-trial needs --gpus")])
def test_a_bad_gpu_list_is_refused_before_dir_exists(tmp_path, capsys, started, args, expected):
    assert main(["local", sweep_yaml(tmp_path), *args, "--dir", str(tmp_path / "D")]) == 2
    assert expected in one_line(capsys.readouterr().err)
    assert not (tmp_path / "D").exists() and not started


def real_db(path: Path) -> bytes:
    """The bytes of a sweep.db of many pages, closed as a controller leaves it."""
    store = Store(sqlite_url(path.parent))
    store.join("s1", SWEEP)
    for i in range(200):
        store.add_trial(f"t{i}", {"x": {"value": i / 200}}, "c")
        store.update(f"t{i}", state="finished", history=[1.0] * 40, metric=1.0)
    store.close()
    return path.read_bytes()


def old_version_db(path: Path) -> bytes:
    with sqlite3.connect(path) as db:
        for table in (SWEEPS, TRIALS, CONTROLLERS):
            db.execute(str(CreateTable(table).compile(dialect=sqlite.dialect())).replace("gpu VARCHAR", "slot VARCHAR"))
    return path.read_bytes()


@pytest.mark.parametrize("damage, problem", [
    (lambda p: p.write_bytes(b"not a database\n" * 100), "file is not a database"),
    (lambda p: p.write_bytes((data := real_db(p))[:len(data) // 2]), "database disk image is malformed"),
    (old_version_db, "its tables are not a sweep's"),
])
@pytest.mark.parametrize("command", ["status", "local", "report"])
def test_a_damaged_sweep_db_is_named_in_one_line_and_left_as_it_is(tmp_path, capsys, started, damage, problem,
                                                                   command):
    folder = tmp_path / "D"
    folder.mkdir()
    damage(folder / "sweep.db")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    args = {"status": ["status", str(folder)], "report": ["report", str(folder)],
            "local": ["local", sweep_yaml(tmp_path), "--dir", str(folder)]}[command]
    assert main(args) == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith(f"agent {command}: {folder / 'sweep.db'}: not a readable sweep database ({problem}")
    assert err.endswith("; it was left as it is\n")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before and not started


def test_status_of_a_sweep_db_without_a_sweep_says_so(tmp_path, capsys):
    (tmp_path / "sweep.db").touch()  # a controller killed as it created it
    assert main(["status", str(tmp_path)]) == 2
    assert one_line(capsys.readouterr().err) == f"agent status: {tmp_path / 'sweep.db'}: holds no sweep yet\n"
    assert (tmp_path / "sweep.db").read_bytes() == b""


def test_a_controller_with_a_stale_heartbeat_is_reaped_and_its_live_trials_crash(tmp_path):
    store = Store(sqlite_url(tmp_path))
    store.join("s1", SWEEP)
    now = time.time()  # both look alive: another host, a live pid; only the heartbeat tells them apart
    with store.engine.begin() as connection:
        connection.execute(insert(CONTROLLERS), [
            {"id": "stale", "sweep_id": "s1", "host": "another-host", "pid": os.getpid(), "heartbeat": now - 300},
            {"id": "fresh", "sweep_id": "s1", "host": "another-host", "pid": os.getpid(), "heartbeat": now}])
    for trial_id, controller, state in [("a", "stale", "running"), ("b", "stale", "pending"),
                                        ("c", "stale", "finished"), ("d", "fresh", "running")]:
        store.add_trial(trial_id, {"x": {"value": 0.5}}, controller)
        store.update(trial_id, state=state)
    assert sorted(store.reap_dead_controllers()) == ["a", "b"]
    assert {t.id: (t.state, t.reason) for t in store.trials()} == {
        "a": ("crashed", "its controller died"), "b": ("crashed", "its controller died"),
        "c": ("finished", None), "d": ("running", None)}
    with store.engine.begin() as connection:
        assert [r.id for r in connection.execute(select(CONTROLLERS.c.id))] == ["fresh"]


def small_sweep(folder: Path) -> Store:
    store = Store(sqlite_url(folder))
    store.join("s1", SWEEP)
    now = time.time()
    rows = [("t1", 0.25, "finished", 0.5, None, 12.0), ("t2", 0.75, "failed", None, "exit code 1: [boom]", 3.0),
            ("t3", 0.5, "pending", None, None, None)]
    for trial_id, x, state, metric, reason, took in rows:
        store.add_trial(trial_id, {"x": {"value": x}, "opt": {"value": "sgd"}}, "c")
        store.update(trial_id, state=state, metric=metric, reason=reason, started=took and now - took,
                     ended=took and now)
    return store


def test_status_table_has_a_row_per_trial_and_a_summary(tmp_path, capsys):
    small_sweep(tmp_path)
    assert main(["status", str(tmp_path)]) == 0
    header, columns, *rows, summary = capsys.readouterr().out.splitlines()
    assert header == f"sweep s1 (bayes) in {tmp_path}"
    assert columns.split() == ["id", "state", "loss", "time", "x", "reason"]
    assert [r.split() for r in rows] == [["t1", "finished", "0.5", "12s", "0.25"],
                                         ["t2", "failed", "3s", "0.75", "exit", "code", "1:", "[boom]"],
                                         ["t3", "pending", "0.5"]]
    assert summary == "1 finished, 1 pending, 1 failed | best loss 0.5 (t1: x=0.25)"


WIDE = {"program": "train.py", "method": "random", "metric": {"name": "val_acc", "goal": "maximize"},
        "parameters": {"lr": {"min": 0.0001, "max": 0.01}, "weight_decay": {"min": 0.0, "max": 0.1},
                       "drop_path_rate": {"values": [0.0, 0.1]}, "batch_size": {"values": [64, 128]},
                       "optimizer": {"values": ["adamw", "sgd"]}, "epochs": {"value": 3}}}
OOM = "exit code 1: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"


def wide_sweep(folder: Path):
    store = Store(sqlite_url(folder))
    store.join("s1", WIDE)
    now = time.time()
    for trial_id, lr, state, metric, reason in [("t1", 0.0005, "finished", 0.8125, None),
                                                ("t2", 0.0031, "failed", None, OOM),
                                                ("t3", 0.0097, "stopped", 0.41, "early-terminated by hyperband")]:
        store.add_trial(trial_id, {"lr": {"value": lr}, "weight_decay": {"value": 0.0125},
                                   "drop_path_rate": {"value": 0.1}, "batch_size": {"value": 128},
                                   "optimizer": {"value": "adamw"}, "epochs": {"value": 3}}, "c")
        store.update(trial_id, state=state, metric=metric, reason=reason, started=now - 754, ended=now)
    store.close()


def status_at(tmp_path: Path, capsys, monkeypatch, columns: str | None) -> tuple[list[str], list[str]]:
    """`status DIR` of wide_sweep off a terminal, COLUMNS as given: the table's lines and the lines under it."""
    wide_sweep(tmp_path)
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    assert main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    table = next(i for i, line in enumerate(out) if line.split()[:1] == ["id"])
    summary = next(i for i, line in enumerate(out) if line.startswith("1 finished"))
    assert columns is None or all(len(line) <= int(columns) for line in out)  # the sweep and summary lines too
    assert " ".join(" ".join(out[summary:]).split()).startswith(
        "1 finished, 1 failed, 1 stopped | best val_acc 0.8125 (t1: lr=0.0005 ")
    return out[table:table + 4], out[table + 4:summary]


@pytest.mark.parametrize("columns, left_out", [
    (120, []), (80, ["time", "optimizer", "batch_size"]),
    (60, ["time", "optimizer", "batch_size", "drop_path_rate", "weight_decay"]),
    (40, ["time", "optimizer", "batch_size", "drop_path_rate", "weight_decay", "lr", "reason"])])
def test_status_fits_the_width_by_leaving_columns_out_in_order_never_folding_a_value(tmp_path, capsys, monkeypatch,
                                                                                      columns, left_out):
    table, under = status_at(tmp_path, capsys, monkeypatch, str(columns))
    assert all(len(line) <= columns for line in table + under)
    shown = [c for c in ["id", "state", "val_acc", "time", "lr", "weight_decay", "drop_path_rate", "batch_size",
                         "optimizer", "reason"] if c not in left_out]
    assert table[0].split() == shown
    values = {"id": "t1", "state": "finished", "val_acc": "0.8125", "time": "754s", "lr": "0.0005",
              "weight_decay": "0.0125", "drop_path_rate": "0.1", "batch_size": "128", "optimizer": "adamw"}
    assert table[1].split() == [values[c] for c in shown if c != "reason"]  # each value whole, on its row
    if "reason" in shown:  # shortened with an ellipsis first, never below 16 characters
        assert OOM[:16] in table[2] and table[2].rstrip().endswith("…")
    said = " ".join(" ".join(under).split())
    assert said == (f"left out to fit {columns} columns: {', '.join(left_out)}; widen the terminal or use --json"
                    if left_out else "")


def test_status_off_a_terminal_is_200_columns_wide_and_leaves_nothing_out(tmp_path, capsys, monkeypatch):
    table, under = status_at(tmp_path, capsys, monkeypatch, None)
    assert table[0].split() == ["id", "state", "val_acc", "time", "lr", "weight_decay", "drop_path_rate",
                                "batch_size", "optimizer", "reason"]
    assert table[2].split() == ["t2", "failed", "754s", "0.0031", "0.0125", "0.1", "128", "adamw", *OOM.split()]
    assert under == []


def test_status_command_honours_columns(tmp_path):
    wide_sweep(tmp_path)
    out = subprocess.run(agent_command("status", str(tmp_path)), env={**os.environ, "COLUMNS": "80"},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert all(len(line) <= 80 for line in out.stdout.splitlines())
    assert "left out to fit 80 columns: time, optimizer, batch_size;" in out.stdout


@pytest.mark.parametrize("terminal", [True, False])
def test_live_view_prints_event_lines_whole_and_no_markup(tmp_path, monkeypatch, terminal):
    buffer = io.StringIO()
    monkeypatch.setattr(agent.views.status, "console", lambda: Console(file=buffer, force_terminal=terminal, width=80))
    started_line = "t3 started: /usr/bin/env python train.py --x=0.5 --tags=[a,b] " + "--long=" + "y" * 250
    with agent.views.status.SweepView("s1", SWEEP, tmp_path) as view:
        view.update(small_sweep(tmp_path).trials())
        view.event(started_line)
        view.update([Trial(id="t4", params={"x": {"value": "[red]"}}, state="running", reason="[bold]why")])
    out = buffer.getvalue()
    assert f"{started_line}\n" in out  # not folded at the console's width, brackets as they are
    assert "[/]" not in out and "[cyan]" not in out
    if terminal:  # the table, styled, with its cells as they are
        assert "\x1b[36mrunning" in out and "[red]" in out and "[bold]why" in out
    else:
        assert "\x1b[" not in out
    assert out.splitlines()[-1].endswith("1 running")
