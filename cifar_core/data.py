"""CIFAR-10 as in-memory uint8 tensors, batched, normalised and augmented as tensor ops.

The python-format batches are read straight into one uint8 tensor per split:
no per-image PIL decode and no md5 of a local copy, so a re-encoded copy with
other checksums loads. Normalisation and augmentation run on whole batches after
they reach the device (`on_after_batch_transfer`).
"""

import codecs
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from cifar_core.fetch import BATCHES_DIR, DatasetError, fetch_cifar10

TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
CACHE_FILE = "cifar10-uint8.npy"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MEAN, STD = 0.5, 0.5  # the seed's Normalize((0.5,)*3, (0.5,)*3)

# What a pickle may call, by the (module, name) it gives: batches from elsewhere must not run code.
# Numpy's own functions, looked up from numpy, so that pickles written under numpy 1 (numpy.core) and
# numpy 2 (numpy._core) load under either, at any protocol (5 writes arrays with _frombuffer);
# protocols 0-2 from Python 3 write bytes as _codecs.encode(text, 'latin1') or bytes().
_NUMPY = {"multiarray": {"_reconstruct": np.zeros(0).__reduce__()[0], "scalar": np.int64(0).__reduce__()[0]},
          "numeric": {"_frombuffer": np.zeros(1).__reduce_ex__(5)[0]}}
SAFE_GLOBALS = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): codecs.encode,
                ("__builtin__", "bytes"): bytes, ("builtins", "bytes"): bytes,
                **{(f"numpy.{core}.{module}", name): function for core in ("core", "_core")
                   for module, names in _NUMPY.items() for name, function in names.items()}}


class _Refused(pickle.UnpicklingError):
    pass


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in SAFE_GLOBALS:
            raise _Refused(f"{module}.{name}")
        return SAFE_GLOBALS[module, name]


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"{path}: missing (expected a CIFAR-10 python-format batch)")
    try:
        with path.open("rb") as f:
            return _BatchUnpickler(f, encoding="bytes").load()
    except _Refused as e:
        raise DatasetError(f"{path}: refused to load: the pickle wants to run {e}, and a CIFAR-10 batch "
                           f"holds only dicts, lists, bytes, str, ints and numpy arrays") from None
    except Exception as e:  # truncated, not a pickle, wrong protocol: all the same to the user
        raise DatasetError(f"{path}: not a CIFAR-10 python-format batch ({type(e).__name__}: {e})") from None


def read_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One python-format batch file -> (N x 3 x 32 x 32 uint8 images, N int64 labels)."""
    entry = _unpickle(path)
    if not isinstance(entry, dict):
        raise DatasetError(f"{path}: expected a dict with b'data' and b'labels', got {type(entry).__name__}")
    data = entry.get(b"data", entry.get("data"))
    labels = entry.get(b"labels", entry.get("labels"))
    if data is None or labels is None:
        raise DatasetError(f"{path}: expected keys b'data' and b'labels', found {sorted(map(str, entry))}")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DatasetError(f"{path}: expected uint8 data of shape (N, 3072) and N labels, "
                           f"got {data.dtype} {data.shape} and {len(labels)} labels")
    targets = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    if len(targets) and (targets.min() < 0 or targets.max() >= len(CLASSES)):
        raise DatasetError(f"{path}: labels must lie in 0..9")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), targets


def read_class_names(root: Path) -> tuple[str, ...]:
    meta = _unpickle(root / META_FILE)
    names = meta.get(b"label_names", meta.get("label_names")) if isinstance(meta, dict) else None
    if not names or len(names) != len(CLASSES):
        raise DatasetError(f"{root / META_FILE}: expected 'label_names' with {len(CLASSES)} class names")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def read_split(root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [read_batch(root / name) for name in (TRAIN_FILES if train else [TEST_FILE])]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def read_all(root: Path) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(train, test) splits, through the cache file CACHE_FILE beside the batches.

    The cache is one raw uint8 array, a row per image (3,072 pixels + the label), train
    then test: memory-mapped, it loads in a fraction of the time of unpickling 180 MB
    (see bench/speed.py). Rebuilt when a batch file is newer; skipped if DIR is read-only.
    """
    cache = root / CACHE_FILE
    sources = [root / name for name in (*TRAIN_FILES, TEST_FILE)]
    fresh = cache.is_file() and all(s.is_file() and s.stat().st_mtime <= cache.stat().st_mtime for s in sources)
    rows = _load_cache(cache) if fresh else None
    if rows is not None:
        n_train = int.from_bytes(rows[-1, :4].numpy().tobytes(), "little")  # the last row: train count
        rows = rows[:-1]
        images, labels = rows[:, :3072].reshape(-1, 3, 32, 32), rows[:, 3072].long()
        return (images[:n_train], labels[:n_train]), (images[n_train:], labels[n_train:])
    train, test = read_split(root, True), read_split(root, False)
    images, labels = torch.cat([train[0], test[0]]), torch.cat([train[1], test[1]])
    rows = torch.cat([images.reshape(len(images), -1), labels[:, None].to(torch.uint8)], dim=1)
    count_row = torch.zeros(1, rows.shape[1], dtype=torch.uint8)
    count_row[0, :4] = torch.tensor(list(len(train[0]).to_bytes(4, "little")), dtype=torch.uint8)
    try:
        tmp = cache.with_suffix(f".{os.getpid()}.tmp.npy")  # two trials building it at once write apart
        np.save(tmp, torch.cat([rows, count_row]).numpy())
        tmp.replace(cache)
    except OSError:
        pass
    return train, test


