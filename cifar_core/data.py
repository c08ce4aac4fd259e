"""A dataset's splits as uint8 tensors (in memory, or memory-mapped), batched, and augmented as tensor ops.

Datasets: cifar10 and cifar100 (python format, cifar.py), imagefolder (your images, folder.py: decoded
once per box) and synthetic (generated, for smoke runs). Images stay uint8 until they reach the device,
where `on_after_batch_transfer` augments whole batches (augment.py); the network normalises them
(model.Network), so the same images feed training, the test pass and an exported model.

Splits: CIFAR's val is `val_fraction` of its train split, at random; an image folder's is its val/
folder, else a stratified `val_fraction` of train/. Test is CIFAR's test split, an image folder's test/,
or, with no test/, its val split (the run's summary says which: `data/test_split`). Every split is
seeded by `seed`.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cifar_core.augment import augment_batch, center_crop, resized_crop_flip_batch, translate_flip_batch
from cifar_core.cifar import read_all, read_class_names
from cifar_core.config import TrainConfig
from cifar_core.fetch import ARCHIVES, DatasetError, fetch
from cifar_core.folder import load_folder

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DEVICE_RESIDENT = 4 << 30  # bytes: a dataset up to this lives on the GPU, batches never cross PCIe


@dataclass
class Split:
    """A split: uint8 images N x 3 x H x W and their labels. With `rows`, the split is those rows of
    `images`, which stays as it is: a large memory-mapped folder is never copied."""
    images: torch.Tensor
    labels: torch.Tensor
    rows: torch.Tensor | None = None

    def __post_init__(self):
        if self.rows is not None:
            self.labels = self.labels[self.rows]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index) -> torch.Tensor:
        """Images by position in the split: an int tensor or a slice."""
        rows = self.rows[index] if self.rows is not None else index
        # index_select copies whole images: 20x faster than indexing with a tensor (bench/folder_speed.py)
        return self.images[rows] if isinstance(rows, slice) else self.images.index_select(0, rows)

    def to(self, device: torch.device, moved: dict) -> "Split":
        """On `device`; `moved` holds the images already moved (splits of one folder share them)."""
        if id(self.images) not in moved:
            moved[id(self.images)] = self.images.to(device)
        split = Split(moved[id(self.images)], self.labels.to(device))
        split.rows = None if self.rows is None else self.rows.to(device)
        return split


def synthetic_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable CIFAR-shaped set: each class is a fixed smooth colour pattern plus noise."""
    prototypes = torch.nn.functional.interpolate(
        torch.rand(len(CIFAR10_CLASSES), 3, 4, 4, generator=torch.Generator().manual_seed(1234)) * 255,
        size=(32, 32), mode="bilinear", align_corners=False)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(len(CIFAR10_CLASSES), (n,), generator=g)
    images = prototypes[labels] + torch.randn(n, 3, 32, 32, generator=g) * 48
    return images.clamp(0, 255).to(torch.uint8), labels


