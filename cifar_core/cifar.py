"""CIFAR-10 and CIFAR-100 in their python format, read into uint8 tensors.

The pickled batches are read straight into one uint8 tensor per split: no per-image PIL decode and
no md5 of a local copy, so a re-encoded copy with other checksums loads. The unpickler refuses
anything but the dicts, lists, bytes and numpy arrays a batch holds, so files from elsewhere cannot
run code. A uint8 cache beside the batches is memory-mapped by later trials.
"""

import codecs
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cifar_core.fetch import ARCHIVES, DatasetError

PIXELS = 3 * 32 * 32


@dataclass(frozen=True)
class Layout:
    """Which files of a python-format folder hold what."""
    train: tuple[str, ...]
    test: str
    meta: str
    labels: bytes  # the key of each batch's labels
    names: bytes  # the key of the meta file's class names
    classes: int
    cache: str


LAYOUTS = {"cifar10": Layout(tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta", b"labels",
                             b"label_names", 10, "cifar10-uint8.npy"),
           "cifar100": Layout(("train",), "test", "meta", b"fine_labels", b"fine_label_names", 100,
                              "cifar100-uint8.npy")}

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


def _unpickle(path: Path, what: str) -> dict:
    if not path.is_file():
        raise DatasetError(f"{path}: missing (expected a {what} python-format batch)")
    try:
        with path.open("rb") as f:
            return _BatchUnpickler(f, encoding="bytes").load()
    except _Refused as e:
        raise DatasetError(f"{path}: refused to load: the pickle wants to run {e}, and a {what} batch "
                           f"holds only dicts, lists, bytes, str, ints and numpy arrays") from None
    except Exception as e:  # truncated, not a pickle, wrong protocol: all the same to the user
        raise DatasetError(f"{path}: not a {what} python-format batch ({type(e).__name__}: {e})") from None


def _get(entry: dict, key: bytes):
    return entry.get(key, entry.get(key.decode()))


def read_batch(path: Path, dataset: str = "cifar10") -> tuple[torch.Tensor, torch.Tensor]:
    """One python-format batch file -> (N x 3 x 32 x 32 uint8 images, N int64 labels)."""
    layout, what = LAYOUTS[dataset], ARCHIVES[dataset].name
    entry = _unpickle(path, what)
    key = layout.labels.decode()
    if not isinstance(entry, dict):
        raise DatasetError(f"{path}: expected a dict with b'data' and b'{key}', got {type(entry).__name__}")
    data, labels = _get(entry, b"data"), _get(entry, layout.labels)
    if data is None or labels is None:
        raise DatasetError(f"{path}: expected keys b'data' and b'{key}', found {sorted(map(str, entry))}")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS or len(labels) != len(data):
        raise DatasetError(f"{path}: expected uint8 data of shape (N, {PIXELS}) and N labels, "
                           f"got {data.dtype} {data.shape} and {len(labels)} labels")
    targets = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    if len(targets) and (targets.min() < 0 or targets.max() >= layout.classes):
        raise DatasetError(f"{path}: labels must lie in 0..{layout.classes - 1}")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), targets


def read_class_names(root: Path, dataset: str = "cifar10") -> tuple[str, ...]:
    layout = LAYOUTS[dataset]
    meta = _unpickle(root / layout.meta, ARCHIVES[dataset].name)
    names = _get(meta, layout.names) if isinstance(meta, dict) else None
    if not names or len(names) != layout.classes:
        raise DatasetError(f"{root / layout.meta}: expected '{layout.names.decode()}' with {layout.classes} "
                           "class names")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def read_split(root: Path, train: bool, dataset: str = "cifar10") -> tuple[torch.Tensor, torch.Tensor]:
    layout = LAYOUTS[dataset]
    parts = [read_batch(root / name, dataset) for name in (layout.train if train else [layout.test])]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def read_all(root: Path, dataset: str = "cifar10"
             ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(train, test) splits, through the dataset's cache file beside the batches.

    The cache is one raw uint8 array, a row per image (3,072 pixels + the label), train then test:
    memory-mapped, it loads in a fraction of the time of unpickling 180 MB (see bench/speed.py).
    Rebuilt when a batch file is newer; skipped if DIR is read-only.
    """
    layout = LAYOUTS[dataset]
    cache = root / layout.cache
    sources = [root / name for name in (*layout.train, layout.test)]
    fresh = cache.is_file() and all(s.is_file() and s.stat().st_mtime <= cache.stat().st_mtime for s in sources)
    rows = _load_cache(cache) if fresh else None
    if rows is not None:
        n_train = int.from_bytes(rows[-1, :4].numpy().tobytes(), "little")  # the last row: train count
        rows = rows[:-1]
        images, labels = rows[:, :PIXELS].reshape(-1, 3, 32, 32), rows[:, PIXELS].long()
        return (images[:n_train], labels[:n_train]), (images[n_train:], labels[n_train:])
    train, test = read_split(root, True, dataset), read_split(root, False, dataset)
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
    return rows if rows.dtype == torch.uint8 and rows.ndim == 2 and rows.shape[1] == PIXELS + 1 else None
