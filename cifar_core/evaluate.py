"""The one inference path: uint8 images in, logits out, and the test pass built on it.

`predict` normalises as training does, uses the net's memory format, runs in eval mode and in
batches. A run's test metrics, its prediction images and `agent best --evaluate` all go through
it. It runs outside Lightning's loops, so a stop arriving meanwhile cannot abort it: a stopped
trial still reports and logs its best model.
"""

import torch
from torch import nn
from torch.nn import functional as F

from cifar_core.data import normalize


@torch.inference_mode()
def predict(net: nn.Module, images: torch.Tensor, channels_last: bool = False, batch_size: int = 500) -> torch.Tensor:
    """uint8 N x 3 x H x W -> float N x classes logits, on the net's device."""
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    logits = []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start:start + batch_size].to(device))
        logits.append(net(x.contiguous(memory_format=torch.channels_last) if channels_last else x).float())
    net.train(was_training)
    return torch.cat(logits)


def evaluate(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int = 10,
             channels_last: bool = False) -> dict:
    """-> {"test_loss", "test_acc", "per_class_acc": [num_classes floats]}."""
    logits = predict(net, images, channels_last)
    labels = labels.to(logits.device)
    hits = (logits.argmax(-1) == labels).cpu()
    correct = torch.bincount(labels.cpu()[hits], minlength=num_classes)
    seen = torch.bincount(labels.cpu(), minlength=num_classes)
    return {"test_loss": F.cross_entropy(logits, labels).item(), "test_acc": (correct.sum() / seen.sum()).item(),
            "per_class_acc": (correct / seen.clamp(min=1)).tolist()}
