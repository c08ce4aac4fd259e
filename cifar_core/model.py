"""The networks, as plain nn.Modules: logits out, no training logic."""

import torch
from torch import nn


class SeedCNN(nn.Module):
    """The seed tutorial's CNN: convs 32-32-64-64 (3x3, no padding), two max-pools, fc 512-128-10."""

    def __init__(self, num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3), nn.ReLU(),
            nn.Conv2d(32, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3), nn.ReLU(),
            nn.Conv2d(64, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        )
        # 32 -> 30 -> 28 -> pool 14 -> 12 -> 10 -> pool 5: 64 x 5 x 5 features
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout), nn.Linear(64 * 5 * 5, 512), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(512, 128), nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class Residual(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


class ResNet9(nn.Module):
    """The DAWNBench ResNet-9 (Page, 2018) behind cifar10-airbench: prep, three pooled stages
    (two with a residual pair), max-pool, a linear head scaled by 1/8. `width` 64 is the
    original (GPU); narrower trades accuracy per epoch for speed on a CPU."""

    def __init__(self, num_classes: int = 10, width: int = 64, dropout: float = 0.0):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            conv_bn(3, w),
            conv_bn(w, 2 * w), nn.MaxPool2d(2), Residual(conv_bn(2 * w, 2 * w), conv_bn(2 * w, 2 * w)),
            conv_bn(2 * w, 4 * w), nn.MaxPool2d(2),
            conv_bn(4 * w, 8 * w), nn.MaxPool2d(2), Residual(conv_bn(8 * w, 8 * w), conv_bn(8 * w, 8 * w)),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(8 * w, num_classes, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The 1/8 output scale keeps early logits small, which lets one-cycle use a high peak lr.
        return self.head(self.features(x)) * 0.125


MODELS = ("seed_cnn", "resnet9")


def build_model(model: str, num_classes: int = 10, dropout: float = 0.0, width: int = 64) -> nn.Module:
    """The network named `model`; its arguments are what a checkpoint stores to rebuild it."""
    if model == "seed_cnn":
        return SeedCNN(num_classes, dropout)
    if model == "resnet9":
        return ResNet9(num_classes, width, dropout)
    raise ValueError(f"model: unknown {model!r}; allowed: {', '.join(MODELS)}")
