"""Preemption: SIGTERM mid-epoch saves and logs the training state; the same run id resumes it."""

import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

from cifar_core.checkpoints import find_resume_checkpoint
from tests.conftest import agent_command
from tests.test_local import run_records

ARGS = ("run", "--dataset=synthetic", "--max_epochs=3", "--limit_train_batches=60", "--early_stopping_patience=5")


def test_sigterm_mid_epoch_saves_state_and_the_rerun_resumes_at_that_epoch(offline_env, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_RUN_ID", "preempt01")
    first = subprocess.Popen(agent_command(*ARGS), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob("wandb/offline-run-*/checkpoints/epoch=0.ckpt")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)  # into epoch 1
    first.send_signal(signal.SIGTERM)
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 143, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith("agent run: preempted at epoch 1")
    [first_dir] = tmp_path.glob("wandb/offline-run-*-preempt01")
    assert (first_dir / "checkpoints" / "preempt.ckpt").is_file()
    records = run_records(first_dir)
    [artifact] = [r["artifact"] for r in records if r["type"] == "artifact"]
    assert artifact["name"] == "resume-preempt01" and artifact["type"] == "checkpoint"
    assert any(r["type"] == "preempting" for r in records)
    assert [r["exit"]["exit_code"] for r in records if r["type"] == "exit"] == [143]

    second = subprocess.run(agent_command(*ARGS), cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"resumed_from={first_dir / 'checkpoints' / 'preempt.ckpt'}" in second.stdout
    [second_dir] = set(tmp_path.glob("wandb/offline-run-*-preempt01")) - {first_dir}
    records = run_records(second_dir)
    epochs = [r["history"]["item"]["epoch"] for r in records
              if r["type"] == "history" and "val_acc" in r["history"]["item"]]
    assert epochs == [1, 2]  # continued at the saved epoch, not from epoch 0
    assert any(r["type"] == "artifact" and "best" in r["artifact"]["aliases"] for r in records)


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
    (earlier / "epoch=3.ckpt").write_bytes(b"")  # a best checkpoint is not a resume point
    assert find_resume_checkpoint(run) is None
    (earlier / "last.ckpt").write_bytes(b"")
    assert find_resume_checkpoint(run) == earlier / "last.ckpt"