def _load_cache(cache: Path) -> torch.Tensor | None:
    try:
        rows = torch.from_numpy(np.load(cache, mmap_mode="c"))
    except (OSError, ValueError):  # cut short (an interrupted copy) or not ours: the batches are the truth
        return None
    return rows if rows.dtype == torch.uint8 and rows.ndim == 2 and rows.shape[1] == 3 * 32 * 32 + 1 else None


def synthetic_splits(seed: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The dataset `synthetic` of a run with `seed`: its 5,000 train and its 1,000 test images and labels."""
    return synthetic_images(5000, seed), synthetic_images(1000, seed + 1)


def synthetic_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable CIFAR-shaped set: each class is a fixed smooth colour pattern plus noise."""
    prototypes = torch.nn.functional.interpolate(
        torch.rand(len(CLASSES), 3, 4, 4, generator=torch.Generator().manual_seed(1234)) * 255,
        size=(32, 32), mode="bilinear", align_corners=False)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(len(CLASSES), (n,), generator=g)
    images = prototypes[labels] + torch.randn(n, 3, 32, 32, generator=g) * 48
    return images.clamp(0, 255).to(torch.uint8), labels


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 N x 3 x H x W -> float, scaled to [0, 1] then normalised as the seed does."""
    return (images.float() / 255 - MEAN) / STD


def augment_batch(x: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, per image, as two gathers
    (rows, then columns; a flip is a reversed column index): no per-image Python."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device)
    rows = (torch.arange(h, device=x.device) + dy).view(n, 1, h, 1).expand(n, c, h, w + 2 * pad)
    cols = torch.arange(w, device=x.device) + dx
    flip = torch.rand(n, 1, device=x.device) < 0.5
    cols = torch.where(flip, cols.flip(-1), cols).view(n, 1, 1, w).expand(n, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """Indices past either edge, mirrored back inside (the edge pixel itself not repeated)."""
    return (n - 1) - ((n - 1) - i.abs()).abs()


def translate_flip_batch(x: torch.Tensor, shift: int, flip: torch.Tensor | None) -> torch.Tensor:
    """Each image moved by up to `shift` pixels each way (reflect padding), then mirrored where `flip`
    (a bool per image) says: two gathers on uint8, as augment_batch, without a padded copy."""
    n, c, h, w = x.shape
    rows = torch.arange(h, device=x.device).expand(n, h)
    cols = torch.arange(w, device=x.device).expand(n, w)
    if shift:
        rows = _reflect(rows + torch.randint(-shift, shift + 1, (n, 1), device=x.device), h)
        cols = _reflect(cols + torch.randint(-shift, shift + 1, (n, 1), device=x.device), w)
    if flip is not None:
        cols = torch.where(flip.view(n, 1), cols.flip(-1), cols)
    return x.gather(2, rows.view(n, 1, h, 1).expand(n, c, h, w)).gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffle of epoch `epoch`: a function of (seed, epoch) alone, drawn from no global generator, so
    a run resumed mid-epoch takes the same order, and so does every process of a run."""
    return torch.randperm(n, generator=torch.Generator().manual_seed((seed << 20) + epoch))


class TensorBatches:
    """Batches of in-memory tensors, each with its images' places in the split (alternating flips need
    them): one order per epoch, then a slice + gather per batch. A DataLoader over the same tensors
    spends most of its time turning index lists into tensors (bench/speed.py).

    `position()` says where an iteration starts: (epoch, batch), read when Lightning starts it; a run
    resumed mid-epoch continues with the batch after the last one it trained. With `num_workers`, worker
    processes gather the batches (the same order)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0,
                 num_workers: int = 0, position: Callable[[], tuple[int, int]] = lambda: (0, 0)):
        self.images, self.labels, self.batch_size, self.shuffle = images, labels, batch_size, shuffle
        self.seed, self.num_workers, self.position = seed, num_workers, position

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self):
        epoch, first = self.position()
        n = len(self.labels)
        order = epoch_order(n, self.seed, epoch) if self.shuffle else torch.arange(n)
        batches = list(order.to(self.images.device).split(self.batch_size))[first:]
        if self.num_workers and not self.images.is_cuda:  # GPU tensors are gathered in place: no workers
            # Workers each gather whole batches (TensorDataset takes a tensor of indices), no collate.
            dataset = TensorDataset(self.images, self.labels, torch.arange(n))
            yield from DataLoader(dataset, sampler=batches, batch_size=None, num_workers=self.num_workers)
            return
        for index in batches:
            yield self.images[index], self.labels[index], index


class CIFAR10DataModule(pl.LightningDataModule):
    """augment: random crop (pad 4, black) and random flip. Else `translate` (pixels, reflect padding)
    and `flip`: random, or alternating (each image flipped at random in the first epoch, then the
    other way round in each next one, so two epochs see both sides of every image)."""

    def __init__(self, data_dir: str = "data", dataset: str = "cifar10", batch_size: int = 32,
                 val_fraction: float = 0.1, augment: bool = False, flip: str = "none", translate: int = 0,
                 num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.data_dir = Path(data_dir)
        self.dataset = dataset
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.augment, self.flip, self.translate = augment, flip, translate
        self.num_workers = num_workers
        self.seed = seed
        self.classes = CLASSES
        self.train_set = self.val_set = self.test_set = None

    @property
    def batches_dir(self) -> Path:
        return self.data_dir / BATCHES_DIR

    def prepare_data(self):
        if self.dataset == "cifar10":
            fetch_cifar10(self.data_dir)

    def setup(self, stage: str | None = None):
        if self.train_set is not None:
            return
        if self.dataset == "synthetic":
            train_full, self.test_set = synthetic_splits(self.seed)
        else:
            self.classes = read_class_names(self.batches_dir)
            train_full, self.test_set = read_all(self.batches_dir)
        n_val = round(len(train_full[0]) * self.val_fraction)
        if not 0 < n_val < len(train_full[0]):
            raise DatasetError(f"val_fraction={self.val_fraction} leaves no train or no val images "
                               f"out of {len(train_full[0])}")
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(train_full[0]), generator=generator)
        self.train_set = tuple(t[order[n_val:]] for t in train_full)
        self.val_set = tuple(t[order[:n_val]] for t in train_full)
        self.first_flips = torch.rand(len(order) - n_val, generator=generator) < 0.5  # alternating flips' start
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        if device.type == "cuda":  # 180 MB of uint8: the whole set lives on the GPU, batches never cross PCIe
            self.train_set, self.val_set, self.test_set = (
                tuple(t.to(device) for t in split) for split in (self.train_set, self.val_set, self.test_set))
            self.first_flips = self.first_flips.to(device)

    def training_position(self) -> tuple[int, int]:
        """Where Lightning's loops are when an epoch's iteration starts: (epoch, batch), the batch past 0
        only when it restarts an epoch from a checkpoint saved in it."""
        if self.trainer is None:
            return 0, 0
        loop = self.trainer.fit_loop
        batch = loop.epoch_loop.batch_progress.current.ready if loop.restarting else 0
        return loop.epoch_progress.current.processed, batch

    def train_dataloader(self):
        return TensorBatches(*self.train_set, self.batch_size, True, self.seed, self.num_workers,
                             self.training_position)

    def val_dataloader(self):
        return TensorBatches(*self.val_set, self.batch_size, False, num_workers=self.num_workers)

    def test_dataloader(self):
        return TensorBatches(*self.test_set, self.batch_size, False, num_workers=self.num_workers)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, labels, index = batch
        if self.trainer is not None and self.trainer.training:  # on uint8: a quarter of the bytes
            if self.augment:
                images = augment_batch(images)
            elif self.flip != "none" or self.translate:
                flip = None
                if self.flip == "random":
                    flip = torch.rand(len(index), device=images.device) < 0.5
                elif self.flip == "alternating":
                    flip = self.first_flips[index.to(self.first_flips.device)] ^ bool(self.trainer.current_epoch % 2)
                images = translate_flip_batch(images, self.translate, flip)
        return normalize(images), labels
