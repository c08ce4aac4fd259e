"""fetch: one download per box, one line when there is no data and no network; CIFAR10_DATA_DIR."""

import hashlib
import shutil
import subprocess
import tarfile
import urllib.error
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from agent.__main__ import main
from cifar_core.config import TrainConfig
from cifar_core.fetch import ARCHIVES, DatasetError, fetch
from tests.conftest import write_cifar
from tests.helpers import REPO, python, wait_for, waits_on_lock

# A fetch in its own process: the download is a fake that records its call, then finishes only once
# the test creates HANDSHAKE/go; prints what the folder held when fetch returned.
TWO_PROCESS_FETCH = """
import os, shutil, sys
from pathlib import Path
from cifar_core.fetch import fetch
from tests.helpers import wait_for

data_dir, archive, handshake = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])

def slow_download(archive_spec, dest):
    with (handshake / "calls").open("a") as f:
        f.write(f"{os.getpid()}\\n")
    wait_for((handshake / "go").exists, "the test's go-ahead", timeout=60)
    shutil.copy(archive, dest)

batches = fetch("cifar10", data_dir, download=slow_download)
print(batches, sorted((p.name, p.stat().st_size) for p in batches.iterdir()))
"""


def make_archive(tmp_path: Path) -> Path:
    """A tiny cifar-10-python.tar.gz: cifar-10-batches-py/ at its top, as the official one."""
    source = write_cifar(tmp_path / "source") / "cifar-10-batches-py"
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname="cifar-10-batches-py")
    return archive


def listing(folder: Path) -> list[tuple[str, int]]:
    return sorted((p.name, p.stat().st_size) for p in folder.iterdir())


def copying(archive: Path, calls: list):
    def download(archive_spec, dest: Path):
        calls.append(dest)
        shutil.copy(archive, dest)
    return download


def test_unpacks_the_download_into_place_once_then_finds_it(tmp_path, monkeypatch):
    archive, calls = make_archive(tmp_path), []
    monkeypatch.chdir(tmp_path)
    batches = fetch("cifar10", "data", download=copying(archive, calls))
    assert batches == tmp_path / "data" / "cifar-10-batches-py" and batches.is_absolute()
    assert listing(batches) == listing(tmp_path / "source" / "cifar-10-batches-py")
    assert fetch("cifar10", tmp_path / "data", download=copying(archive, calls)) == batches
    assert len(calls) == 1 and sorted(p.name for p in (tmp_path / "data").iterdir()) == [
        ".cifar-10-download.lock", "cifar-10-batches-py"]  # the archive and the work folder are gone


def test_the_real_downloader_streams_and_checks_the_md5(tmp_path, monkeypatch):
    archive = make_archive(tmp_path)
    monkeypatch.setitem(ARCHIVES, "cifar10", replace(ARCHIVES["cifar10"], url=archive.as_uri(),
                                                     md5=hashlib.md5(archive.read_bytes()).hexdigest()))
    assert listing(fetch("cifar10", tmp_path / "data")) == listing(tmp_path / "source" / "cifar-10-batches-py")


def fails_with(error: Exception):
    def download(archive_spec, dest: Path):
        dest.write_bytes(b"part of an archive")
        raise error
    return download


@pytest.mark.parametrize("download, reason", [
    (fails_with(urllib.error.URLError(OSError(-2, "Name or service not known"))),
     "download failed: URLError: <urlopen error [Errno -2] Name or service not known>"),
    (fails_with(TimeoutError("timed out")), "download failed: TimeoutError: timed out"),
    (fails_with(OSError(28, "No space left on device")), "download failed: OSError: [Errno 28] No space left"),
    (None, f"download failed: ValueError: md5 mismatch: got {hashlib.md5(b'not the archive').hexdigest()}, "
           "expected c58f30108f718f92721af3b95e74349a"),
    (lambda archive, dest: dest.write_bytes(b"\x1f\x8b not really gzip"), "download failed: ReadError:"),
])
def test_no_data_and_no_download_is_one_line_with_the_path_and_the_three_fixes(tmp_path, monkeypatch, download,
                                                                                  reason):
    (tmp_path / "other.tar.gz").write_bytes(b"not the archive")  # what a captive portal might serve
    monkeypatch.setitem(ARCHIVES, "cifar10", replace(ARCHIVES["cifar10"], url=(tmp_path / "other.tar.gz").as_uri()))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError) as e:
        fetch("cifar10", "data", **({"download": download} if download else {}))
    line = str(e.value)
    assert "\n" not in line and line.startswith(f"{tmp_path}/data/cifar-10-batches-py: no CIFAR-10 data there (")
    assert reason in line
    for fix in ("put cifar-10-batches-py/ there (the official python version, cifar-10-python.tar.gz unpacked)",
                "CIFAR10_DATA_DIR=DIR or --data_dir=DIR", "--dataset=synthetic"):
        assert fix in line
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [".cifar-10-download.lock"]


