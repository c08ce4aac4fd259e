"""Checkpoints that outlive the process: the best model as it improves, preemption, resume.

In `<run dir>/checkpoints/`:
  best.ckpt     the network alone (weights and what rebuilds it: `save_network` / `load_network`),
                written each time the monitored metric improves and logged at once as the W&B
                artifact `model-<run id>` (aliases best, latest): a run killed later loses nothing.
  last.ckpt     the full training state (optimizer, loop, RNG), each epoch: resume after a kill.
  preempt.ckpt  the full training state where a preemption notice ended fit; logged as the
                artifact `resume-<run id>`.
A run started again with the same run id (W&B requeues a preempted sweep run; the local
controller's --retry-crashed) resumes from the newest preempt.ckpt/last.ckpt of its earlier
attempts, on disk or, after a move to another box, from the `resume-<id>` artifact.
"""

import math
import subprocess
from pathlib import Path

import lightning.pytorch as pl
import torch
import wandb
from lightning.pytorch.callbacks import Checkpoint
from torch import nn

from cifar_core.model import create_model
from cifar_core.stopping import BY_RANK, EARLY_STOPPING, PREEMPT, RANK, StopRequests

BEST = "best.ckpt"
PREEMPT_CHECKPOINT = "preempt.ckpt"
RESUMABLE = (PREEMPT_CHECKPOINT, "last.ckpt")


def checkpoint_dir(run_dir: Path) -> Path:
    """Inside the run's own directory (`Path(run.dir).parent`), so a copied (or synced) run keeps its files."""
    return Path(run_dir) / "checkpoints"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def save_network(path: Path, network: dict, weights: dict, **info) -> None:
    """`network`: create_model's keyword arguments; `weights`: the net's state dict (on the CPU)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"network": network, "state_dict": weights, **info}, tmp)
    tmp.replace(path)  # a reader (or a kill) never sees half a file


def load_network(path: Path) -> tuple[nn.Module, dict]:
    """The network saved by save_network, in eval mode, and the checkpoint's other entries.
    weights_only: a checkpoint from elsewhere (a W&B artifact) cannot run code when loaded."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    net = create_model(**checkpoint.pop("network"))
    net.load_state_dict(checkpoint.pop("state_dict"))
    return net.eval(), checkpoint


def log_model_artifact(run, path: Path, metadata: dict) -> None:
    artifact = wandb.Artifact(f"model-{run.id}", type="model", metadata=metadata)
    # The default policy copies the file into W&B's staging area now, so best.ckpt may be
    # overwritten by the next improvement while an upload of this one is still under way.
    artifact.add_file(str(path), name="model.ckpt")
    run.log_artifact(artifact, aliases=["best", "latest"])


def log_resume_artifact(run, path: Path) -> None:
    artifact = wandb.Artifact(f"resume-{run.id}", type="checkpoint", metadata={"reason": "preempted"})
    # Referenced in place: nothing writes preempt.ckpt again before this process has exited.
    artifact.add_file(str(path), name="resume.ckpt", policy="immutable")
    run.log_artifact(artifact, aliases=["latest"])


def find_resume_checkpoint(run) -> Path | None:
    """The newest resumable checkpoint of an earlier attempt of this run id, or None."""
    current = checkpoint_dir(Path(run.dir).parent)
    local = [p for p in Path(run.dir).parent.parent.glob(f"*run-*-{run.id}/checkpoints/*.ckpt")
             if p.name in RESUMABLE and p.parent != current]
    if local:
        return max(local, key=lambda p: p.stat().st_mtime)
    if run.resumed and not run.offline:  # requeued on another box: fetch what the preempted run logged
        try:
            folder = run.use_artifact(f"resume-{run.id}:latest").download()
        except (wandb.errors.CommError, ValueError):
            return None
        return Path(folder) / "resume.ckpt"
    return None


