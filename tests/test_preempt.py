"""Preemption and resume. As a real process (`python -m agent run` through the session's warm worker, as
under `agent local` and `agent launch`): a notice saves and logs the training state, exits 138, and the same
run id resumes it; Ctrl-C ends a run with its best model logged. Signals are sent once the run's own log shows
the epoch the test waits for; test_wandb_agent.py sends a stop to a cold run.

In-process, at every phase a notice can land in (the run signals itself from that phase's hook, so the moment
is exact, not timed): the resumed run ends with the weights, the step count and the test metrics of a run that
was never interrupted."""

import os
import re
import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import wandb

import cifar_core.train as train_module
from agent.errors import RunEndedEarly
from agent.program.run import WandbRecord, resume_from
from cifar_core.config import TrainConfig
from tests.conftest import WARM
from tests.helpers import (
    QUICK_VAL,
    agent_command,
    fresh_env,
    leet_records,
    logged_run,
    offline_env,
    records_of,
    run_dirs,
    validated,
    validated_epochs,
    wait_for,
)

ARGS = ("run", "--dataset=synthetic", f"--val_fraction={QUICK_VAL}", "--max_epochs=4", "--limit_train_batches=12",
        "--early_stopping_patience=10")


def start(tmp_path: Path, worker, run_id: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(agent_command(*ARGS, *extra), cwd=tmp_path, env=run_env(tmp_path, worker, run_id),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_env(tmp_path: Path, worker, run_id: str) -> dict[str, str]:
    return fresh_env(tmp_path, WANDB_RUN_ID=run_id, AGENT_WARM_SOCKET=worker.socket)


def model_artifacts(records: list[dict]) -> list[dict]:
    return [a for a in records_of(records, "artifact") if a["type"] == "model"]


@pytest.mark.slow
@WARM
def test_a_preemption_notice_saves_the_state_and_the_same_run_id_resumes_at_that_epoch(tmp_path, warm_worker):
    # Epochs to spare before the notice lands (see the Ctrl-C test below); the resume is told ARGS's 4.
    first = start(tmp_path, warm_worker, "preempt01", "--max_epochs=40")
    wait_for(validated(tmp_path, "preempt01", 1), "preempt01's second validation", proc=first)
    first.send_signal(signal.SIGUSR1)
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGUSR1, stderr[-2000:]
    last_line = stderr.strip().splitlines()[-1]
    where = re.fullmatch(r"agent run: preempted (after batch \d+ of|at the end of) epoch (\d+), step \d+; state saved",
                         last_line)
    assert where, last_line
    saved_epoch = int(where[2]) + (where[1] == "at the end of")  # the first epoch the resume validates
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
    epochs = validated_epochs(records)
    assert epochs == list(range(saved_epoch, 4)) and saved_epoch >= 1  # continued at the saved epoch
    assert "best" in model_artifacts(records)[-1]["aliases"]


# A plain SIGTERM (exit 0) takes the same path: tests/test_wandb_agent.py sends it to a cold run.
@pytest.mark.slow
@WARM
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130)])
def test_ctrl_c_ends_the_run_with_its_best_model_logged(tmp_path, warm_worker, signum, code):
    # Epochs enough that the Ctrl-C lands in training however late a loaded box lets the test see epoch 0
    # (a run once ended all 4 of ARGS's first); the Ctrl-C ends the run, so they cost nothing.
    run = start(tmp_path, warm_worker, "ended01", "--max_epochs=40")
    wait_for(validated(tmp_path, "ended01", 0), "ended01's first validation", proc=run)
    run.send_signal(signum)
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == code, stderr[-2000:]
    [run_dir] = run_dirs(tmp_path, "ended01")
    records = leet_records(run_dir)
    assert not records_of(records, "preempting")
    final = model_artifacts(records)[-1]
    assert set(final["aliases"]) == {"best", "latest"} and "test_acc" in final["metadata"]
    epochs = set(validated_epochs(records))
    assert len(epochs) < 40  # it ended early


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
    assert resume_from(fake_run(tmp_path, resumed=True, offline=False, artifact_dir=downloaded)) == \
        downloaded / "resume.ckpt"


def test_a_local_rerun_resumes_from_its_earlier_attempts_last_checkpoint(tmp_path):
    run = fake_run(tmp_path, resumed=False, offline=True)
    assert resume_from(run) is None
    earlier = tmp_path / "wandb" / "offline-run-20250101_000000-abc" / "checkpoints"
    earlier.mkdir(parents=True)
    (earlier / "best.ckpt").write_bytes(b"")  # a best model is not a resume point
    assert resume_from(run) is None
    (earlier / "last.ckpt").write_bytes(b"")
    assert resume_from(run) == earlier / "last.ckpt"


