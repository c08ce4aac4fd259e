"""The seed tutorial's pipeline, kept faithfully as the baseline for bench/speed.py (only there).

torchvision's CIFAR10 with ToTensor + Normalize(0.5, 0.5) per image through PIL,
random_split 45,000/5,000, DataLoader batch 32, the seed's CNN with log_softmax +
nll_loss, Adam 2e-4. One change: the md5 checks are skipped, since the bundled copy
of CIFAR-10 has other checksums than the official archive.
"""

import os
import pickle

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, random_split
from torchmetrics import Accuracy
from torchvision import transforms
from torchvision.datasets import CIFAR10


class SeedCIFAR10(CIFAR10):
    def _check_integrity(self) -> bool:
        return True

    def _load_meta(self) -> None:  # torchvision's, minus the md5 check
        with open(os.path.join(self.root, self.base_folder, self.meta["filename"]), "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


class SeedDataModule(pl.LightningDataModule):
    def __init__(self, batch_size: int = 32, data_dir: str = "./"):
        super().__init__()
        self.data_dir, self.batch_size = data_dir, batch_size
        self.transform = transforms.Compose([transforms.ToTensor(),
                                             transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])

    def setup(self, stage=None):
        cifar_full = SeedCIFAR10(self.data_dir, train=True, transform=self.transform)
        self.cifar_train, self.cifar_val = random_split(cifar_full, [45000, 5000])
        self.cifar_test = SeedCIFAR10(self.data_dir, train=False, transform=self.transform)

    def train_dataloader(self):
        return DataLoader(self.cifar_train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.cifar_val, batch_size=self.batch_size)

    def test_dataloader(self):
        return DataLoader(self.cifar_test, batch_size=self.batch_size)


class SeedLitModel(pl.LightningModule):
    def __init__(self, num_classes: int = 10, learning_rate: float = 2e-4):
        super().__init__()
        self.learning_rate = learning_rate
        self.conv1, self.conv2 = nn.Conv2d(3, 32, 3, 1), nn.Conv2d(32, 32, 3, 1)
        self.conv3, self.conv4 = nn.Conv2d(32, 64, 3, 1), nn.Conv2d(64, 64, 3, 1)
        self.pool1, self.pool2 = nn.MaxPool2d(2), nn.MaxPool2d(2)
        self.fc1, self.fc2, self.fc3 = nn.Linear(1600, 512), nn.Linear(512, 128), nn.Linear(128, num_classes)
        self.accuracy = Accuracy(task="multiclass", num_classes=num_classes)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = self.pool1(F.relu(self.conv2(x)))
        x = F.relu(self.conv3(x))
        x = self.pool2(F.relu(self.conv4(x)))
        x = x.view(x.size(0), -1)
        x = F.relu(self.fc2(F.relu(self.fc1(x))))
        return F.log_softmax(self.fc3(x), dim=1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.nll_loss(logits, y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        self.log("train_acc", self.accuracy(torch.argmax(logits, 1), y), on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.nll_loss(logits, y))
        self.log("val_acc", self.accuracy(torch.argmax(logits, 1), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("test_loss", F.nll_loss(logits, y))
        self.log("test_acc", self.accuracy(torch.argmax(logits, 1), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.learning_rate)
