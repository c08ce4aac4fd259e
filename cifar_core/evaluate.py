"""Test-set evaluation of a trained network, outside Lightning's loops.

train() uses it for the one test pass of the best checkpoint: unlike
`Trainer.test`, a SIGTERM arriving meanwhile (a sweep's stop, a scheduler)
cannot abort it, so a stopped trial still reports and logs its best model.
"""

import torch
from torch import nn
from torch.nn import functional as F

from cifar_core.data import normalize


@torch.inference_mode()
def evaluate(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500,
             num_classes: int = 10) -> dict:
    """uint8 images -> {"test_loss", "test_acc", "per_class_acc": [10 floats]}."""
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    loss_sum, correct, seen = 0.0, torch.zeros(num_classes), torch.zeros(num_classes)
    for start in range(0, len(images), batch_size):
        x = normalize(images[start:start + batch_size].to(device))
        y = labels[start:start + batch_size].to(device)
        logits = net(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        hits = (logits.argmax(-1) == y).cpu()
        correct += torch.bincount(y.cpu()[hits], minlength=num_classes)
        seen += torch.bincount(y.cpu(), minlength=num_classes)
    net.train(was_training)
    return {"test_loss": loss_sum / len(images), "test_acc": (correct.sum() / seen.sum()).item(),
            "per_class_acc": (correct / seen.clamp(min=1)).tolist()}
