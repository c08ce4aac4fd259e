"""The LightningModule: loss, metrics and optimiser around a model from model.py."""

import random

import lightning.pytorch as pl
import numpy as np
import torch
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy

from cifar_core.model import build_model


class ImageClassifier(pl.LightningModule):
    def __init__(self, model: str = "seed_cnn", num_classes: int = 10, dropout: float = 0.0, width: int = 64,
                 optimizer: str = "adam", lr: float = 2e-4, weight_decay: float = 0.0,
                 momentum: float = 0.9, nesterov: bool = False, schedule: str = "constant",
                 label_smoothing: float = 0.0, channels_last: bool = False):
        super().__init__()
        # Saved into every checkpoint so it rebuilds without the run's config; kept out of the
        # logger because W&B's run config (set once, by wandb.init) is the record of the run.
        self.save_hyperparameters(logger=False)
        self.network = dict(model=model, num_classes=num_classes, dropout=dropout, width=width)  # rebuilds self.net
        self.net = build_model(**self.network)
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        # One metric object per stage: epoch accuracy over all samples, not a mean of batch means.
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        self.train_acc(logits, y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        self.log("train_acc", self.train_acc, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log("val_acc", self.val_acc, prog_bar=True)

    # No test_step: the one test pass is cifar_core.evaluate, which a SIGTERM cannot abort.

    # Every checkpoint carries the RNG states, so a resumed run draws the same shuffles and
    # augmentations it would have drawn; stored as tensors/tuples so weights_only loading accepts them.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
            "python": random.getstate(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        states = checkpoint.get("rng_states")
        if states is None:
            return
        torch.set_rng_state(states["torch"])
        if states["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])
        kind, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        random.setstate(states["python"])

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum,
                                        nesterov=hp.nesterov and hp.momentum > 0, weight_decay=hp.weight_decay)
        else:
            optimizer_cls = torch.optim.AdamW if hp.optimizer == "adamw" else torch.optim.Adam
            optimizer = optimizer_cls(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.schedule == "constant":
            return optimizer
        steps = int(self.trainer.estimated_stepping_batches)
        if hp.schedule == "onecycle":
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=hp.lr, total_steps=steps,
                                                            pct_start=0.25, anneal_strategy="linear")
        else:  # warmup_cosine: 5% linear warmup, then cosine to zero
            warmup = max(1, steps // 20)
            scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [
                torch.optim.lr_scheduler.LinearLR(optimizer, 1e-3, 1.0, warmup),
                torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, steps - warmup))], [warmup])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
