"""train(config) -> dict: one training run, from data to a logged best-model artifact.

Fits with EarlyStopping on `config.monitor`; each improvement of the monitored metric is saved
and logged at once as the W&B artifact `model-<run id>` (aliases best, latest). At the end the
best weights are tested once and logged again with their test metrics. Uses the active W&B run
when there is one (the agent's, so a sweep's values stay locked), else starts (and finishes) its
own. Resumes from an earlier attempt's checkpoint when the run id has one (checkpoints.py).

Ending early (cifar_core/stopping.py says which signal asks what): on a stop or an interrupt,
fit ends after the current batch and the best model so far is tested and logged as at the end. On a
preemption the full state is saved where a resume continues exactly as if nothing had happened
(after the current training batch, at the end of the epoch, or after fit: checkpoints.EndFitOnRequest),
logged as `resume-<run id>`, the run is marked preempting and Preempted is raised, so that the run
exits non-zero and W&B requeues it.
"""

import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
import wandb
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cifar_core.checkpoints import (BEST, PREEMPT_CHECKPOINT, BestModel, EndFitOnRequest, checkpoint_dir, end_fit,
                                    find_resume_checkpoint, git_commit, log_resume_artifact)
from cifar_core.config import TrainConfig
from cifar_core.data import ImageDataModule, datamodule_for
from cifar_core.ddp import Ranks, world_size
from cifar_core.evaluate import evaluate, inference
from cifar_core.predictions import log_predictions
from cifar_core.stopping import (COMPLETED, DIVERGED, EARLY_STOPPING, EXIT_CODES, PREEMPT, StopRequests,
                                 completed_exit_code)
from cifar_core.system import ImageClassifier


# Lightning warns that a mid-epoch resume replays the epoch unless the loader has state_dict(); ours
# starts where Lightning's restored loop progress says (data.TensorBatches), so it does not.
warnings.filterwarnings("ignore", "You're resuming from a checkpoint that ended before the epoch ended")
warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\).*")  # Lightning's own deprecated call
# Every Trainer advertises Lightning's cloud logger in the trial's log: nothing a user of this program acts on.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: not record.getMessage().startswith("💡 Tip"))


class Preempted(Exception):
    """A preemption notice ended the run: the state is saved and logged; exit non-zero so W&B requeues it."""


def preempted(run, ender: EndFitOnRequest, message: str) -> Preempted:
    log_resume_artifact(run, ender.preempt_path)
    run.mark_preempting()
    return Preempted(message)


def build_system(config: TrainConfig, num_classes: int = 10) -> ImageClassifier:
    system = ImageClassifier(model=config.model, num_classes=num_classes, dropout=config.dropout,
                             width=config.width, width_mult=config.width_mult, activation=config.activation,
                             bn_momentum=config.bn_momentum, whiten=config.whiten,
                             whiten_bias_epochs=config.whiten_bias_epochs, image_size=config.resolution,
                             drop_path_rate=config.drop_path_rate, pretrained=config.pretrained,
                             pretrained_path=config.pretrained_path, optimizer=config.optimizer, lr=config.lr,
                             weight_decay=config.weight_decay, momentum=config.momentum, nesterov=config.nesterov,
                             bias_lr_scale=config.bias_lr_scale, backbone_lr_scale=config.backbone_lr_scale,
                             freeze_backbone_epochs=config.freeze_backbone_epochs, schedule=config.schedule,
                             label_smoothing=config.label_smoothing, lookahead=config.lookahead,
                             channels_last=config.channels_last)
    if config.compile:
        system.net.compile()  # in place: the state dict keeps its names (torch.compile's wrapper adds _orig_mod.)
    return system


def train(config: TrainConfig, callbacks: Sequence[pl.Callback] = (), requests: StopRequests | None = None) -> dict:
    """One run. `callbacks` are added to the Trainer's (benchmarks and tests hook in there);
    `requests` is what the caller listens with for stops and preemptions (default: train() listens)."""
    if requests is None:
        with StopRequests() as requests:
            return train(config, callbacks, requests)
    if wandb.run is not None:
        return fit_and_test(wandb.run, config, callbacks, requests)
    run = wandb.init(project=config.project, config=config.model_dump(),
                     job_type="train", settings=wandb.Settings(stop_fn=requests.wandb_stop))
    try:
        result = fit_and_test(run, config, callbacks, requests)
    except BaseException as e:
        run.finish(exit_code=EXIT_CODES[PREEMPT] if isinstance(e, Preempted) else 1)
        raise
    run.finish(exit_code=completed_exit_code(requests.reason))
    return result