class BestModel(pl.Callback):
    """Keeps the best weights so far (in memory and as best.ckpt) and logs each improvement as the
    run's model artifact. Its state goes into last.ckpt/preempt.ckpt, so a resumed run on another
    box still knows the best of its earlier attempts."""

    def __init__(self, run, path: Path, monitor: str, mode: str, metadata: dict):
        self.run, self.path, self.monitor, self.mode, self.metadata = run, path, monitor, mode, metadata
        self.score: float | None = None
        self.epoch: int | None = None
        self.weights: dict | None = None

    def improves(self, value: float) -> bool:
        if math.isnan(value):
            return False
        return self.score is None or (value > self.score if self.mode == "max" else value < self.score)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule):
        value = trainer.callback_metrics.get(self.monitor)  # reduced over the ranks of a trial on several devices
        if trainer.sanity_checking or not trainer.is_global_zero or value is None or not self.improves(float(value)):
            return
        self.score, self.epoch = float(value), trainer.current_epoch
        self.weights = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.net.state_dict().items()}
        self.save_and_log(pl_module.network)

    def save_and_log(self, network: dict, **extra) -> None:
        save_network(self.path, network, self.weights, epoch=self.epoch, monitor=self.monitor, score=self.score)
        log_model_artifact(self.run, self.path, {**self.metadata, self.monitor: self.score, "epoch": self.epoch,
                                                 **extra})

    def state_dict(self) -> dict:
        return {"score": self.score, "epoch": self.epoch, "weights": self.weights}

    def load_state_dict(self, state_dict: dict) -> None:
        self.score, self.epoch, self.weights = state_dict["score"], state_dict["epoch"], state_dict["weights"]


def agreed(trainer: pl.Trainer, reason: str | None) -> str | None:
    """The strongest request on any rank of a trial on several devices (every rank calls this at the same
    point of fit, so that all act alike); `reason` itself on one device."""
    if trainer.world_size == 1:
        return reason
    code = torch.tensor(RANK[reason], device=trainer.strategy.root_device)
    torch.distributed.all_reduce(code, op=torch.distributed.ReduceOp.MAX)
    return BY_RANK[int(code)]


def end_fit(trainer: pl.Trainer) -> None:
    """Lightning ends fit at its next check: after the current batch, of training or of validation."""
    trainer._signal_connector.received_sigterm = True


class EndFitOnRequest(Checkpoint):
    """Ends fit where each request asks (stopping.py): a stop or an interrupt after the current batch, of
    training or validation; a preemption only where a resume continues exactly, after saving the full
    state there (preempt.ckpt): after the current training batch, or, for a notice in an epoch's last
    batch or in its validation, at that epoch's end, the validation run to its end first.

    Lightning's own SIGTERM handler would end fit at its next check, in mid-validation too, and the
    checkpoints it leaves there are not ones its loops restart from: the resume skipped that validation
    and EarlyStopping found no val_acc. So from on_train_start SIGTERM goes to StopRequests again and
    this callback alone raises Lightning's flag. A Checkpoint: Lightning runs it after EarlyStopping and
    ModelCheckpoint at an epoch's end, so the state saved there holds that epoch's early-stopping check."""

    def __init__(self, requests: StopRequests, preempt_path: Path):
        self.requests, self.preempt_path = requests, preempt_path
        # How fit ended, in a state saved after it (its resume only tests and logs); None while fitting.
        self.fit_ended_by: str | None = None
        self.saved_at: str | None = None  # where the state was saved, in words

    def save(self, trainer: pl.Trainer, where: str) -> None:
        trainer.save_checkpoint(self.preempt_path)
        self.saved_at = f"{where}, step {trainer.global_step}"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule):
        self.requests.listen()
        # A SIGTERM that came while Lightning's handler was in place counts only as StopRequests says.
        trainer._signal_connector.received_sigterm = False
        reason = agreed(trainer, self.requests.reason)
        if self.fit_ended_by:
            trainer.should_stop = True
        elif reason not in (None, PREEMPT):  # came before fit: end after the first batch
            end_fit(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int):
        reason = agreed(trainer, self.requests.reason)
        if reason == PREEMPT:
            if batch_idx + 1 < trainer.num_training_batches:  # the last one waits for the epoch's end
                self.save(trainer, f"after batch {batch_idx + 1} of epoch {trainer.current_epoch}")
                end_fit(trainer)
        elif reason is not None:
            end_fit(trainer)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args):
        # On several devices the ranks' shares of validation differ by a batch: they agree at its end instead.
        if trainer.world_size == 1 and self.requests.reason not in (None, PREEMPT):
            end_fit(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule):
        reason = agreed(trainer, self.requests.reason)
        if reason == PREEMPT:
            self.fit_ended_by = EARLY_STOPPING if trainer.should_stop else None  # it ended fit at this epoch
            self.save(trainer, f"at the end of epoch {trainer.current_epoch}")
            end_fit(trainer)
        elif reason is not None:
            end_fit(trainer)

    def state_dict(self) -> dict:
        return {"fit_ended_by": self.fit_ended_by}

    def load_state_dict(self, state_dict: dict) -> None:
        self.fit_ended_by = state_dict["fit_ended_by"]
