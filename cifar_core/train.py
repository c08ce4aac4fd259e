"""train(config) -> dict: one training run, from data to a logged best-model artifact.

Fits with EarlyStopping and ModelCheckpoint on `config.monitor`, tests the best
checkpoint once, and logs it as the W&B artifact `model-<run id>` (aliases
`best`, `latest`). Uses the active W&B run when there is one (the agent's, so a
sweep's values stay locked), else starts one with the config.
"""

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import lightning.pytorch as pl
import torch
import wandb
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cifar_core.callbacks import ImagePredictionLogger
from cifar_core.config import TrainConfig
from cifar_core.data import CIFAR10DataModule
from cifar_core.evaluate import evaluate
from cifar_core.system import ImageClassifier


def build_datamodule(config: TrainConfig) -> CIFAR10DataModule:
    return CIFAR10DataModule(data_dir=config.data_dir, dataset=config.dataset, batch_size=config.batch_size,
                             val_fraction=config.val_fraction, augment=config.augment,
                             num_workers=config.num_workers, seed=config.seed)


def build_system(config: TrainConfig, num_classes: int = 10) -> ImageClassifier:
    return ImageClassifier(model=config.model, num_classes=num_classes, dropout=config.dropout,
                           optimizer=config.optimizer, lr=config.lr, weight_decay=config.weight_decay,
                           momentum=config.momentum, nesterov=config.nesterov)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def log_model_artifact(run, path: Path, score: float | None, epoch: int, config: TrainConfig) -> wandb.Artifact:
    artifact = wandb.Artifact(f"model-{run.id}", type="model", metadata={
        config.monitor: score,
        "monitor": config.monitor,
        "epoch": epoch,
        "config": config.model_dump(),
        "git_commit": git_commit(),
    })
    # "immutable": referenced where it lies, inside the run's directory, instead of being
    # copied to ~/.local/share/wandb staging, so a copied run directory still syncs.
    artifact.add_file(str(path), name="model.ckpt", policy="immutable")
    run.log_artifact(artifact, aliases=["best", "latest"])
    return artifact


class SigtermRecorder:
    """Turns SIGTERM into a flag for the whole run. During fit Lightning chains this handler to
    its own, which ends fit at the next batch; afterwards a SIGTERM no longer kills the process
    before the best checkpoint is tested and logged."""

    def __init__(self):
        self.received = False

    def __enter__(self):
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._record)
        return self

    def _record(self, signum, frame):
        self.received = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def train(config: TrainConfig) -> dict:
    pl.seed_everything(config.seed, workers=True, verbose=False)
    owns_run = wandb.run is None
    run = wandb.run or wandb.init(project=os.environ.get("WANDB_PROJECT") or config.project,
                                  config=config.model_dump(), job_type="train")
    datamodule = build_datamodule(config)
    system = build_system(config, num_classes=len(datamodule.classes))
    mode = config.monitor_mode
    checkpoint = ModelCheckpoint(dirpath=Path(run.dir).parent / "checkpoints", filename="epoch={epoch}",
                                 auto_insert_metric_name=False, monitor=config.monitor, mode=mode,
                                 save_top_k=1, save_last=True)
    early_stopping = EarlyStopping(monitor=config.monitor, mode=mode, patience=config.early_stopping_patience)
    trainer = pl.Trainer(
        max_epochs=config.max_epochs,
        limit_train_batches=config.train_batches,
        logger=WandbLogger(experiment=run),
        callbacks=[early_stopping, checkpoint, ImagePredictionLogger()],
        accelerator="auto",
        devices=1,
        log_every_n_steps=10,
        enable_progress_bar=sys.stderr.isatty(),
        enable_model_summary=False,
    )
    with SigtermRecorder() as sigterm:
        try:
            trainer.fit(system, datamodule=datamodule)
        except SIGTERMException:  # a sweep's early stop or a scheduler: keep what was learnt
            pass
        if checkpoint.best_model_path:
            best = Path(checkpoint.best_model_path)
            epoch = int(re.search(r"epoch=(\d+)", best.name).group(1))
            score = float(checkpoint.best_model_score)
            system.load_state_dict(torch.load(best, map_location="cpu", weights_only=True)["state_dict"])
        else:  # stopped before the first validation: the current weights are all there is
            best, epoch, score = Path(checkpoint.dirpath) / "interrupted.ckpt", trainer.current_epoch, None
            trainer.save_checkpoint(best)
        test = evaluate(system.net.to(trainer.strategy.root_device), *datamodule.test_set)
        test.pop("per_class_acc")
        trainer.logger.log_metrics(test, step=trainer.global_step)
        artifact = log_model_artifact(run, best, score, epoch, config)
    result = {
        "run_id": run.id,
        "test_acc": test["test_acc"],
        "test_loss": test["test_loss"],
        f"best_{config.monitor}": artifact.metadata[config.monitor],
        "best_epoch": artifact.metadata["epoch"],
        "epochs": trainer.current_epoch,
        "stopped_early": early_stopping.stopped_epoch > 0,
        "interrupted": sigterm.received,
        "best_checkpoint": str(best),
    }
    if owns_run:
        run.finish()
    return result