PHASE_CONFIG = TrainConfig(dataset="synthetic", val_fraction=QUICK_VAL, max_epochs=2, limit_train_batches=4,
                           early_stopping_patience=10, augment=True, dropout=0.2)  # draws from the RNG every step
LAST_BATCH = 3  # limit_train_batches - 1


def notice():
    os.kill(os.getpid(), signal.SIGUSR1)


class NoticeAt(pl.Callback):
    """Sends this process a preemption notice once, from `hook`, when `when(trainer, *args)` holds."""

    def __init__(self, hook: str, when):
        self.when, self.sent = when, False
        setattr(self, hook, self.send)

    def send(self, trainer, *args, **kwargs):
        if not self.sent and self.when(trainer, *args):
            self.sent = True
            notice()


def in_epoch_0(trainer, *args):
    return trainer.current_epoch == 0


def notice_during(monkeypatch, target, name: str, when=lambda *a, **kw: True):
    """A notice at the start of `target.name`, the first time `when` holds for its arguments."""
    original = getattr(target, name)
    sent = []

    def noticed(*args, **kwargs):
        if not sent and when(*args, **kwargs):
            sent.append(True)
            notice()
        return original(*args, **kwargs)
    monkeypatch.setattr(target, name, noticed)


PHASES = {  # name: what to install, for the first attempt
    "wandb.init": lambda mp: notice_during(mp, wandb, "init"),
    "setup, before the first batch": lambda mp: NoticeAt("setup", in_epoch_0),
    "the first training batch": lambda mp: NoticeAt("on_train_batch_start", in_epoch_0),
    "the last batch of an epoch": lambda mp: NoticeAt(
        "on_train_batch_start", lambda trainer, module, batch, index: in_epoch_0(trainer) and index == LAST_BATCH),
    "a validation pass": lambda mp: NoticeAt(
        "on_validation_batch_start", lambda trainer, module, batch, index, *_: in_epoch_0(trainer) and index == 1),
    "logging an improved model": lambda mp: notice_during(mp, WandbRecord, "best_model"),
    "the test pass": lambda mp: notice_during(mp, train_module, "evaluate"),
}


def run_once(monkeypatch, run_id: str, callbacks=()) -> dict:
    monkeypatch.setenv("WANDB_RUN_ID", run_id)
    try:
        return logged_run(PHASE_CONFIG, callbacks=list(callbacks))
    finally:
        wandb.teardown()  # the next run reads WANDB_RUN_ID afresh


def final_state(result: dict) -> tuple[dict, dict]:
    checkpoint = torch.load(result["best_checkpoint"], weights_only=True)
    return checkpoint["state_dict"], {k: result[k] for k in ("steps", "epochs", "best_epoch", "test_acc", "test_loss")}


PREEMPT_PHASES = pytest.mark.xdist_group("preempt-phases")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in offline_env(root).items():
            mp.setenv(key, value)
        return final_state(run_once(mp, "straight"))


@pytest.mark.slow
@PREEMPT_PHASES
@pytest.mark.parametrize("phase", PHASES)
def test_a_run_preempted_in_any_phase_resumes_to_the_result_of_an_uninterrupted_one(
        phase, uninterrupted, offline_env, monkeypatch):
    with monkeypatch.context() as mp:
        callback = PHASES[phase](mp)
        with pytest.raises(RunEndedEarly, match=r"preempted (after|at) .*; state saved") as ended:
            run_once(mp, "phased", [callback] if callback else [])
    assert ended.value.exit_code == 128 + signal.SIGUSR1
    [first] = run_dirs(offline_env["WANDB_DIR"], "phased")
    assert (first / "checkpoints" / "preempt.ckpt").is_file()
    resumed = run_once(monkeypatch, "phased")
    assert resumed["resumed_from"] == str(first / "checkpoints" / "preempt.ckpt")
    weights, outcome = final_state(resumed)
    expected_weights, expected_outcome = uninterrupted
    assert outcome == expected_outcome
    assert weights.keys() == expected_weights.keys()
    assert all(torch.equal(weights[k], expected_weights[k]) for k in weights), "the weights differ"


@pytest.mark.slow
@PREEMPT_PHASES
def test_a_notice_after_the_last_artifact_leaves_a_finished_run(offline_env, monkeypatch, uninterrupted):
    notice_during(monkeypatch, WandbRecord, "best_model", when=lambda *a, **kw: "test_acc" in a[-1])
    result = run_once(monkeypatch, "late")
    assert final_state(result)[1] == uninterrupted[1]
    [run_dir] = run_dirs(offline_env["WANDB_DIR"], "late")
    records = leet_records(run_dir)
    assert not records_of(records, "preempting")
    assert [e.get("exit_code", 0) for e in records_of(records, "exit")] == [0]
