"""agent.controller.runlog against real offline W&B runs, each in a subprocess (no mocks)."""

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.controller.runlog import BLOCK, RunLogReader, find_run_file
from tests.helpers import fresh_env, wait_for, wandb_reader

pytestmark = pytest.mark.xdist_group("runlog")  # one xdist process: its finished run is made once

# Logs the rows in LOGGED; a string longer than a 32 KiB block makes one record span blocks.
FINISHED_SCRIPT = """
import wandb
run = wandb.init(project="runlog-test", id="finished1")
for row in {rows!r}:
    run.log(row)
run.log({{"nan": float("nan")}})
run.finish()
"""
LOGGED = [{"loss": 2.5, "epoch": 0, "nested": {"acc": 0.1}},
          {"loss": 1.25, "epoch": 1, "name": "b", "long": "x" * 70000},
          {"loss": 0.5, "epoch": 2, "nested": {"acc": 0.9}}]
EXPECTED = [{"loss": 2.5, "epoch": 0, "nested.acc": 0.1},
            {"loss": 1.25, "epoch": 1, "name": "b", "long": "x" * 70000},
            {"loss": 0.5, "epoch": 2, "nested.acc": 0.9}]

# Logs loss row by row and waits for the test to have read each row before the next.
LIVE_SCRIPT = """
import os, sys, threading, time, wandb
run = wandb.init(project="runlog-test", id="live1")
for step in range(5):
    run.log({"loss": 1.0 / (step + 1)})
    ack, deadline = os.path.join(sys.argv[1], f"ack-{step}"), time.time() + 20
    while not os.path.exists(ack) and time.time() < deadline:
        threading.Event().wait(0.02)
run.finish(exit_code=3)
"""


def same(rows: list[dict], other: list[dict]) -> bool:
    return repr(rows) == repr(other)  # NaN-safe equality


def user_keys(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("_")}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("finished")
    script = root / "log_rows.py"
    script.write_text(FINISHED_SCRIPT.format(rows=LOGGED))
    subprocess.run([sys.executable, str(script)], env=fresh_env(root), check=True, timeout=60)
    return root


def test_finished_run_rows_equal_what_was_logged(finished_run):
    path = find_run_file(finished_run, "finished1")
    assert path is not None and path.name == "run-finished1.wandb"
    reader = RunLogReader(path)
    rows = reader.poll()
    assert [user_keys(r) for r in rows[:3]] == EXPECTED
    assert [r["_step"] for r in rows] == [0, 1, 2, 3]
    assert math.isnan(rows[3]["nan"])
    assert reader.finished and reader.exit_code == 0
    assert reader.poll() == []


def test_the_suites_reader_prints_what_wandb_leet_inspect_prints(finished_run):
    run_dir = find_run_file(finished_run, "finished1").parent
    for flags in (["--json"], ["--summary", "--json"]):
        cli = subprocess.run(["wandb", "leet", "inspect", *flags, str(run_dir)], capture_output=True, text=True,
                             check=True, timeout=60).stdout
        assert wandb_reader(run_dir, *flags) == cli and cli


def test_find_run_file_missing_and_newest(finished_run, tmp_path):
    assert find_run_file(tmp_path, "finished1") is None
    assert find_run_file(finished_run, "nosuchrun") is None
    older = find_run_file(finished_run, "finished1").parent
    newer = tmp_path / "wandb" / "offline-run-29991231_235959-finished1"
    shutil.copytree(older, newer)
    shutil.copytree(older, tmp_path / "wandb" / older.name)
    assert find_run_file(tmp_path, "finished1") == newer / "run-finished1.wandb"


def test_rows_appear_while_the_run_is_writing(tmp_path):
    script = tmp_path / "live.py"
    script.write_text(LIVE_SCRIPT)
    env = fresh_env(tmp_path)  # flushes the log every 0.1 s, not wandb-core's default 15 s
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env)
    try:
        reader, seen = None, []

        def rows_up_to(step: int) -> bool:
            nonlocal reader, seen
            path = reader.path if reader else find_run_file(tmp_path, "live1")
            if path is not None:
                reader = reader or RunLogReader(path)
                seen += reader.poll()
            return len(seen) > step

        for step in range(5):
            wait_for(lambda step=step: rows_up_to(step), f"row {step}", timeout=30, proc=proc)
            (tmp_path / f"ack-{step}").touch()
        assert proc.wait(timeout=30) == 0
        seen += reader.poll()
    finally:
        proc.kill()
    assert [r["_step"] for r in seen] == [0, 1, 2, 3, 4]
    assert [r["loss"] for r in seen] == [1.0, 0.5, 1 / 3, 0.25, 0.2]
    assert reader.finished and reader.exit_code == 3


def test_truncated_log_then_rest_appended(finished_run, tmp_path):
    data = find_run_file(finished_run, "finished1").read_bytes()
    assert len(data) > 2 * BLOCK  # the long row spans blocks
    full = RunLogReader(find_run_file(finished_run, "finished1")).poll()

    # Cut 10 bytes before the end of the first history record, then append the rest.
    copy = tmp_path / "run-copy.wandb"
    lo, hi = 0, len(data)  # bisect for the shortest prefix that holds a whole history record
    while lo < hi:
        mid = (lo + hi) // 2
        copy.write_bytes(data[:mid])
        lo, hi = (lo, mid) if RunLogReader(copy).poll() else (mid + 1, hi)
    copy.write_bytes(data[:lo - 10])
    reader = RunLogReader(copy)
    assert reader.poll() == [] and reader.offset > 7 and not reader.finished
    assert reader.poll() == []
    with open(copy, "ab") as f:
        f.write(data[lo - 10:])
    assert same(reader.poll(), full) and reader.finished

    # Grow a copy in odd-sized pieces (cutting headers, chunks, padding, the file header): same rows.
    grown, reader, rows = tmp_path / "run-grown.wandb", RunLogReader(tmp_path / "run-grown.wandb"), []
    assert reader.poll() == []  # no file yet
    for start in range(0, len(data), 997):
        with open(grown, "ab") as f:
            f.write(data[start:start + 997])
        rows += reader.poll()
    assert same(rows, full)
