"""train(config) -> dict: one training run, from data to a tested best model.

Fits with EarlyStopping on `config.monitor`; each improvement of the monitored metric is saved and reported at
once (Record.best_model). At the end the best weights are tested once, and the best model's predictions on
some validation images and the tested model are reported. A plain `train(config)` reports nothing and keeps
its checkpoints in ./checkpoints; `agent run` gives it its W&B run's record, requests and folders.

How it ends early is the caller's to ask (`requests`, ending.py): on STOP or INTERRUPT, fit ends after the
current batch and the best model so far is tested and reported as at the end. On PREEMPT the full state is
saved where a resume continues exactly as if nothing had happened, and Preempted is raised. The result says
how training ended (`ended_by`: an ending.Ending).
"""

import sys
import time
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cifar_core.config import TrainConfig
from cifar_core.cost import measure
from cifar_core.data import ImageDataModule
from cifar_core.ddp import Ranks, world_size
from cifar_core.ending import BY_REQUEST, Ending, Preempted, Request, Requests
from cifar_core.evaluate import evaluate, inference
from cifar_core.fit import make_fit
from cifar_core.predictions import shown_examples
from cifar_core.record import Record


def train(config: TrainConfig, record: Record | None = None, requests: Requests | None = None,
          checkpoints: Path = Path("checkpoints"), resume_from: Path | None = None,
          callbacks: Sequence[pl.Callback] = ()) -> dict:
    """One run of `config`: its checkpoints in `checkpoints`, resumed from the full state `resume_from` if
    given, reporting to `record`, ending early as `requests` ask. `callbacks` are added to the Trainer's
    (benchmarks and tests hook in there)."""
    record, requests = record or Record(), requests or Requests()
    pl.seed_everything(config.seed, workers=True, verbose=False)
    began = time.perf_counter()
    devices = world_size(config)
    ImageDataModule(config).prepare_data()
    prepared = time.perf_counter()
    with Ranks(config, devices, resume_from, checkpoints, requests.signals, record.rank_died):
        fit = make_fit(config, record, requests, callbacks, checkpoints, devices)
        datamodule, system, trainer, ender = fit.datamodule, fit.system, fit.trainer, fit.ender
        record.note({**datamodule.notes, "model/weights": system.net.weights,
                     "trial/data_s": prepared - began + datamodule.load_seconds})
        print(f"{config.model}: weights from {system.net.weights}", file=sys.stderr, flush=True)
        record.at("setup")
        try:
            # weights_only: a resume checkpoint may come from a W&B artifact, and must not run code
            trainer.fit(system, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
        except SIGTERMException:
            if ender.saved_at:
                raise preempted(record, ender) from None
    fitted = time.perf_counter()
    ended_by = ender.fit_ended_by or (
        Ending.DIVERGED if fit.divergence.step is not None
        else Ending.COMPLETED if trainer.current_epoch >= config.max_epochs
        else Ending.EARLY_STOPPING if fit.early_stopping.stopped_epoch
        else BY_REQUEST.get(requests.reason, Ending.COMPLETED))

    def unless_preempted(phase: str) -> None:
        """After fit, a PREEMPT ends the run before `phase`, with a state whose resume only tests and reports
        (the test pass of a large set need not fit in W&B's kill delay)."""
        if requests.reason == Request.PREEMPT:
            ender.fit_ended_by = ended_by
            ender.save(trainer, f"after training, before {phase}")
            raise preempted(record, ender)

    unless_preempted("the test pass")
    record.at("test")
    best = fit.best
    if best.weights is None:  # ended before the first validation: the current weights are all there is
        best.weights = {k: v.detach().to("cpu", copy=True) for k, v in system.net.state_dict().items()}
        best.epoch = trainer.current_epoch
    system.net.load_state_dict(best.weights)
    test_set = datamodule.test_set
    test = evaluate(system.net, test_set, test_set.labels, num_classes=len(datamodule.classes), **inference(config),
                    between_batches=lambda: unless_preempted("the end of the test pass"))
    test.pop("per_class_acc")
    if trainer.logger:
        trainer.logger.log_metrics(test, step=trainer.global_step)
    cost = measure(system.net, config)  # the best model's: what serving it costs
    tested = time.perf_counter()
    unless_preempted("logging")
    record.at("logging")
    record.examples(*shown_examples(system.net, datamodule.val_set, datamodule.classes, **inference(config)),
                    trainer.global_step)
    best.save_and_report(**test)
    record.note({"trial/setup_s": (fit.clock.started or fitted) - began,
                 "trial/fit_s": fitted - (fit.clock.started or fitted), "trial/test_s": tested - fitted - cost.seconds,
                 "trial/cost_s": cost.seconds, "trial/logging_s": time.perf_counter() - tested})
    return {
        "test_acc": test["test_acc"],
        "test_loss": test["test_loss"],
        f"best_{config.monitor}": best.score,
        "best_epoch": best.epoch,
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "resumed_from": str(resume_from) if resume_from else None,
        "ended_by": ended_by,
        "diverged_at_step": fit.divergence.step,
        "cost": cost,
        "best_checkpoint": str(best.path),
    }


def preempted(record: Record, ender) -> Preempted:
    record.preempted(ender.preempt_path)
    return Preempted(f"preempted {ender.saved_at}; state saved", ender.preempt_path)
