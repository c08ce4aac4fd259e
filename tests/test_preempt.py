"""`python -m agent run` and the signals a terminal or a box sends it, as a real process: a
preemption notice saves and logs the training state and the same run id resumes it; Ctrl-C and a
plain SIGTERM end it with its best model logged. Signals are sent once the run's own log shows
the epoch the test waits for. Runs start through the session's warm worker, as under `agent local` and
`agent launch` (the client relays each signal and exits as the trial did); test_wandb_agent.py sends a
stop to a cold run."""

import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from cifar_core.checkpoints import find_resume_checkpoint
from tests.conftest import WARM
from tests.helpers import (QUICK_VAL, agent_command, fresh_env, leet_records, records_of, run_dirs, validated,
                           wait_for)

ARGS = ("run", "--dataset=synthetic", f"--val_fraction={QUICK_VAL}", "--max_epochs=4", "--limit_train_batches=12",
        "--early_stopping_patience=10")


def start(tmp_path: Path, worker, run_id: str) -> subprocess.Popen:
    return subprocess.Popen(agent_command(*ARGS), cwd=tmp_path, env=run_env(tmp_path, worker, run_id),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_env(tmp_path: Path, worker, run_id: str) -> dict[str, str]:
    return fresh_env(tmp_path, WANDB_RUN_ID=run_id, AGENT_WARM_SOCKET=worker.socket)


def model_artifacts(records: list[dict]) -> list[dict]:
    return [a for a in records_of(records, "artifact") if a["type"] == "model"]


@pytest.mark.slow
@WARM
def test_a_preemption_notice_saves_the_state_and_the_same_run_id_resumes_at_that_epoch(tmp_path, warm_worker):
    first = start(tmp_path, warm_worker, "preempt01")
    wait_for(validated(tmp_path, "preempt01", 1), "preempt01's second validation", proc=first)
    first.send_signal(signal.SIGUSR1)
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGUSR1, stderr[-2000:]
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith("agent run: preempted at epoch ")
    saved_epoch = int(last_line.split()[-3].rstrip(";"))  # "... preempted at epoch N; state saved"
    [first_dir] = run_dirs(tmp_path, "preempt01")
    assert (first_dir / "checkpoints" / "preempt.ckpt").is_file()
    records = leet_records(first_dir)
    [resume] = [a for a in records_of(records, "artifact") if a["type"] == "checkpoint"]
    assert resume["name"] == "resume-preempt01"
    assert model_artifacts(records)  # the best model so far, logged as it improved
    assert records_of(records, "preempting")
    assert [e.get("exit_code") for e in records_of(records, "exit")] == [128 + signal.SIGUSR1]

    second = subprocess.run(agent_command(*ARGS), cwd=tmp_path, capture_output=True, text=True, timeout=180,
                            env=run_env(tmp_path, warm_worker, "preempt01"))
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"resumed_from={first_dir / 'checkpoints' / 'preempt.ckpt'}" in second.stdout
    records = leet_records(run_dirs(tmp_path, "preempt01")[-1])
    epochs = [h["item"]["epoch"] for h in records_of(records, "history") if "val_acc" in h["item"]]
    assert epochs == list(range(saved_epoch, 4)) and saved_epoch >= 1  # continued at the saved epoch
    assert "best" in model_artifacts(records)[-1]["aliases"]


# A plain SIGTERM (exit 0) takes the same path: tests/test_wandb_agent.py sends it to a cold run.
@pytest.mark.slow
@WARM
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130)])
def test_ctrl_c_ends_the_run_with_its_best_model_logged(tmp_path, warm_worker, signum, code):
    run = start(tmp_path, warm_worker, "ended01")
    wait_for(validated(tmp_path, "ended01", 0), "ended01's first validation", proc=run)
    run.send_signal(signum)
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == code, stderr[-2000:]
    [run_dir] = run_dirs(tmp_path, "ended01")
    records = leet_records(run_dir)
    assert not records_of(records, "preempting")
    final = model_artifacts(records)[-1]
    assert set(final["aliases"]) == {"best", "latest"} and "test_acc" in final["metadata"]
    epochs = {h["item"]["epoch"] for h in records_of(records, "history") if "val_acc" in h["item"]}
    assert len(epochs) < 4  # it ended early


def fake_run(tmp_path: Path, resumed: bool, offline: bool, artifact_dir: Path | None = None):
    run_dir = tmp_path / "wandb" / "run-20260101_000000-abc"
    (run_dir / "files").mkdir(parents=True)

    def use_artifact(name):
        assert name == "resume-abc:latest"
        return SimpleNamespace(download=lambda: str(artifact_dir))
    return SimpleNamespace(id="abc", dir=str(run_dir / "files"), resumed=resumed, offline=offline,
                           use_artifact=use_artifact)


def test_a_requeued_run_on_another_box_fetches_its_resume_artifact(tmp_path):
    downloaded = tmp_path / "artifact"
    downloaded.mkdir()
    (downloaded / "resume.ckpt").write_bytes(b"state")
    assert find_resume_checkpoint(fake_run(tmp_path, resumed=True, offline=False, artifact_dir=downloaded)) == \
        downloaded / "resume.ckpt"


def test_a_local_rerun_resumes_from_its_earlier_attempts_last_checkpoint(tmp_path):
    run = fake_run(tmp_path, resumed=False, offline=True)
    assert find_resume_checkpoint(run) is None
    earlier = tmp_path / "wandb" / "offline-run-20250101_000000-abc" / "checkpoints"
    earlier.mkdir(parents=True)
    (earlier / "best.ckpt").write_bytes(b"")  # a best model is not a resume point
    assert find_resume_checkpoint(run) is None
    (earlier / "last.ckpt").write_bytes(b"")
    assert find_resume_checkpoint(run) == earlier / "last.ckpt"