class EndFitOnDivergence(pl.Callback):
    """Ends fit once the training loss is not finite: every later step would be wasted. On the CPU each
    step is checked; on an accelerator the first bad step is kept on the device and read every `every`
    steps (reading it each step would wait for each step to finish), so fit ends up to `every` - 1
    steps late, with the step it diverged at exact."""

    def __init__(self, every: int = 10):
        self.every = every
        self.first_bad: torch.Tensor | None = None  # the 0-based step whose loss was not finite first, or -1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int):
        loss = outputs["loss"].detach()
        step = trainer.global_step - 1
        first_bad = self.first_bad if self.first_bad is not None else torch.tensor(-1, device=loss.device)
        self.first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
        if loss.device.type != "cpu" and step % self.every:
            return
        if trainer.world_size > 1:  # the first bad step of any rank, on every rank, so that all end alike
            never = torch.iinfo(self.first_bad.dtype).max
            bad = torch.where(self.first_bad < 0, never, self.first_bad)
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MIN)
            self.first_bad = torch.where(bad == never, -1, bad)
        if self.step is not None:
            end_fit(trainer)

    @property
    def step(self) -> int | None:
        return None if self.first_bad is None or self.first_bad < 0 else int(self.first_bad)


class FitClock(pl.Callback):
    """When training could begin (data, model and Trainer ready)."""

    started: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule):
        self.started = time.perf_counter()


@dataclass
class Fit:
    """What one fit is made of, the same on every rank of a trial."""
    datamodule: ImageDataModule
    system: ImageClassifier
    trainer: pl.Trainer
    best: BestModel
    early_stopping: EarlyStopping
    ender: EndFitOnRequest
    divergence: EndFitOnDivergence
    clock: FitClock


def make_fit(config: TrainConfig, run, requests: StopRequests, callbacks: Sequence[pl.Callback], ckpt_dir: Path,
             devices: int) -> Fit:
    """The data (loaded), the system and the Trainer of a run of `config` on `devices` processes; `run` is the
    W&B run (None on ranks above 0, which log nothing)."""
    datamodule = datamodule_for(config)
    datamodule.load()  # the classes, before the network is made for them
    system = build_system(config, num_classes=len(datamodule.classes))
    best = BestModel(run, ckpt_dir / BEST, config.monitor, config.monitor_mode,
                     {"monitor": config.monitor, "config": config.model_dump(), "git_commit": git_commit()})
    # The full state each epoch, for a resume after a kill; the best weights are BestModel's.
    last = ModelCheckpoint(dirpath=ckpt_dir, filename="last", enable_version_counter=False)
    early_stopping = EarlyStopping(monitor=config.monitor, mode=config.monitor_mode,
                                   patience=config.early_stopping_patience)
    clock, divergence = FitClock(), EndFitOnDivergence()
    ender = EndFitOnRequest(requests, ckpt_dir / PREEMPT_CHECKPOINT)
    # DDP reduces the gradients of the parameters that required them when it wrapped the network; one frozen
    # for some epochs (the backbone, airnet's whitening bias) then has none, which it allows only when told.
    freezes = config.freeze_backbone_epochs > 0 or config.model == "airnet"
    strategy = DDPStrategy(find_unused_parameters=freezes) if devices > 1 else "auto"
    trainer = pl.Trainer(
        max_epochs=config.max_epochs,
        limit_train_batches=config.train_batches,
        logger=WandbLogger(experiment=run) if run is not None else False,
        callbacks=[early_stopping, best, last, clock, ender, divergence, *callbacks],
        accelerator="auto",
        devices=devices,
        strategy=strategy,
        precision=config.precision,
        num_sanity_val_steps=0,  # the first real validation comes soon enough; startup is per trial
        log_every_n_steps=10,
        enable_progress_bar=sys.stderr.isatty(),
        enable_model_summary=False,
    )
    return Fit(datamodule, system, trainer, best, early_stopping, ender, divergence, clock)


