"""The LightningModule: loss, metrics, optimiser, schedule and weight averaging around a network from
model.py. Built from the config, as the network and the data are: a new field is read where it is used."""

import random

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy

from cifar_core.config import TrainConfig
from cifar_core.model import create_model


class Lookahead:
    """The speed record's weight averaging: every `every` steps the average moves toward the weights
    and the weights are set to it (batch-norm statistics included). The average's own weight grows as
    0.95**5 * (step / total)**3: none early, strong by the end."""

    def __init__(self, every: int = 5):
        self.every = every
        self.average: dict[str, torch.Tensor] = {}  # empty until the first step, or restored from a checkpoint

    @torch.no_grad()
    def step(self, net: nn.Module, step: int, total: int) -> None:
        if not self.average:  # taken here, not at construction: the whitening layer is set in setup()
            self.average = {k: v.detach().clone() for k, v in net.state_dict().items() if v.is_floating_point()}
        if step % self.every == 0 or step >= total:
            keep = 0.95 ** 5 * (step / total) ** 3 if step < total else 1.0  # the last step ends on the average
            state = net.state_dict()
            for name, average in self.average.items():
                if average.device != state[name].device:  # made before Lightning moved the net to its device
                    self.average[name] = average = average.to(state[name].device)
                average.lerp_(state[name], 1 - keep)
                state[name].copy_(average)


def triangle(step: int, total: int) -> float:
    """The record's schedule, as a multiple of the peak lr: 0.2 up to 1 at 23% of the steps, down to 0.07."""
    peak = max(1, int(0.23 * total))
    if step < peak:
        return 0.2 + 0.8 * step / peak
    return 1 - 0.93 * (step - peak) / max(1, total - peak)


class ImageClassifier(pl.LightningModule):
    """Loss, metrics, optimiser, schedule and weight averaging around the network of `config` (model.py)."""

    def __init__(self, config: TrainConfig, num_classes: int):
        super().__init__()
        self.config, self.num_classes = config, num_classes
        self.net = create_model(config, num_classes)
        if config.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        if config.compile:
            self.net.compile()  # in place: the state dict keeps its names (torch.compile's wrapper adds _orig_mod.)
        self.lookahead = Lookahead() if config.lookahead else None
        # One metric object per stage: epoch accuracy over all samples, not a mean of batch means.
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def setup(self, stage: str) -> None:
        # Before a resumed run's checkpoint is loaded, which then restores what the network set.
        if stage == "fit":
            self.net.prepare(lambda n: self.trainer.datamodule.train_set[:n].to(self.device))

    def backbone_parameters(self) -> list[nn.Parameter]:
        head = {id(p) for p in self.net.head.parameters()}
        return [p for p in self.net.parameters() if id(p) not in head]

    def on_train_epoch_start(self) -> None:
        self.net.at_epoch(self.current_epoch)
        if self.config.freeze_backbone_epochs:  # the head alone first, then all of it
            for p in self.backbone_parameters():
                p.requires_grad_(self.current_epoch >= self.config.freeze_backbone_epochs)

    @property
    def freezes_parameters(self) -> bool:
        """Whether a parameter stops or starts learning during fit: DDP then looks for unused ones each step."""
        return self.config.freeze_backbone_epochs > 0 or self.net.freezes_parameters

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.config.label_smoothing)
        self.train_acc(logits, y)
        self.log("train_loss", loss, on_step=True, on_epoch=True, sync_dist=True)  # over the ranks
        self.log("train_acc", self.train_acc, on_step=True, on_epoch=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.lookahead is not None:
            self.lookahead.step(self.net, self.global_step, int(self.trainer.estimated_stepping_batches))

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True, sync_dist=True)  # over the ranks
        self.log("val_acc", self.val_acc, prog_bar=True)

    # No test_step: the one test pass is cifar_core.evaluate, which a SIGTERM cannot abort.

    # Every checkpoint carries the RNG states (so a resumed run draws the same shuffles and
    # augmentations it would have drawn) and the weight average, stored as tensors/tuples so that
    # weights_only loading accepts them.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
            "python": random.getstate(),
        }
        if self.lookahead is not None:
            checkpoint["lookahead"] = self.lookahead.average

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.lookahead is not None and "lookahead" in checkpoint:
            self.lookahead.average = {k: v.clone() for k, v in checkpoint["lookahead"].items()}
        states = checkpoint.get("rng_states")
        if states is None:
            return
        torch.set_rng_state(states["torch"])
        if states["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])
        kind, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        random.setstate(states["python"])

    def parameter_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """sgd_scaled's units: lr and weight_decay per 1024 examples and independent of momentum, as the
        record states them; batch-norm biases learn bias_lr_scale times faster, with the same decay."""
        batch = self.trainer.datamodule.batch_size * self.trainer.world_size  # the batch one step averages over
        unit = 1024 * (1 + 1 / (1 - self.config.momentum))
        lr = lr * batch / unit  # the learning rate of the mean loss over a batch
        decay = weight_decay * batch / unit  # shrinkage per step at the peak lr; torch multiplies it by lr
        norms = {id(p) for m in self.net.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
        groups = []
        for in_norm, scale in ((True, self.config.bias_lr_scale), (False, 1.0)):
            params = [p for p in self.parameters() if p.requires_grad and (id(p) in norms) == in_norm]
            if params:
                groups.append({"params": params, "lr": lr * scale, "weight_decay": decay / (lr * scale)})
        return groups

    def configure_optimizers(self):
        hp = self.config
        if hp.optimizer == "sgd_scaled":
            optimizer = torch.optim.SGD(self.parameter_groups(hp.lr, hp.weight_decay), momentum=hp.momentum,
                                        nesterov=True)
        else:
            # The backbone at backbone_lr_scale times the head's lr: a pretrained one needs less change.
            head = list(self.net.head.parameters())
            groups = [{"params": self.backbone_parameters(), "lr": hp.lr * hp.backbone_lr_scale},
                      {"params": head, "lr": hp.lr}]
            if hp.optimizer == "sgd":
                optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum,
                                            nesterov=hp.nesterov and hp.momentum > 0, weight_decay=hp.weight_decay)
            else:
                optimizer_cls = torch.optim.AdamW if hp.optimizer == "adamw" else torch.optim.Adam
                optimizer = optimizer_cls(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.schedule == "constant":
            return optimizer
        steps = int(self.trainer.estimated_stepping_batches)
        if hp.schedule == "onecycle":
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                                            total_steps=steps, pct_start=0.25, anneal_strategy="linear")
        elif hp.schedule == "triangle":
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: triangle(step, steps))
        else:  # warmup_cosine: 5% linear warmup, then cosine to zero
            warmup = max(1, steps // 20)
            scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [
                torch.optim.lr_scheduler.LinearLR(optimizer, 1e-3, 1.0, warmup),
                torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, steps - warmup))], [warmup])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
