"""Preemption and resume. As a real process (`python -m agent run` through the session's warm worker, as
under `agent local` and `agent launch`): a notice saves and logs the training state, exits 138, and the same
run id resumes it; Ctrl-C ends a run with its best model logged; a notice in the test pass and a Ctrl-C while
the best model is logged end the run as they must. Each signal lands while the trial is held at the phase the
test targets (tests.helpers.Hold); test_wandb_agent.py sends a stop to a cold run.

In-process, at every phase a notice can land in (the run signals itself from that phase's hook, so the moment
is exact, not timed): the resumed run ends with the weights, the step count and the test metrics of a run that
was never interrupted."""

import os
import signal
import subprocess
import sys
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
    SENT,
    Hold,
    agent_command,
    exit_codes,
    fresh_env,
    history,
    leet_records,
    logged_run,
    model_artifacts,
    offline_env,
    records_of,
    resume_artifact_names,
    run_dirs,
    run_record,
    signalled,
    validated_epochs,
)

BATCHES = 12  # a training epoch of ARGS
ARGS = ("run", "--dataset=synthetic", f"--val_fraction={QUICK_VAL}", "--max_epochs=4",
        f"--limit_train_batches={BATCHES}", "--early_stopping_patience=10")
IN_EPOCH_1 = BATCHES + 5  # the training batch the signals of the first two tests land after: batch 5 of epoch 1


