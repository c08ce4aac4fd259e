"""The one inference path: uint8 images in, logits out, and the test pass built on it.

`predict` feeds the network (model.Network, which normalises) images as floats in [0, 1], uses its
memory format and precision, runs in eval mode and in batches, and averages over test-time
augmentations (`TTA`). A run's test metrics, its prediction images, `agent best --evaluate` and the
exported model (the same `TTA` around the same Network) all go through it. It runs outside
Lightning's loops, so a stop arriving meanwhile cannot abort it: a stopped trial still reports and
logs its best model; a preemption notice ends it between batches (`between_batches`).
"""

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from cifar_core.config import TrainConfig


def inference(config: TrainConfig) -> dict:
    """How a trained net of this config runs: predict's options (memory format, TTA, precision)."""
    return {"channels_last": config.channels_last, "tta": config.tta, "bf16": config.precision == "bf16-mixed"}


class TTA(nn.Module):
    """Test-time augmentation around a net, on float images. level 0: the net alone; 1: the mean of the
    image and its mirror; 2: half that, half the same over the two diagonal 1-pixel shifts (reflect
    padding): 6 passes. Exportable, so an exported model averages exactly as the test pass did."""

    def __init__(self, net: nn.Module, level: int):
        super().__init__()
        self.net, self.level = net, level

    def mirrored(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.net(x) + self.net(x.flip(-1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.level == 0:
            return self.net(x)
        logits = self.mirrored(x)
        if self.level == 1:
            return logits
        h, w = x.shape[-2], x.shape[-1]
        padded = F.pad(x, [1, 1, 1, 1], mode="reflect")
        shifted = 0.5 * (self.mirrored(padded[:, :, :h, :w]) + self.mirrored(padded[:, :, 2:, 2:]))
        return 0.5 * logits + 0.5 * shifted


@torch.inference_mode()
def predict(net: nn.Module, images, channels_last: bool = False, tta: int = 0, bf16: bool = False,
            batch_size: int = 500, between_batches: Callable[[], None] | None = None) -> torch.Tensor:
    """uint8 N x 3 x H x W (a tensor, or a data.Split) -> float N x classes logits, on the net's device.
    bf16: as bf16-mixed trained. `between_batches` is called before each batch after the first (a
    preemption ends the pass there)."""
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    model = TTA(net, tta)
    logits = []
    for start in range(0, len(images), batch_size):
        if start and between_batches is not None:
            between_batches()
        x = images[start:start + batch_size].to(device).float() / 255
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            logits.append(model(x.contiguous(memory_format=torch.channels_last) if channels_last else x).float())
    net.train(was_training)
    return torch.cat(logits)


def evaluate(net: nn.Module, images, labels: torch.Tensor, num_classes: int = 10,
             channels_last: bool = False, tta: int = 0, bf16: bool = False,
             between_batches: Callable[[], None] | None = None) -> dict:
    """-> {"test_loss", "test_acc", "per_class_acc": [num_classes floats]}."""
    logits = predict(net, images, channels_last, tta, bf16, between_batches=between_batches)
    labels = labels.to(logits.device)
    hits = (logits.argmax(-1) == labels).cpu()
    correct = torch.bincount(labels.cpu()[hits], minlength=num_classes)
    seen = torch.bincount(labels.cpu(), minlength=num_classes)
    return {"test_loss": F.cross_entropy(logits, labels).item(), "test_acc": (correct.sum() / seen.sum()).item(),
            "per_class_acc": (correct / seen.clamp(min=1)).tolist()}