def fit_and_test(run, config: TrainConfig, callbacks: Sequence[pl.Callback], requests: StopRequests) -> dict:
    pl.seed_everything(config.seed, workers=True, verbose=False)
    began = time.perf_counter()
    devices, ckpt_dir = world_size(config), checkpoint_dir(Path(run.dir).parent)
    datamodule_for(config).prepare_data()
    prepared = time.perf_counter()
    resume_from = find_resume_checkpoint(run)

    def rank_died(message: str) -> None:  # from Ranks' watchdog: rank 0 may be waiting in a collective
        print(message, file=sys.stderr, flush=True)
        run.summary["failed_rank"] = message
        run.finish(exit_code=1)
        os._exit(1)

    with Ranks(config, devices, resume_from, ckpt_dir, rank_died):
        fit = make_fit(config, run, requests, callbacks, ckpt_dir, devices)
        datamodule, system, trainer, best = fit.datamodule, fit.system, fit.trainer, fit.best
        ender, divergence, early_stopping, clock = fit.ender, fit.divergence, fit.early_stopping, fit.clock
        run.summary.update({**datamodule.notes, "model/weights": system.net.weights,
                            "trial/data_s": prepared - began + datamodule.load_seconds})
        print(f"{config.model}: weights from {system.net.weights}", file=sys.stderr, flush=True)
        try:
            # weights_only: a resume checkpoint may come from a W&B artifact, and must not run code
            trainer.fit(system, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
        except SIGTERMException:
            if ender.saved_at:
                raise preempted(run, ender, f"preempted {ender.saved_at}; state saved") from None
    fitted = time.perf_counter()
    ended_by = ender.fit_ended_by or (
        DIVERGED if divergence.step is not None else COMPLETED if trainer.current_epoch >= config.max_epochs
        else EARLY_STOPPING if early_stopping.stopped_epoch else requests.reason or COMPLETED)
    run.summary["ended_by"] = ended_by
    if ended_by == DIVERGED:
        run.summary["diverged_at_step"] = divergence.step

    def unless_preempted(phase: str) -> None:
        """After fit, a preemption notice ends the run before `phase`, with a state whose resume only tests
        and logs (the test pass of a large set need not fit in W&B's kill delay)."""
        if requests.reason == PREEMPT:
            ender.fit_ended_by = ended_by
            ender.save(trainer, f"after training, before {phase}")
            raise preempted(run, ender, f"preempted {ender.saved_at}; state saved")

    unless_preempted("the test pass")
    if best.weights is None:  # ended before the first validation: the current weights are all there is
        best.weights = {k: v.detach().to("cpu", copy=True) for k, v in system.net.state_dict().items()}
        best.epoch = trainer.current_epoch
    system.net.load_state_dict(best.weights)
    test_set = datamodule.test_set
    test = evaluate(system.net, test_set, test_set.labels, num_classes=len(datamodule.classes), **inference(config),
                    between_batches=lambda: unless_preempted("the end of the test pass"))
    test.pop("per_class_acc")
    trainer.logger.log_metrics(test, step=trainer.global_step)
    tested = time.perf_counter()
    unless_preempted("logging")
    log_predictions(trainer.logger, system.net, datamodule.val_set, datamodule.classes, trainer.global_step,
                    **inference(config))
    best.save_and_log(system.network, **test)
    # Where a trial's time goes, beside its metrics (agent/program/run.py adds its start-up).
    run.summary.update({"trial/setup_s": (clock.started or fitted) - began,
                        "trial/fit_s": fitted - (clock.started or fitted), "trial/test_s": tested - fitted,
                        "trial/logging_s": time.perf_counter() - tested})
    return {
        "run_id": run.id,
        "test_acc": test["test_acc"],
        "test_loss": test["test_loss"],
        f"best_{config.monitor}": best.score,
        "best_epoch": best.epoch,
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "resumed_from": str(resume_from) if resume_from else None,
        "ended_by": ended_by,
        "best_checkpoint": str(best.path),
    }
