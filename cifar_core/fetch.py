"""Data onto a box once, however many processes ask at the same time: the CIFAR-10 and CIFAR-100
archives (DATA_DIR/cifar-10-batches-py, DATA_DIR/cifar-100-python), and the lock that every
once-per-box step takes (the archives, an image folder's decoded cache, pretrained weights).

Standard library only, so that a sweep's data can be fetched before its first trial without
importing torch (cifar_core.data imports this module, not the reverse).
"""

import contextlib
import fcntl
import hashlib
import os
import shutil
import tarfile
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

DATA_DIR_ENV = "CIFAR10_DATA_DIR"  # where every run finds CIFAR when its config names no data_dir
TIMEOUT_S = 20  # per connect and per read: an unreachable server fails a trial in seconds, not minutes


@dataclass(frozen=True)
class Archive:
    name: str  # as people write it: CIFAR-10
    url: str
    md5: str
    file: str  # the archive's name
    folder: str  # what it unpacks to, in DATA_DIR

    @property
    def slug(self) -> str:
        return self.name.lower()


ARCHIVES = {"cifar10": Archive("CIFAR-10", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                               "c58f30108f718f92721af3b95e74349a", "cifar-10-python.tar.gz", "cifar-10-batches-py"),
            "cifar100": Archive("CIFAR-100", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                                "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python.tar.gz", "cifar-100-python")}


class DatasetError(Exception):
    """Data missing, unreachable or not in the expected format: one line naming the file. Where config
    settings would fix it, `fix` is a template naming them ({0}, ...: `settings`), said as flags
    (`--dataset=synthetic`) by str() and as sweep parameters by `in_sweep()`."""

    def __init__(self, problem: str, fix: str = "", settings: tuple[tuple[str, str], ...] = ()):
        self.problem, self.fix, self.settings = problem, fix, settings
        super().__init__(self.render(lambda key, value: f"--{key}={value}"))

    def render(self, setting) -> str:
        fix = self.fix.format(*(setting(key, value) for key, value in self.settings))
        return f"{self.problem}; fix: {fix}" if fix else self.problem

    def in_sweep(self) -> str:
        return self.render(lambda key, value: f"`{key}: {{value: {value}}}` in the sweep's parameters")


@contextlib.contextmanager
def box_lock(folder: Path, name: str) -> Iterator[None]:
    """An exclusive flock on FOLDER/.NAME.lock: processes that make the same thing wait for the first, then
    find it made. Released when the file closes, also when its process dies. Raises OSError if FOLDER
    cannot be made or written."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f".{name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def download_archive(archive: Archive, dest: Path) -> None:
    """Writes `archive` from its URL to `dest`. Raises OSError (urllib.error.URLError, TimeoutError, ...)
    when the server can't be reached, ValueError when the md5 is not the archive's."""
    md5 = hashlib.md5()
    with urllib.request.urlopen(archive.url, timeout=TIMEOUT_S) as response, dest.open("wb") as out:
        while chunk := response.read(1 << 20):
            md5.update(chunk)
            out.write(chunk)
    if md5.hexdigest() != archive.md5:
        raise ValueError(f"md5 mismatch: got {md5.hexdigest()}, expected {archive.md5}")


def fetch(dataset: str, data_dir: str | os.PathLike, download: Callable[[Archive, Path], None] = download_archive
          ) -> Path:
    """The absolute path of DATA_DIR/<the dataset's folder>, downloaded and unpacked there first if absent.

    Call it before training (the DataModule's prepare_data does; `agent local` does, once, before its
    first trial). Present already: returns at once, writes nothing. Absent: under box_lock(DATA_DIR)
    (other processes fetching into the same DATA_DIR wait, then find the folder), downloads with
    `download(archive, path)` into DATA_DIR/.<name>-download.tmp and renames the unpacked folder into
    place, so a half-unpacked folder is never taken for data.

    Raises DatasetError, one line with the path looked at, why it failed and the three fixes, when the
    folder is absent and can't be made (no network, timeout, md5 mismatch, unwritable DATA_DIR). No
    retries: a failure costs one attempt, seconds offline.
    """
    archive = ARCHIVES[dataset]
    data_dir = Path(data_dir).absolute()
    folder = data_dir / archive.folder
    if folder.is_dir():
        return folder
    try:
        with box_lock(data_dir, f"{archive.slug}-download"):
            if not folder.is_dir():
                _download_into(archive, folder, download)
    except OSError as e:
        raise _no_data(archive, folder, f"cannot write there: {_one_line(e)}") from None
    return folder


def _no_data(archive: Archive, folder: Path, reason: str) -> DatasetError:
    return DatasetError(f"{folder}: no {archive.name} data there ({reason})",
                        f"put {archive.folder}/ there (the official python version, {archive.file} "
                        f"unpacked), or point at a folder that holds one ({DATA_DIR_ENV}=DIR or {{0}}), or use {{1}}",
                        (("data_dir", "DIR"), ("dataset", "synthetic")))


def _download_into(archive: Archive, folder: Path, download: Callable[[Archive, Path], None]) -> None:
    work = folder.parent / f".{archive.slug}-download.tmp"
    shutil.rmtree(work, ignore_errors=True)  # a killed download's leftovers: holding the lock, no one else is in it
    try:
        work.mkdir()
        path = work / archive.file
        download(archive, path)
        with tarfile.open(path) as tar:
            tar.extractall(work, filter="data")
        if not (work / archive.folder).is_dir():
            raise ValueError(f"the archive holds no {archive.folder}/")
        (work / archive.folder).rename(folder)
    except Exception as e:  # network, disk, checksum or a broken archive: the same to the user, the same fixes
        raise _no_data(archive, folder, f"download failed: {_one_line(e)}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def default_data_dir() -> str:
    return os.environ.get(DATA_DIR_ENV) or "data"


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())
