"""The one typed config: every hyperparameter and run setting, flat.

Field names are the sweep parameter names (`parameters:` in sweeps/*.yaml) and
the `--key=value` flags of `python -m agent run`. Defaults are the seed
tutorial's (Adam, lr 2e-4, batch 32, 45,000/5,000 split, 2 epochs).
"""

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Keys the program logs once per epoch (validation) or once per run (test);
# train_loss/train_acc are logged per step and per epoch as *_step/*_epoch.
MONITORS = {"val_acc": "max", "val_loss": "min"}
LOGGED_METRICS = ("train_loss_step", "train_loss_epoch", "train_acc_step", "train_acc_epoch",
                  "val_loss", "val_acc", "test_loss", "test_acc")
DATA_DIR_ENV = "CIFAR10_DATA_DIR"


def default_data_dir() -> str:
    return os.environ.get(DATA_DIR_ENV) or "data"


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    # data
    # Holds (or receives) cifar-10-batches-py/. Default: $CIFAR10_DATA_DIR, else "data", read when a config
    # is made, so one variable points `agent run`, `agent local` and W&B agents (their trials inherit it)
    # at an existing copy; a flag or a sweep value still wins, and the run's config records the path used.
    data_dir: str = Field(default_factory=default_data_dir)
    dataset: Literal["cifar10", "synthetic"] = "cifar10"  # synthetic: no files, for smoke runs
    val_fraction: float = Field(0.1, gt=0, lt=1)  # 0.1 of 50,000 = the seed's 5,000
    augment: bool = False  # random crop (pad 4) + horizontal flip; the seed had none
    num_workers: int = Field(0, ge=0)  # data lives in memory as tensors: workers rarely help

    # model
    model: Literal["seed_cnn", "resnet9"] = "seed_cnn"  # resnet9: the fast residual net with batch norm
    width: int = Field(64, ge=4)  # resnet9's first-stage channels (64: the original; 16: CPU)
    dropout: float = Field(0.0, ge=0, lt=1)  # before each hidden fc layer; the seed had none
    precision: Literal["32", "bf16-mixed", "16-mixed"] = "32"  # Lightning's; mixed pays on GPUs
    channels_last: bool = False  # NHWC memory layout: faster convolutions on tensor cores
    compile: bool = False  # torch.compile the network: slower start, faster steps

    # optimisation
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd only
    nesterov: bool = False  # sgd only
    schedule: Literal["constant", "onecycle", "warmup_cosine"] = "constant"  # lr over the run's steps
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    batch_size: int = Field(32, ge=1)
    max_epochs: int = Field(2, ge=1)
    # <= 1: a fraction of the epoch; > 1: a number of batches. Not int-vs-float as in Lightning:
    # W&B's config round trip turns 1.0 into 1, which Lightning would read as one batch.
    limit_train_batches: float = Field(1.0, gt=0)

    # selection
    monitor: Literal["val_acc", "val_loss"] = "val_acc"  # early stopping + best checkpoint
    early_stopping_patience: int = Field(3, ge=1)  # epochs without improvement

    # run
    seed: int = 0
    project: str = "cifar10-sweeps"  # W&B project when not set by a sweep or WANDB_PROJECT

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_as_text(cls, v):
        return str(v)  # a YAML `32` is an int

    @field_validator("limit_train_batches")
    @classmethod
    def _whole_batches_above_one(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError("must be a fraction in (0, 1] or a whole number of batches")
        return v

    @property
    def train_batches(self) -> int | float:
        """limit_train_batches as Lightning reads it (int: batches, float: fraction)."""
        return int(self.limit_train_batches) if self.limit_train_batches > 1 else float(self.limit_train_batches)

    @property
    def monitor_mode(self) -> str:
        return MONITORS[self.monitor]
