"""The one typed config: every hyperparameter and run setting, flat.

Field names are the sweep parameter names (`parameters:` in sweeps/*.yaml) and
the `--key=value` flags of `python -m agent run`. Defaults are the seed
tutorial's (Adam, lr 2e-4, batch 32, 45,000/5,000 split, 2 epochs). The fields of
the speed record's techniques (model airnet, sgd_scaled, triangle, lookahead,
flip, translate, tta) default to off where they would change another preset, and
to the record's values where they only shape airnet; bench/speed.py and
sweeps/{cpu,gpu}-fast.yaml hold the presets.
"""

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cifar_core.fetch import default_data_dir


def default_project() -> str:
    """The W&B project of a run, or of a new sweep, that names none."""
    return os.environ.get("WANDB_PROJECT") or "cifar10-sweeps"


# Keys the program logs once per epoch (validation) or once per run (test);
# train_loss/train_acc are logged per step and per epoch as *_step/*_epoch.
MONITORS = {"val_acc": "max", "val_loss": "min"}
LOGGED_METRICS = ("train_loss_step", "train_loss_epoch", "train_acc_step", "train_acc_epoch",
                  "val_loss", "val_acc", "test_loss", "test_acc")
def default_cache_dir() -> str:
    return str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cifar-sweeps")


