"""Checkpoints that outlive the process, in a run's checkpoints folder (`checkpoint_dir`), and rebuilding from them.

  best.ckpt     the network alone (its weights and the config that rebuilds it: `save_network`, beside
                `load_network`), written each time the monitored metric improves and reported at once
                (Record.best_model): a run killed later loses nothing.
  last.ckpt     the full training state (optimizer, loops, RNG), each epoch: a resume after a kill.
  preempt.ckpt  the full training state where a PREEMPT request ended fit (ending.py).

A run started again under the same id resumes from the newest preempt.ckpt/last.ckpt of its earlier attempts
(`resumable`), or from one its caller fetched (a W&B artifact, after a move to another box).
"""

import math
import subprocess
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

from cifar_core.config import TrainConfig
from cifar_core.model import create_model
from cifar_core.record import Record

BEST = "best.ckpt"
PREEMPT_CHECKPOINT = "preempt.ckpt"
RESUMABLE = (PREEMPT_CHECKPOINT, "last.ckpt")


def checkpoint_dir(run_dir: Path) -> Path:
    """Inside the run's own folder, so that a copied (or synced) run keeps its files."""
    return Path(run_dir) / "checkpoints"


def resumable(earlier_run_dirs: list[Path]) -> Path | None:
    """The newest resumable checkpoint in the folders of a run's earlier attempts, or None."""
    found = [checkpoint_dir(d) / name for d in earlier_run_dirs for name in RESUMABLE]
    return max((p for p in found if p.is_file()), key=lambda p: p.stat().st_mtime, default=None)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def save_network(path: Path, config: TrainConfig, num_classes: int, weights: dict, **info) -> None:
    """The network of `config` for `num_classes` classes, its state dict `weights` (on the CPU)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    network = {"config": config.model_dump(), "num_classes": num_classes}
    torch.save({"network": network, "state_dict": weights, **info}, tmp)
    tmp.replace(path)  # a reader (or a kill) never sees half a file


def load_network(path: Path) -> tuple[nn.Module, TrainConfig, dict]:
    """The network saved by save_network, in eval mode, its config and the checkpoint's other entries.
    weights_only: a checkpoint from elsewhere (a W&B artifact) cannot run code when loaded."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    network = checkpoint.pop("network")
    config = TrainConfig(**{k: v for k, v in network["config"].items() if k in TrainConfig.model_fields})
    net = create_model(config, network["num_classes"], pretrained=False)  # the weights are the checkpoint's
    net.load_state_dict(checkpoint.pop("state_dict"))
    return net.eval(), config, checkpoint


class BestModel(pl.Callback):
    """Keeps the best weights so far (in memory and as best.ckpt) and reports each improvement (Record.best_model).
    Its state goes into last.ckpt/preempt.ckpt, so a resumed run on another box still knows the best of its
    earlier attempts."""

    def __init__(self, record: Record, path: Path, config: TrainConfig, num_classes: int, metadata: dict):
        self.record, self.path, self.metadata = record, path, metadata
        self.config, self.num_classes = config, num_classes
        self.score: float | None = None
        self.epoch: int | None = None
        self.weights: dict | None = None

    def improves(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.score is None:
            return True
        return value > self.score if self.config.monitor_mode == "max" else value < self.score

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule):
        value = trainer.callback_metrics.get(self.config.monitor)  # reduced over the ranks of a trial
        if trainer.sanity_checking or not trainer.is_global_zero or value is None or not self.improves(float(value)):
            return
        self.score, self.epoch = float(value), trainer.current_epoch
        self.weights = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.net.state_dict().items()}
        self.save_and_report()

    def save_and_report(self, **extra) -> None:
        monitor = self.config.monitor
        save_network(self.path, self.config, self.num_classes, self.weights, epoch=self.epoch, monitor=monitor,
                     score=self.score)
        self.record.best_model(self.path, {**self.metadata, monitor: self.score, "epoch": self.epoch, **extra})

    def state_dict(self) -> dict:
        return {"score": self.score, "epoch": self.epoch, "weights": self.weights}

    def load_state_dict(self, state_dict: dict) -> None:
        self.score, self.epoch, self.weights = state_dict["score"], state_dict["epoch"], state_dict["weights"]
