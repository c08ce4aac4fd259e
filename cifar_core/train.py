"""train(config) -> dict: one training run, from data to a logged best-model artifact.

Fits with EarlyStopping and ModelCheckpoint on `config.monitor`, tests the best
checkpoint once, and logs it as the W&B artifact `model-<run id>` (aliases
`best`, `latest`). Uses the active W&B run when there is one (the agent's, so a
sweep's values stay locked), else starts one with the config.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import wandb
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger

from cifar_core.callbacks import ImagePredictionLogger
from cifar_core.config import TrainConfig
from cifar_core.data import CIFAR10DataModule
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


def log_best_checkpoint(run, checkpoint: ModelCheckpoint, config: TrainConfig) -> wandb.Artifact:
    path = Path(checkpoint.best_model_path)
    epoch = int(re.search(r"epoch=(\d+)", path.name).group(1))
    score = checkpoint.best_model_score
    artifact = wandb.Artifact(f"model-{run.id}", type="model", metadata={
        config.monitor: None if score is None else float(score),
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
    trainer.fit(system, datamodule=datamodule)
    test = trainer.test(system, datamodule=datamodule, ckpt_path="best", verbose=False)[0]
    artifact = log_best_checkpoint(run, checkpoint, config)
    result = {
        "run_id": run.id,
        "test_acc": test["test_acc"],
        "test_loss": test["test_loss"],
        f"best_{config.monitor}": artifact.metadata[config.monitor],
        "best_epoch": artifact.metadata["epoch"],
        "epochs": trainer.current_epoch,
        "stopped_early": early_stopping.stopped_epoch > 0,
        "best_checkpoint": checkpoint.best_model_path,
    }
    if owns_run:
        run.finish()
    return result