FOLDER_IMAGE_SIZE = 224  # an image folder's default resolution: what most pretrained networks were trained at


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    # data
    # Holds (or receives) cifar-10-batches-py/. Default: $CIFAR10_DATA_DIR, else "data", read when a config
    # is made, so one variable points `agent run`, `agent local` and W&B agents (their trials inherit it)
    # at an existing copy; a flag or a sweep value still wins, and the run's config records the path used.
    data_dir: str = Field(default_factory=default_data_dir)
    # imagefolder: data_dir holds train/<class>/<image> (and val/, test/); synthetic: no files, for smoke runs
    dataset: Literal["cifar10", "cifar100", "imagefolder", "synthetic"] = "cifar10"
    # training and evaluation resolution of an image folder (default 224); CIFAR's and synthetic's are 32
    image_size: int | None = Field(None, ge=8)
    cache_dir: str = Field(default_factory=default_cache_dir)  # where image folders are decoded, once per box
    val_fraction: float = Field(0.1, gt=0, lt=1)  # 0.1 of 50,000 = the seed's 5,000; an image folder's without val/
    # CIFAR: random crop (pad 4) + horizontal flip, the seed had none; an image folder: random-resized-crop + flip
    augment: bool = False
    crop_scale: float = Field(0.35, gt=0, le=1)  # image folder + augment: the smallest area fraction a crop takes
    flip: Literal["none", "random", "alternating"] = "none"  # alternating: each image both ways every 2 epochs
    translate: int = Field(0, ge=0, le=8)  # pixels each way, reflect padding (the record: 2)
    num_workers: int = Field(0, ge=0)  # data lives in memory as tensors: workers rarely help

    # model
    # resnet9: the fast residual net with batch norm; airnet: the speed record's net (cifar_core/model.py);
    # timm/<name>: any of timm's (timm/resnet18, timm/convnext_nano, timm/vit_tiny_patch16_224, ...)
    model: str = Field("seed_cnn", description="seed_cnn | resnet9 | airnet | timm/<name>")
    pretrained: bool = False  # timm: its pretrained weights, from timm's hub cache (downloaded once per box)
    pretrained_path: str | None = None  # timm, a box with no network: a safetensors or state-dict file
    drop_path_rate: float = Field(0.0, ge=0, lt=1)  # timm: stochastic depth, where the network has it
    width: int = Field(64, ge=4)  # first-stage channels of resnet9 and airnet (64: the originals; 16: a CPU)
    width_mult: int = Field(4, ge=1)  # airnet: its later stages are width * width_mult wide
    activation: Literal["gelu", "relu"] = "gelu"  # airnet; relu is as good and faster on a CPU
    bn_momentum: float = Field(0.4, gt=0, lt=1)  # airnet's batch norm (PyTorch's convention: the new batch's weight)
    whiten: bool = True  # airnet: its first layer set from the data's patch statistics and frozen
    whiten_bias_epochs: float = Field(3.0, ge=0)  # airnet: epochs the whitening layer's bias is trained
    dropout: float = Field(0.0, ge=0, lt=1)  # before each hidden fc layer; the seed had none
    precision: Literal["32", "bf16-mixed", "16-mixed"] = "32"  # Lightning's; mixed pays on GPUs
    # processes of one trial (DDP), each on a GPU of its own, or on the CPU without one; batch_size is per
    # process. Unset: every GPU the trial sees (CUDA_VISIBLE_DEVICES), or one process on a CPU.
    devices: int | None = Field(None, ge=1)
    channels_last: bool = False  # NHWC memory layout: faster convolutions on tensor cores
    compile: bool = False  # torch.compile the network: slower start, faster steps

    # optimisation
    # sgd_scaled: Nesterov SGD in the record's units: lr and weight_decay per 1024 examples and
    # independent of momentum (the record: lr 11.5, weight_decay 0.0153, momentum 0.85)
    optimizer: Literal["adam", "adamw", "sgd", "sgd_scaled"] = "adam"
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd and sgd_scaled
    nesterov: bool = False  # sgd (sgd_scaled always is)
    bias_lr_scale: float = Field(64.0, gt=0)  # sgd_scaled: how much faster batch-norm biases learn
    backbone_lr_scale: float = Field(1.0, gt=0)  # all but the classifier layer learn at lr times this
    freeze_backbone_epochs: int = Field(0, ge=0)  # the classifier layer alone for the first epochs
    # lr over the run's steps; triangle: the record's, 0.2 -> 1 at 23% -> 0.07 of lr
    schedule: Literal["constant", "onecycle", "warmup_cosine", "triangle"] = "constant"
    lookahead: bool = False  # the record's average of the weights, pulled back into them every 5 steps
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    batch_size: int = Field(32, ge=1)
    max_epochs: int = Field(2, ge=1)
    # <= 1: a fraction of the epoch; > 1: a number of batches. Not int-vs-float as in Lightning:
    # W&B's config round trip turns 1.0 into 1, which Lightning would read as one batch.
    limit_train_batches: float = Field(1.0, gt=0)

    # evaluation
    tta: int = Field(0, ge=0, le=2)  # test-time augmentation of the test pass: 1 + mirror, 2 + two shifted copies
    latency_batch: int = Field(64, ge=1)  # the batch a trial's latency_ms_batch is measured at (cost.py)

    # selection
    monitor: Literal["val_acc", "val_loss"] = "val_acc"  # early stopping + best checkpoint
    early_stopping_patience: int = Field(3, ge=1)  # epochs without improvement

    # run
    seed: int = 0
    project: str = Field(default_factory=default_project)  # W&B's agent sets WANDB_PROJECT to the sweep's

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

    @field_validator("model")
    @classmethod
    def _a_network(cls, v: str) -> str:
        from cifar_core.model import unknown_model  # imports timm only for a timm/ name

        if problem := unknown_model(v):
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.augment and (self.flip != "none" or self.translate):
            raise ValueError("augment (crop and random flip) and flip/translate are two augmentations: choose one")
        if self.image_size not in (None, 32) and self.dataset != "imagefolder":
            raise ValueError(f"image_size={self.image_size}: {self.dataset} images are 32x32; other sizes need "
                             "dataset=imagefolder")
        timm_only = [k for k, unset in (("pretrained", False), ("pretrained_path", None), ("drop_path_rate", 0))
                     if getattr(self, k) != unset]
        if timm_only and not self.model.startswith("timm/"):
            raise ValueError(f"{timm_only[0]}: only timm's networks have it (model=timm/<name>)")
        if self.backbone_lr_scale != 1 and self.optimizer == "sgd_scaled":
            raise ValueError("backbone_lr_scale: sgd_scaled sets its own parameter groups; use adamw, adam or sgd")
        return self

    @property
    def resolution(self) -> int:
        """The side of the images the network sees."""
        return self.image_size or (FOLDER_IMAGE_SIZE if self.dataset == "imagefolder" else 32)

    @property
    def train_batches(self) -> int | float:
        """limit_train_batches as Lightning reads it (int: batches, float: fraction)."""
        return int(self.limit_train_batches) if self.limit_train_batches > 1 else float(self.limit_train_batches)

    @property
    def monitor_mode(self) -> str:
        return MONITORS[self.monitor]
