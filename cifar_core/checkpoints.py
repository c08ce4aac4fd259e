"""Checkpoints that outlive the process: the best-model artifact, preemption, resume.

A run that gets SIGTERM saves `preempt.ckpt` (weights, optimizer, loop state
with the epoch, RNG states) before Lightning tears down. A run started again
with the same run id (W&B requeues a preempted sweep run; the local controller's
--retry-crashed) finds the newest `preempt.ckpt`/`last.ckpt` of its earlier
attempts, on disk or, after a move to another box, as the `resume-<id>` artifact.
"""

import signal
import subprocess
import threading
from pathlib import Path

import lightning.pytorch as pl
import wandb
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cifar_core.config import TrainConfig

RESUMABLE = ("preempt.ckpt", "last.ckpt")


def checkpoint_dir(run) -> Path:
    """Inside the run's own directory, so a copied (or synced) run keeps its files."""
    return Path(run.dir).parent / "checkpoints"


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


def log_resume_artifact(run, path: Path) -> None:
    artifact = wandb.Artifact(f"resume-{run.id}", type="checkpoint", metadata={"reason": "preempted"})
    artifact.add_file(str(path), name="resume.ckpt", policy="immutable")
    run.log_artifact(artifact, aliases=["latest"])


def find_resume_checkpoint(run) -> Path | None:
    """The newest resumable checkpoint of an earlier attempt of this run id, or None."""
    current = checkpoint_dir(run)
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


class PreemptionCheckpoint(pl.Callback):
    """On SIGTERM, saves the full training state before Lightning tears the run down."""

    def __init__(self, path: Path):
        self.path = path

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException):
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.path)


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
