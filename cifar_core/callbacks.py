"""ImagePredictionLogger: the seed's custom callback, with class names in the captions."""

import lightning.pytorch as pl
import torch
import wandb
from lightning.pytorch.loggers import WandbLogger

from cifar_core.data import normalize


class ImagePredictionLogger(pl.Callback):
    """At each validation epoch end, logs the same validation images as `examples`,
    captioned "Pred: <class>, Label: <class>". Does nothing without an active W&B run."""

    def __init__(self, num_samples: int = 32):
        super().__init__()
        self.num_samples = num_samples

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule):
        wandb_logger = next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
        if trainer.sanity_checking or wandb_logger is None or wandb.run is None:
            return
        dm = trainer.datamodule
        images, labels = (t[: self.num_samples].cpu() for t in dm.val_set)
        with torch.no_grad():
            preds = pl_module(normalize(images.to(pl_module.device))).argmax(-1).cpu()
        wandb_logger.log_image(
            key="examples",
            images=[img.permute(1, 2, 0).numpy() for img in images],
            caption=[f"Pred: {dm.classes[p]}, Label: {dm.classes[y]}" for p, y in zip(preds, labels)],
            step=trainer.global_step,
        )
