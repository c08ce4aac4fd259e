"""train(config) -> dict: one training run, from data to a logged best-model artifact.

Fits with EarlyStopping and ModelCheckpoint on `config.monitor`, tests the best
checkpoint once, and logs it as the W&B artifact `model-<run id>` (aliases
`best`, `latest`). Uses the active W&B run when there is one (the agent's, so a
sweep's values stay locked), else starts one with the config. Resumes from an
earlier attempt's checkpoint when the run id has one (see checkpoints.py).

On SIGTERM: with AGENT_SIGTERM=stop (the local controller's early stop) it tests
and logs the best checkpoint and returns; otherwise (a scheduler's preemption)
it logs the saved training state as `resume-<run id>`, marks the run preempting
and raises Preempted, so that W&B requeues it.
"""

import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
import wandb
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cifar_core.callbacks import ImagePredictionLogger
from cifar_core.checkpoints import (PreemptionCheckpoint, SigtermRecorder, checkpoint_dir, find_resume_checkpoint,
                                    log_model_artifact, log_resume_artifact)
from cifar_core.config import TrainConfig
from cifar_core.data import CIFAR10DataModule
from cifar_core.evaluate import evaluate
from cifar_core.system import ImageClassifier


class Preempted(Exception):
    """SIGTERM from a scheduler: the state is saved and logged; exit non-zero so W&B requeues the run."""


def build_datamodule(config: TrainConfig) -> CIFAR10DataModule:
    return CIFAR10DataModule(data_dir=config.data_dir, dataset=config.dataset, batch_size=config.batch_size,
                             val_fraction=config.val_fraction, augment=config.augment,
                             num_workers=config.num_workers, seed=config.seed)


def build_system(config: TrainConfig, num_classes: int = 10) -> ImageClassifier:
    system = ImageClassifier(model=config.model, num_classes=num_classes, dropout=config.dropout,
                             width=config.width, optimizer=config.optimizer, lr=config.lr,
                             weight_decay=config.weight_decay, momentum=config.momentum, nesterov=config.nesterov,
                             schedule=config.schedule, label_smoothing=config.label_smoothing,
                             channels_last=config.channels_last)
    if config.compile:
        system.net = torch.compile(system.net)
    return system


def train(config: TrainConfig, callbacks: Sequence[pl.Callback] = ()) -> dict:
    """One run; `callbacks` are added to the Trainer's (benchmarks and tests hook in there)."""
    pl.seed_everything(config.seed, workers=True, verbose=False)
    owns_run = wandb.run is None
    run = wandb.run or wandb.init(project=os.environ.get("WANDB_PROJECT") or config.project,
                                  config=config.model_dump(), job_type="train")
    datamodule = build_datamodule(config)
    system = build_system(config, num_classes=len(datamodule.classes))
    mode = config.monitor_mode
    ckpt_dir = checkpoint_dir(run)
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="epoch={epoch}", auto_insert_metric_name=False,
                                 monitor=config.monitor, mode=mode, save_top_k=1, save_last=True)
    early_stopping = EarlyStopping(monitor=config.monitor, mode=mode, patience=config.early_stopping_patience)
    trainer = pl.Trainer(
        max_epochs=config.max_epochs,
        limit_train_batches=config.train_batches,
        logger=WandbLogger(experiment=run),
        callbacks=[early_stopping, checkpoint, ImagePredictionLogger(), PreemptionCheckpoint(ckpt_dir / "preempt.ckpt"),
                   *callbacks],
        accelerator="auto",
        devices=1,
        precision=config.precision,
        num_sanity_val_steps=0,  # the first real validation comes soon enough; startup is per trial
        log_every_n_steps=10,
        enable_progress_bar=sys.stderr.isatty(),
        enable_model_summary=False,
    )
    resume_from = find_resume_checkpoint(run)
    with SigtermRecorder() as sigterm:
        try:
            trainer.fit(system, datamodule=datamodule, ckpt_path=resume_from)
        except SIGTERMException:
            if os.environ.get("AGENT_SIGTERM") != "stop":
                log_resume_artifact(run, ckpt_dir / "preempt.ckpt")
                run.mark_preempting()
                raise Preempted(f"preempted at epoch {trainer.current_epoch}; state saved") from None
        if checkpoint.best_model_path:
            best = Path(checkpoint.best_model_path)
            epoch = int(re.search(r"epoch=(\d+)", best.name).group(1))
            # None after a resume into a new run directory: Lightning then reloads only the path
            score = None if checkpoint.best_model_score is None else float(checkpoint.best_model_score)
            system.load_state_dict(torch.load(best, map_location="cpu", weights_only=True)["state_dict"])
        else:  # stopped before the first validation: the current weights are all there is
            best, epoch, score = ckpt_dir / "interrupted.ckpt", trainer.current_epoch, None
            trainer.save_checkpoint(best)
        test = evaluate(system.net.to(trainer.strategy.root_device), *datamodule.test_set)
        test.pop("per_class_acc")
        trainer.logger.log_metrics(test, step=trainer.global_step)
        log_model_artifact(run, best, score, epoch, config)
    result = {
        "run_id": run.id,
        "test_acc": test["test_acc"],
        "test_loss": test["test_loss"],
        f"best_{config.monitor}": score,
        "best_epoch": epoch,
        "epochs": trainer.current_epoch,
        "resumed_from": str(resume_from) if resume_from else None,
        "stopped_early": early_stopping.stopped_epoch > 0,
        "interrupted": sigterm.received,
        "best_checkpoint": str(best),
    }
    if owns_run:
        run.finish()
    return result
