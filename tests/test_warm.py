"""Warm trials: `python -m agent run` handed to a warm worker keeps everything a cold trial guarantees.

One real worker (agent/program/warm.py, the session's `warm_worker`); each test starts trials through the real client
(`python -m agent run` with AGENT_WARM_SOCKET) and reads back what each logged with W&B's own
reader. A trial is killed while it is held at the training batch the test targets (tests.helpers.Hold). A stop
(SIGTERM) and a preemption notice (SIGUSR1) through a warm worker, and the exit codes that come back, are tested
where they come from: tests/test_wandb_agent.py (W&B's agent) and tests/test_preempt.py (a terminal, a box).
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.controller.processes import WarmWorker
from tests.conftest import WARM
from tests.helpers import (
    QUICK_VAL,
    Hold,
    agent_command,
    dead,
    exit_codes,
    fresh_env,
    leet_records,
    model_artifacts,
    run_dirs,
    run_record,
    signalled,
    validated_epochs,
    wait_for,
)

pytestmark = [pytest.mark.slow, WARM]

TRIVIAL = ("run", "--dataset=synthetic", "--model=resnet9", "--width=8", "--max_epochs=1", "--limit_train_batches=2")
BATCHES = 12  # a training epoch of LONG
LONG = ("run", "--dataset=synthetic", f"--val_fraction={QUICK_VAL}", "--max_epochs=4",
        f"--limit_train_batches={BATCHES}", "--early_stopping_patience=10")


@pytest.fixture
def worker(warm_worker):
    return warm_worker


def start(worker: WarmWorker | None, tmp_path: Path, args, run_id: str, default_threads: bool = False,
          hold: Hold | None = None) -> subprocess.Popen:
    env = fresh_env(tmp_path, WANDB_RUN_ID=run_id, AGENT_WARM_SOCKET=worker.socket if worker else "/nonexistent",
                    **(hold.env if hold else {}))
    if default_threads:  # torch's own choice in the trial, a thread per core (tests/conftest.py sets one)
        del env["OMP_NUM_THREADS"]
    return signalled(agent_command(*args), cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                     text=True)


def trial_pid(worker: WarmWorker) -> int:
    """The worker's one running trial: a child forked from it (its other child is wandb-core)."""
    children = Path(f"/proc/{worker.proc.pid}/task/{worker.proc.pid}/children").read_text().split()
    [pid] = [int(c) for c in children if b"agent.program.warm" in Path(f"/proc/{c}/cmdline").read_bytes()]
    return pid


def test_the_client_imports_no_torch_and_each_trial_is_its_own_run(worker, tmp_path):
    out = subprocess.run([sys.executable, "-X", "importtime", *agent_command(*TRIVIAL)[1:]], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120,
                         env=fresh_env(tmp_path, WANDB_RUN_ID="warm01", AGENT_WARM_SOCKET=worker.socket))
    assert out.returncode == 0, out.stderr[-3000:]
    imported = [line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")]
    assert "agent.program.handoff" in imported and not {"torch", "wandb", "lightning"} & set(imported)
    # A thread per core in a trial forked from the one-thread worker: it must not hang in its first parallel op.
    second = start(worker, tmp_path, TRIVIAL, "warm02", default_threads=True)
    assert second.wait(timeout=120) == 0, second.stderr.read()[-3000:]
    for run_id in ("warm01", "warm02"):  # each its own offline run, finished, with its best model
        [run_dir] = run_dirs(tmp_path, run_id)
        records = leet_records(run_dir)
        assert exit_codes(records) == [0]
        assert "test_acc" in model_artifacts(records)[-1]["metadata"]


def test_a_crashed_or_orphaned_trial_takes_nothing_down_and_no_worker_means_cold(worker, tmp_path, hold_at):
    # Killed in epoch 1's first batch: epoch 0's last.ckpt, which the rerun resumes from, is whole on disk.
    hold = hold_at("train_batch", BATCHES + 1)
    crashed = start(worker, tmp_path, LONG, "warmkill", hold=hold)
    hold.wait(proc=crashed)
    os.kill(trial_pid(worker), signal.SIGKILL)  # a segfault, the OOM killer: the client ends the same way
    assert crashed.wait(timeout=60) == -signal.SIGKILL

    hold = hold_at("train_batch", 1)
    orphan = start(worker, tmp_path, LONG, "warmorphan", hold=hold)
    hold.wait(proc=orphan)
    pid = trial_pid(worker)
    orphan.kill()  # the client gone (its agent killed): its trial must not train on unseen
    orphan.wait()
    wait_for(lambda: dead(pid), "the orphaned trial to die", timeout=60)

    # The worker serves on; a crashed run id resumes (its run was left open in the retired wandb-core) from its
    # last full epoch.
    after = start(worker, tmp_path, LONG, "warmkill")
    stdout, stderr = after.communicate(timeout=180)
    assert after.returncode == 0, stderr[-3000:]
    first = run_dirs(tmp_path, "warmkill")[0]
    assert f"resumed_from={first / 'checkpoints' / 'last.ckpt'}" in stdout.split()
    records, code = run_record(tmp_path, "warmkill")
    assert code == 0 and validated_epochs(records) == [1, 2, 3]
    cold = start(None, tmp_path, TRIVIAL, "warmcold")  # no worker at that address: a cold trial, as always
    assert cold.wait(timeout=180) == 0, cold.stderr.read()[-3000:]