def test_an_archive_cut_short_leaves_no_half_folder_behind(tmp_path):
    whole = make_archive(tmp_path).read_bytes()
    with pytest.raises(DatasetError, match="download failed: (EOFError|ReadError)"):
        fetch("cifar10", tmp_path / "data", download=lambda archive, dest: dest.write_bytes(whole[:len(whole) // 2]))
    assert not (tmp_path / "data" / "cifar-10-batches-py").exists()
    assert not (tmp_path / "data" / ".cifar-10-download.tmp").exists()


def test_a_killed_downloads_leftovers_are_not_data_and_are_cleared(tmp_path):
    archive, calls = make_archive(tmp_path), []
    leftover = tmp_path / "data" / ".cifar-10-download.tmp" / "cifar-10-batches-py"
    leftover.mkdir(parents=True)
    (leftover / "data_batch_1").write_bytes(b"half")
    batches = fetch("cifar10", tmp_path / "data", download=copying(archive, calls))
    assert len(calls) == 1 and listing(batches) == listing(tmp_path / "source" / "cifar-10-batches-py")
    assert not leftover.parent.exists()


def test_a_data_dir_that_cannot_be_made_says_so_in_one_line(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(DatasetError) as e:
        fetch("cifar10", tmp_path / "a-file" / "data", download=fails_with(AssertionError("must not download")))
    assert str(e.value).startswith(f"{tmp_path}/a-file/data/cifar-10-batches-py: no CIFAR-10 data there "
                                   f"(cannot write there: NotADirectoryError:")


def test_two_processes_fetching_at_once_download_once_and_both_get_the_whole_folder(tmp_path):
    archive, handshake, data_dir = make_archive(tmp_path), tmp_path / "handshake", tmp_path / "data"
    handshake.mkdir()

    def calls() -> list[str]:
        return (handshake / "calls").read_text().split() if (handshake / "calls").exists() else []

    def start() -> subprocess.Popen:
        return python(TWO_PROCESS_FETCH, data_dir, archive, handshake)

    first = start()
    wait_for(calls, "the first process to start downloading", 60, first)
    second = start()
    wait_for(lambda: waits_on_lock(second.pid, data_dir / ".cifar-10-download.lock") or len(calls()) > 1,
             "the second process to wait for the first one's download", 60, second)
    assert not (data_dir / "cifar-10-batches-py").exists()  # nothing to be taken for data mid-download
    (handshake / "go").touch()
    outputs = [p.communicate(timeout=60)[0] for p in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], outputs
    assert calls() == [str(first.pid)]
    expected = f"{data_dir / 'cifar-10-batches-py'} {listing(tmp_path / 'source' / 'cifar-10-batches-py')}\n"
    assert outputs == [expected, expected]


def test_the_data_dir_default_is_CIFAR10_DATA_DIR_read_when_a_config_is_made(monkeypatch):
    monkeypatch.delenv("CIFAR10_DATA_DIR", raising=False)
    assert TrainConfig().data_dir == "data"
    monkeypatch.setenv("CIFAR10_DATA_DIR", "/datasets/cifar10")
    assert TrainConfig().data_dir == "/datasets/cifar10"
    assert TrainConfig().model_dump()["data_dir"] == "/datasets/cifar10"  # what wandb.init records
    assert TrainConfig(data_dir="elsewhere").data_dir == "elsewhere"  # a flag or a sweep value wins
    monkeypatch.setenv("CIFAR10_DATA_DIR", "")
    assert TrainConfig().data_dir == "data"


def test_agent_local_with_no_data_names_the_fixes_as_the_sweep_writes_them(tmp_path, monkeypatch, capsys):
    (tmp_path / "other.tar.gz").write_bytes(b"not the archive")
    monkeypatch.setitem(ARCHIVES, "cifar10", replace(ARCHIVES["cifar10"], url=(tmp_path / "other.tar.gz").as_uri()))
    sweep = yaml.safe_load((REPO / "sweeps" / "bayes.yaml").read_text())
    sweep["parameters"]["data_dir"] = {"value": str(tmp_path / "data")}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(sweep))
    assert main(["local", str(tmp_path / "s.yaml"), "--dir", str(tmp_path / "D")]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"agent local: {tmp_path}/data/cifar-10-batches-py: no CIFAR-10 data there (")
    assert line.endswith("(CIFAR10_DATA_DIR=DIR or `data_dir: {value: DIR}` in the sweep's parameters), or use "
                         "`dataset: {value: synthetic}` in the sweep's parameters")
    assert not (tmp_path / "D").exists()
