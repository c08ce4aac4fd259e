"""CIFAR-10 onto a box: DATA_DIR/cifar-10-batches-py, downloaded at most once however many
processes ask at the same time.

Standard library only, so a controller can fetch once before its first trial without
importing torch (cifar_core.data imports this module, not the reverse).
"""

import fcntl
import hashlib
import os
import shutil
import tarfile
import urllib.request
from collections.abc import Callable
from pathlib import Path

from cifar_core.config import DATA_DIR_ENV

ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
BATCHES_DIR = "cifar-10-batches-py"
LOCK_FILE = ".cifar-10-download.lock"
WORK_DIR = ".cifar-10-download.tmp"
TIMEOUT_S = 20  # per connect and per read: an unreachable server fails a trial in seconds, not minutes


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


def download_archive(dest: Path) -> None:
    """Writes cifar-10-python.tar.gz from ARCHIVE_URL to `dest`. Raises OSError (urllib.error.URLError,
    TimeoutError, ...) when the server can't be reached, ValueError when the md5 is not ARCHIVE_MD5."""
    md5 = hashlib.md5()
    with urllib.request.urlopen(ARCHIVE_URL, timeout=TIMEOUT_S) as response, dest.open("wb") as out:
        while chunk := response.read(1 << 20):
            md5.update(chunk)
            out.write(chunk)
    if md5.hexdigest() != ARCHIVE_MD5:
        raise ValueError(f"md5 mismatch: got {md5.hexdigest()}, expected {ARCHIVE_MD5}")


def fetch_cifar10(data_dir: str | os.PathLike, download: Callable[[Path], None] = download_archive) -> Path:
    """The absolute path of DATA_DIR/cifar-10-batches-py, downloaded and unpacked there first if absent.

    Call it before training (the DataModule's prepare_data does; a controller may, once, before it
    starts trials). Present already: returns at once, writes nothing. Absent: takes an exclusive
    flock on DATA_DIR/.cifar-10-download.lock (other processes fetching the same DATA_DIR wait for
    it, then find the folder), downloads with `download(archive_path)` into DATA_DIR/.cifar-10-download.tmp
    and renames the unpacked folder into place, so a half-unpacked folder is never taken for data.

    Raises DatasetError, one line with the path looked at, why it failed and the three fixes, when
    the folder is absent and can't be made (no network, timeout, md5 mismatch, unwritable DATA_DIR).
    No retries: a failure costs one attempt, seconds offline.
    """
    data_dir = Path(data_dir).absolute()
    batches = data_dir / BATCHES_DIR
    if batches.is_dir():
        return batches
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        lock = (data_dir / LOCK_FILE).open("a")
    except OSError as e:
        raise _no_data(batches, f"cannot write there: {_one_line(e)}") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when the process dies
        if not batches.is_dir():
            _download_into(batches, download)
    return batches


def _no_data(batches: Path, reason: str) -> DatasetError:
    return DatasetError(f"{batches}: no CIFAR-10 data there ({reason})",
                        f"put {BATCHES_DIR}/ there (the official python version, cifar-10-python.tar.gz unpacked), "
                        f"or point at a folder that holds one ({DATA_DIR_ENV}=DIR or {{0}}), or use {{1}}",
                        (("data_dir", "DIR"), ("dataset", "synthetic")))


def _download_into(batches: Path, download: Callable[[Path], None]) -> None:
    work = batches.parent / WORK_DIR
    shutil.rmtree(work, ignore_errors=True)  # a killed download's leftovers: holding the lock, no one else is in it
    try:
        work.mkdir()
        archive = work / "cifar-10-python.tar.gz"
        download(archive)
        with tarfile.open(archive) as tar:
            tar.extractall(work, filter="data")
        if not (work / BATCHES_DIR).is_dir():
            raise ValueError(f"the archive holds no {BATCHES_DIR}/")
        (work / BATCHES_DIR).rename(batches)
    except Exception as e:  # network, disk, checksum or a broken archive: the same to the user, the same fixes
        raise _no_data(batches, f"download failed: {_one_line(e)}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())
