"""What one fit is made of, the same on every rank of a trial: the data, the system, the Trainer and its
callbacks, among them those that end fit where a request asks (ending.py) and save the state a resume
continues from exactly. train.py runs it on rank 0; ddp.py on ranks 1..N-1."""

import logging
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Checkpoint, EarlyStopping, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy

from cifar_core.checkpoints import BEST, PREEMPT_CHECKPOINT, BestModel, git_commit
from cifar_core.config import TrainConfig
from cifar_core.data import ImageDataModule
from cifar_core.ending import Ending, Request, Requests
from cifar_core.record import Record
from cifar_core.system import ImageClassifier

# Lightning warns that a mid-epoch resume replays the epoch unless the loader has state_dict(); ours
# starts where Lightning's restored loop progress says (data.TensorBatches), so it does not.
warnings.filterwarnings("ignore", "You're resuming from a checkpoint that ended before the epoch ended")
warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\).*")  # Lightning's own deprecated call
# A resumed run writes into a new run folder, so the "last" checkpoint's folder moves; it tracks no best score to
# lose (BestModel keeps the best and restores its own), so Lightning's warning about that is noise in the log.
warnings.filterwarnings("ignore", "The dirpath has changed from")
# Every Trainer advertises Lightning's cloud logger in the trial's log: nothing a user of this program acts on.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: not record.getMessage().startswith("💡 Tip"))


def agreed(trainer: pl.Trainer, reason: Request | None) -> Request | None:
    """The strongest request on any rank (every rank calls this at the same point of fit, so that all act
    alike); `reason` itself on one device."""
    if trainer.world_size == 1:
        return reason
    code = torch.tensor(int(reason or 0), device=trainer.strategy.root_device)
    torch.distributed.all_reduce(code, op=torch.distributed.ReduceOp.MAX)
    return Request(int(code)) if int(code) else None


def end_fit(trainer: pl.Trainer) -> None:
    """Lightning ends fit at its next check: after the current batch, of training or of validation."""
    trainer._signal_connector.received_sigterm = True


class EndFitOnRequest(Checkpoint):
    """Ends fit where each request asks, after saving the full state (`preempt_path`) for a PREEMPT.

    Lightning's own SIGTERM handler would end fit at its next check, in mid-validation too, and the
    checkpoints it leaves there are not ones its loops restart from: the resume skipped that validation and
    EarlyStopping found no val_acc. So on_train_start hands the signals back to the caller's listener
    (`Requests.listen`) and this callback alone raises Lightning's flag. A Checkpoint: Lightning runs it
    after EarlyStopping and ModelCheckpoint at an epoch's end, so the state saved there holds that epoch's
    early-stopping check."""

    def __init__(self, requests: Requests, preempt_path: Path):
        self.requests, self.preempt_path = requests, preempt_path
        # How fit ended, in a state saved after it (its resume only tests and reports); None while fitting.
        self.fit_ended_by: Ending | None = None
        self.saved_at: str | None = None  # where the state was saved, in words

    def save(self, trainer: pl.Trainer, where: str) -> None:
        trainer.save_checkpoint(self.preempt_path)
        self.saved_at = f"{where}, step {trainer.global_step}"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule):
        self.requests.listen()
        # A SIGTERM that came while Lightning's handler was in place counts only as Requests says.
        trainer._signal_connector.received_sigterm = False
        reason = agreed(trainer, self.requests.reason)
        if self.fit_ended_by:
            trainer.should_stop = True
        elif reason not in (None, Request.PREEMPT):  # came before fit: end after the first batch
            end_fit(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int):
        reason = agreed(trainer, self.requests.reason)
        if reason == Request.PREEMPT:
            if batch_idx + 1 < trainer.num_training_batches:  # the last one waits for the epoch's end
                self.save(trainer, f"after batch {batch_idx + 1} of epoch {trainer.current_epoch}")
                end_fit(trainer)
        elif reason is not None:
            end_fit(trainer)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args):
        # On several devices the ranks' shares of validation differ by a batch: they agree at its end instead.
        if trainer.world_size == 1 and self.requests.reason not in (None, Request.PREEMPT):
            end_fit(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule):
        reason = agreed(trainer, self.requests.reason)
        if reason == Request.PREEMPT:
            self.fit_ended_by = Ending.EARLY_STOPPING if trainer.should_stop else None  # it ended fit here
            self.save(trainer, f"at the end of epoch {trainer.current_epoch}")
            end_fit(trainer)
        elif reason is not None:
            end_fit(trainer)

    def state_dict(self) -> dict:
        return {"fit_ended_by": None if self.fit_ended_by is None else self.fit_ended_by.name}

    def load_state_dict(self, state_dict: dict) -> None:
        ended = state_dict["fit_ended_by"]
        self.fit_ended_by = None if ended is None else Ending[ended]


class EndFitOnDivergence(pl.Callback):
    """Ends fit once the training loss is not finite. On the CPU each step is checked; on an accelerator the
    first bad step is kept on the device and read every `every` steps (reading it each step would wait for
    each step to finish), so fit ends up to `every` - 1 steps late, with the step it diverged at exact."""

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
    datamodule: ImageDataModule
    system: ImageClassifier
    trainer: pl.Trainer
    best: BestModel
    early_stopping: EarlyStopping
    ender: EndFitOnRequest
    divergence: EndFitOnDivergence
    clock: FitClock


def make_fit(config: TrainConfig, record: Record, requests: Requests, callbacks: Sequence[pl.Callback],
             checkpoints: Path, devices: int) -> Fit:
    """The data (loaded), the system and the Trainer of a run of `config` on `devices` processes, its checkpoints
    in `checkpoints`, reporting to `record`."""
    datamodule = ImageDataModule(config)
    datamodule.load()  # the classes, before the network is made for them
    system = ImageClassifier(config, len(datamodule.classes))
    best = BestModel(record, checkpoints / BEST, config, len(datamodule.classes),
                     {"monitor": config.monitor, "config": config.model_dump(), "git_commit": git_commit()})
    # The full state each epoch, for a resume after a kill; the best weights are BestModel's.
    last = ModelCheckpoint(dirpath=checkpoints, filename="last", enable_version_counter=False)
    early_stopping = EarlyStopping(monitor=config.monitor, mode=config.monitor_mode,
                                   patience=config.early_stopping_patience)
    clock, divergence = FitClock(), EndFitOnDivergence()
    ender = EndFitOnRequest(requests, checkpoints / PREEMPT_CHECKPOINT)
    # DDP reduces the gradients of the parameters that required them when it wrapped the network; one that stops
    # learning during fit then has none, which it allows only when told.
    strategy = DDPStrategy(find_unused_parameters=system.freezes_parameters) if devices > 1 else "auto"
    trainer = pl.Trainer(
        max_epochs=config.max_epochs,
        limit_train_batches=config.train_batches,
        logger=record.logger,
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