def start(tmp_path: Path, worker, run_id: str, hold: Hold, *extra: str) -> subprocess.Popen:
    return signalled(agent_command(*ARGS, *extra), cwd=tmp_path, env=run_env(tmp_path, worker, run_id, **hold.env),
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_env(tmp_path: Path, worker, run_id: str, **extra: str) -> dict[str, str]:
    return fresh_env(tmp_path, WANDB_RUN_ID=run_id, AGENT_WARM_SOCKET=worker.socket, **extra)


def signal_held(tmp_path: Path, worker, run_id: str, signum: int, hold: Hold, *extra: str) -> tuple[int, str]:
    """`agent run` held by `hold`, sent `signum` there and let go: its exit code and the last line of its stderr
    (what the run says of how it ended)."""
    run = start(tmp_path, worker, run_id, hold, *extra)
    hold.wait(proc=run)
    hold.deliver(lambda: run.send_signal(signum), signum, proc=run)
    stderr = run.communicate(timeout=120)[1]
    return run.returncode, stderr.strip().splitlines()[-1]


@pytest.mark.slow
@WARM
def test_a_preemption_notice_saves_the_state_and_the_same_run_id_resumes_at_that_epoch(tmp_path, warm_worker,
                                                                                         hold_at):
    code, said = signal_held(tmp_path, warm_worker, "preempt01", signal.SIGUSR1, hold_at("train_batch", IN_EPOCH_1))
    assert code == 128 + signal.SIGUSR1, said
    assert said == "agent run: preempted after batch 5 of epoch 1, step 17; state saved"
    [first_dir] = run_dirs(tmp_path, "preempt01")
    assert (first_dir / "checkpoints" / "preempt.ckpt").is_file()
    records = leet_records(first_dir)
    assert validated_epochs(records) == [0]
    assert resume_artifact_names(records) == ["resume-preempt01"]
    assert model_artifacts(records)  # the best model so far, logged as it improved
    assert records_of(records, "preempting")
    assert exit_codes(records) == [128 + signal.SIGUSR1]

    second = subprocess.run(agent_command(*ARGS), cwd=tmp_path, capture_output=True, text=True, timeout=180,
                            env=run_env(tmp_path, warm_worker, "preempt01"))
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"resumed_from={first_dir / 'checkpoints' / 'preempt.ckpt'}" in second.stdout
    records, _ = run_record(tmp_path, "preempt01")
    assert validated_epochs(records) == [1, 2, 3]  # the rest of epoch 1, then the others: none again
    assert "best" in model_artifacts(records)[-1]["aliases"]


# A plain SIGTERM (exit 0) takes the same path: tests/test_wandb_agent.py sends it to a cold run.
@pytest.mark.slow
@WARM
def test_ctrl_c_ends_the_run_with_its_best_model_logged(tmp_path, warm_worker, hold_at):
    code, said = signal_held(tmp_path, warm_worker, "ended01", signal.SIGINT, hold_at("train_batch", IN_EPOCH_1))
    assert (code, said) == (130, "agent run: interrupted; the best model so far is logged")
    records, code = run_record(tmp_path, "ended01")
    assert code == 130 and not records_of(records, "preempting")
    assert validated_epochs(records) == [0]  # fit ended after that batch, not at the epoch's end
    [test_row] = [row for row in history(records) if "test_acc" in row]
    assert test_row["trainer/global_step"] == IN_EPOCH_1
    final = model_artifacts(records)[-1]
    assert set(final["aliases"]) == {"best", "latest"} and "test_acc" in final["metadata"]


# Where these two land is covered in-process: a notice in the test pass (the phase tests below), a stop while
# the tested best is logged (test_stopping.py). As a process each adds what only a process shows: the exit code
# its caller sees (138; a Ctrl-C's 130, where a stop's is 0) and the run log W&B requeues a run by.
@pytest.mark.slow
@WARM
def test_a_notice_in_the_test_pass_exits_138_and_leaves_a_run_to_requeue_with_no_tested_model(tmp_path,
                                                                                             warm_worker, hold_at):
    code, said = signal_held(tmp_path, warm_worker, "intest01", signal.SIGUSR1, hold_at("test"), "--max_epochs=1")
    assert code == 128 + signal.SIGUSR1, said
    assert said == f"agent run: preempted after training, before the end of the test pass, step {BATCHES}; " \
                   "state saved"
    records, code = run_record(tmp_path, "intest01")
    assert code == 128 + signal.SIGUSR1 and records_of(records, "preempting")
    assert resume_artifact_names(records) == ["resume-intest01"]
    [improved] = model_artifacts(records)  # epoch 0's; the tested best is its resume's to log
    assert "test_acc" not in improved["metadata"]


@pytest.mark.slow
@WARM
def test_ctrl_c_while_the_tested_best_is_logged_lets_the_upload_finish_and_exits_130(tmp_path, warm_worker,
                                                                                      hold_at):
    # One epoch: its improvement is the first model logged, the tested best the second.
    code, said = signal_held(tmp_path, warm_worker, "inupload01", signal.SIGINT, hold_at("artifact", 2),
                             "--max_epochs=1")
    assert (code, said) == (130, "agent run: interrupted; the best model so far is logged")
    records, code = run_record(tmp_path, "inupload01")
    assert code == 130 and not records_of(records, "preempting")
    improved, tested = model_artifacts(records)
    assert "test_acc" not in improved["metadata"] and "test_acc" in tested["metadata"]
    assert set(tested["aliases"]) == {"best", "latest"}


def ignored_signals(pid: int) -> set[int]:
    """The signals process `pid` ignores, from the kernel's SigIgn mask."""
    [mask] = [line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
              if line.startswith("SigIgn:")]
    return {s for s in range(1, 65) if int(mask, 16) >> (s - 1) & 1}


def test_a_process_a_test_signals_starts_with_those_signals_at_their_default_whatever_it_inherits():
    """bash starts a background job (`python -m pytest ... &` in a script) with SIGINT ignored, and every process
    the suite starts inherits that. A warm trial's client passes an ignored signal on to its trial on purpose
    (agent/program/handoff.py): the Ctrl-C tests' trials would ignore their Ctrl-C and train to the end. So each
    process a test signals is started by tests.helpers.signalled, with SENT at their default: checked here with
    SIGINT ignored in this process, as in such a job, beside a plain start that keeps the ignore."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        plain = subprocess.Popen([sys.executable, "-c", "input()"], stdin=subprocess.PIPE)
        reset = signalled([sys.executable, "-c", "input()"], stdin=subprocess.PIPE)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        assert signal.SIGINT in ignored_signals(plain.pid)
        assert not ignored_signals(reset.pid) & set(SENT)
    finally:
        for child in (plain, reset):
            child.communicate(b"\n", timeout=60)


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
    records, code = run_record(offline_env["WANDB_DIR"], "late")
    assert code == 0 and not records_of(records, "preempting")