def synthetic_splits(seed: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The dataset `synthetic` of a run with `seed`: its 5,000 train and its 1,000 test images and labels."""
    return synthetic_images(5000, seed), synthetic_images(1000, seed + 1)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffle of epoch `epoch`: a function of (seed, epoch) alone, drawn from no global generator, so
    a run resumed mid-epoch takes the same order, and so does every process of a run."""
    return torch.randperm(n, generator=torch.Generator().manual_seed((seed << 20) + epoch))


def stratified_rows(labels: np.ndarray, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train rows, val rows): `fraction` of each class, at random (seeded), to val."""
    generator = np.random.default_rng(seed)
    val = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        val += generator.permutation(rows)[:max(1, round(len(rows) * fraction))].tolist()
    val = np.sort(val)
    return torch.from_numpy(np.setdiff1d(np.arange(len(labels)), val)), torch.from_numpy(val)


class TensorBatches:
    """Batches of a Split, each with its images' places in the split (alternating flips need them): one
    order per epoch, then a slice + gather per batch. A DataLoader over the same tensors spends most of
    its time turning index lists into tensors (bench/speed.py).

    `position()` says where an iteration starts: (epoch, batch), read when Lightning starts it; a run
    resumed mid-epoch continues with the batch after the last one it trained. With `num_workers`, worker
    processes gather the batches (the same order): for a memory-mapped folder, reads overlap training.

    On rank r of a trial on R devices (`shard`), the rank's share of the order: every R-th image from the
    r-th; `even` pads the order with its start so that every rank has as many batches (DDP's steps must
    match, as DistributedSampler pads), else the shares differ by an image at most."""

    def __init__(self, split: Split, batch_size: int, shuffle: bool, seed: int = 0, num_workers: int = 0,
                 position: Callable[[], tuple[int, int]] = lambda: (0, 0), shard: tuple[int, int] = (0, 1),
                 even: bool = False):
        self.split, self.batch_size, self.shuffle = split, batch_size, shuffle
        self.seed, self.num_workers, self.position = seed, num_workers, position
        self.rank, self.ranks, self.even = *shard, even

    def share(self) -> int:
        n = len(self.split)
        return -(-n // self.ranks) if self.even else len(range(self.rank, n, self.ranks))

    def __len__(self) -> int:
        return -(-self.share() // self.batch_size)

    def __iter__(self):
        epoch, first = self.position()
        n = len(self.split)
        order = epoch_order(n, self.seed, epoch) if self.shuffle else torch.arange(n)
        if self.even:
            order = order.repeat(2)[:self.share() * self.ranks]
        order = order[self.rank::self.ranks]
        batches = list(order.to(self.split.labels.device).split(self.batch_size))[first:]
        if self.num_workers and not self.split.labels.is_cuda:  # GPU tensors are gathered in place: no workers
            # Workers each gather whole batches (a dataset indexed by a tensor of positions), no collate.
            yield from DataLoader(_Gather(self.split), sampler=batches, batch_size=None, num_workers=self.num_workers)
            return
        for index in batches:
            yield self.split[index], self.split.labels[index], index


class _Gather(Dataset):
    def __init__(self, split: Split):
        self.split = split

    def __getitem__(self, index):
        return self.split[index], self.split.labels[index], index

    def __len__(self) -> int:
        return len(self.split)


class ImageDataModule(pl.LightningDataModule):
    """The data of a run of `config`. Training augmentation: `augment`, a random-resized-crop (area down to
    `crop_scale`) and flip for an image folder, CIFAR's random crop (pad 4, black) and flip otherwise. Else
    `translate` (pixels, reflect padding) and `flip`: random, or alternating (each image flipped at random in
    the first epoch, then the other way round in each next one, so two epochs see both sides of every image).
    Evaluation: the centre image_size crop."""

    def __init__(self, config: TrainConfig):
        super().__init__()
        self.config, self.data_dir, self.batch_size = config, Path(config.data_dir), config.batch_size
        self.classes: tuple[str, ...] = CIFAR10_CLASSES
        self.notes: dict = {}  # what the run's summary says of its data: split sizes, files left out
        self.load_seconds = 0.0
        self.train_set = self.val_set = self.test_set = None

    def prepare_data(self):
        if self.config.dataset in ARCHIVES:
            fetch(self.config.dataset, self.data_dir)

    def load(self) -> None:
        """The splits, on the CPU; the classes are known after it."""
        if self.train_set is not None:
            return
        began = time.perf_counter()
        config = self.config
        generator = torch.Generator().manual_seed(config.seed)
        if config.dataset == "imagefolder":
            self.train_set, self.val_set, self.test_set = self._folder_splits()
        else:
            if config.dataset == "synthetic":
                (images, labels), test = synthetic_splits(config.seed)
            else:
                root = self.data_dir / ARCHIVES[config.dataset].folder
                self.classes = read_class_names(root, config.dataset)
                (images, labels), test = read_all(root, config.dataset)
            n_val = round(len(labels) * config.val_fraction)
            if not 0 < n_val < len(labels):
                raise DatasetError(f"val_fraction={config.val_fraction} leaves no train or no val images "
                                   f"out of {len(labels)}")
            order = torch.randperm(len(labels), generator=generator)
            self.train_set = Split(images[order[n_val:]], labels[order[n_val:]])
            self.val_set = Split(images[order[:n_val]], labels[order[:n_val]])
            self.test_set = Split(*test)
            self.notes = {"data/test_split": "test"}
        self.first_flips = torch.rand(len(self.train_set), generator=generator) < 0.5  # alternating flips' start
        self.notes.update({f"data/{name}_images": len(split) for name, split in
                           (("train", self.train_set), ("val", self.val_set), ("test", self.test_set))})
        self.load_seconds = time.perf_counter() - began

    def _folder_splits(self) -> tuple[Split, Split, Split]:
        config = self.config
        folder = load_folder(self.data_dir, config.resolution, config.cache_dir)
        self.classes = folder.classes
        images, labels = torch.from_numpy(folder.images), torch.from_numpy(folder.labels)
        evaluated = center_crop(images, config.resolution)
        splits = {name: torch.arange(*rows) for name, rows in folder.splits.items()}
        if "val" in splits:
            train, val = splits["train"], splits["val"]
        else:
            train, val = stratified_rows(folder.labels[splits["train"].numpy()], config.val_fraction, config.seed)
            train, val = splits["train"][train], splits["train"][val]
        test = splits.get("test", val)
        self.notes = {"data/test_split": "test" if "test" in splits else "val (no test/ folder)",
                      "data/skipped_files": len(folder.skipped), "data/ignored_files": folder.ignored}
        return (Split(images if config.augment else evaluated, labels, train), Split(evaluated, labels, val),
                Split(evaluated, labels, test))

    def setup(self, stage: str | None = None):
        self.load()
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        size = self.train_set.images.nelement()
        if device.type == "cuda" and not self.train_set.images.is_cuda and size <= DEVICE_RESIDENT:
            moved = {}
            self.train_set, self.val_set, self.test_set = (s.to(device, moved) for s in
                                                           (self.train_set, self.val_set, self.test_set))
            self.first_flips = self.first_flips.to(device)

    def training_position(self) -> tuple[int, int]:
        """Where Lightning's loops are when an epoch's iteration starts: (epoch, batch), the batch past 0
        only when it restarts an epoch from a checkpoint saved in it."""
        if self.trainer is None:
            return 0, 0
        loop = self.trainer.fit_loop
        batch = loop.epoch_loop.batch_progress.current.ready if loop.restarting else 0
        return loop.epoch_progress.current.processed, batch

    def shard(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)

    def train_dataloader(self):
        return TensorBatches(self.train_set, self.batch_size, True, self.config.seed, self.config.num_workers,
                             self.training_position, self.shard(), even=True)

    def val_dataloader(self):  # each rank its share; the metrics are reduced over the ranks
        return TensorBatches(self.val_set, self.batch_size, False, num_workers=self.config.num_workers,
                             shard=self.shard())

    def test_dataloader(self):
        return TensorBatches(self.test_set, self.batch_size, False, num_workers=self.config.num_workers)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, labels, index = batch
        if self.trainer is None or not self.trainer.training:
            return images, labels
        config = self.config
        if config.augment and config.dataset == "imagefolder":
            images = resized_crop_flip_batch(images, config.resolution, config.crop_scale)
        elif config.augment:  # on uint8: a quarter of the bytes
            images = augment_batch(images)
        if config.flip != "none" or config.translate:
            flip = None
            if config.flip == "random":
                flip = torch.rand(len(index), device=images.device) < 0.5
            elif config.flip == "alternating":
                flip = self.first_flips[index.to(self.first_flips.device)] ^ bool(self.trainer.current_epoch % 2)
            images = translate_flip_batch(images, config.translate, flip)
        return images, labels
