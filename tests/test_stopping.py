"""A stop reaching a run at each phase: it ends at the next batch (or finishes what it is doing), tests the
best weights and logs them; W&B's own stop takes the same path. In-process, as `agent run` runs it
(agent.program.run.logged_run): the run signals itself from the hook of the phase, so the moment is exact,
not timed."""

import os
import signal
import threading

import lightning.pytorch as pl
import pytest
import wandb

import cifar_core.train as train_module
from agent.contract import BY_STOP, COMPLETED, DIVERGED
from agent.program.run import SignalRequests, WandbRecord
from cifar_core.config import TrainConfig
from cifar_core.ending import Request
from tests.helpers import QUICK_VAL, leet_records, leet_summary, logged_run, model_artifacts, run_dir_of

CONFIG = dict(dataset="synthetic", val_fraction=QUICK_VAL, max_epochs=5, limit_train_batches=6,
              early_stopping_patience=10)


@pytest.fixture
def offline(offline_env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    wandb.teardown()


class SignalAt(pl.Callback):
    """Sends `signum` to this process once, from the hook named `hook`, in epoch 1."""

    def __init__(self, hook: str, signum: int = signal.SIGTERM):
        self.signum, self.sent = signum, False
        setattr(self, hook, self.send)

    def send(self, trainer, *args):
        if trainer.current_epoch == 1 and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


@pytest.mark.slow
@pytest.mark.parametrize("hook", ["on_train_batch_start", "on_validation_batch_start"])
def test_a_stop_during_training_or_validation_ends_fit_and_logs_the_tested_best(offline, hook):
    result = logged_run(TrainConfig(**CONFIG), callbacks=[SignalAt(hook)])
    assert result["ended_by"] == BY_STOP and result["epochs"] == 1  # not the 5 it was given
    assert result["best_epoch"] == 0
    [*improvements, final] = model_artifacts(leet_records(run_dir_of(result)))
    assert set(final["aliases"]) == {"best", "latest"} and "test_acc" in final["metadata"]


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["evaluate", "best_model"])
def test_a_stop_during_the_test_or_the_artifact_upload_lets_them_finish(offline, monkeypatch, phase):
    target = train_module if phase == "evaluate" else WandbRecord
    original = getattr(target, phase)
    calls = []

    def signal_first(*args, **kwargs):
        if phase == "evaluate" or "test_acc" in args[-1]:  # the end of the run, not an improvement
            calls.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(target, phase, signal_first)
    result = logged_run(TrainConfig(**{**CONFIG, "max_epochs": 2}))
    assert calls and result["ended_by"] == COMPLETED and result["epochs"] == 2  # training was not cut short
    assert "test_acc" in model_artifacts(leet_records(run_dir_of(result)))[-1]["metadata"]


@pytest.mark.slow
def test_wandbs_own_stop_is_a_stop_not_a_keyboard_interrupt(offline):
    from agent.program.run import logged_run as program_run

    class StopFromWandb(pl.Callback):  # what the SDK's RunStopChecker does: calls stop_fn from its thread
        def on_train_batch_start(self, trainer, *args):
            if trainer.current_epoch == 1 and requests.reason is None:
                thread = threading.Thread(target=requests.wandb_stop)
                thread.start()
                thread.join()

    with SignalRequests() as requests:
        result = program_run(TrainConfig(**CONFIG), requests, [StopFromWandb()])
    assert result["ended_by"] == BY_STOP and result["epochs"] == 1


def test_a_signal_ignored_at_start_stays_ignored_and_the_others_are_listened_for():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a background job of a script, or nohup
    try:
        with SignalRequests() as requests:
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == signal.getsignal(signal.SIGUSR1) == requests._on_signal
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_preemption_is_never_downgraded_by_a_later_stop():
    requests = SignalRequests()
    for reason in (Request.STOP, Request.PREEMPT, Request.STOP, Request.INTERRUPT):
        requests.request(reason)
    assert requests.reason == Request.PREEMPT


@pytest.mark.slow
def test_a_diverging_loss_ends_fit_at_once_and_the_run_says_so(offline):
    result = logged_run(TrainConfig(**{**CONFIG, "optimizer": "sgd", "lr": 1e6}))
    assert result["ended_by"] == DIVERGED and result["epochs"] == 0 and result["steps"] <= 3
    summary = leet_summary(run_dir_of(result))["summary"]
    assert summary["ended_by"] == DIVERGED and summary["diverged_at_step"] == result["steps"] - 1
