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


def build_model(name: str, num_classes: int = 10, dropout: float = 0.0) -> nn.Module:
    if name == "seed_cnn":
        return SeedCNN(num_classes, dropout)
    raise ValueError(f"model: unknown {name!r}; allowed: seed_cnn")
