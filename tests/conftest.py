"""Shared fixtures: tiny CIFAR-10 data in the official python format, offline W&B, a warm worker, and one
real sweep of our program that several test files read."""

import os
import pickle
import subprocess
import threading
from pathlib import Path
from types import SimpleNamespace

# Before anything imports torch (its OpenMP reads this once). The test processes share two cores with the
# trials they start: torch's default, a thread per core in every trial, oversubscribes the cores and its
# idle threads spin (the suite ran 35% longer: 7 min 18 s against 5 min 25 s). One thread a trial, as
# `agent local --workers 2` gives each of its trials on a 2-core box; test_warm.py runs one with the default.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import yaml

from agent.controller.processes import WarmWorker
from agent.controller.store import open_store
from tests.fake_wandb import KEY, FakeWandb, isolated
from tests.helpers import QUICK_VAL, Hold, PostgresServer, agent_command, fresh_env, wait_for
from tests.helpers import offline_env as offline_env_under

CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar(root: Path, per_batch: int = 40, n_test: int = 50, seed: int = 0) -> Path:
    """Writes root/cifar-10-batches-py like the official archive, with tiny random batches."""
    out = root / "cifar-10-batches-py"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def dump(name, n):
        batch = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, n).tolist(),
                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"filenames": [f"{i}.png".encode() for i in range(n)]}
        (out / name).write_bytes(pickle.dumps(batch))

    for i in range(1, 6):
        dump(f"data_batch_{i}", per_batch)
    dump("test_batch", n_test)
    meta = {b"label_names": [c.encode() for c in CLASS_NAMES], b"num_cases_per_batch": per_batch}
    (out / "batches.meta").write_bytes(pickle.dumps(meta))
    return root


def write_cifar100(root: Path, n_train: int = 60, n_test: int = 20, seed: int = 0) -> Path:
    """Writes root/cifar-100-python like the official archive (fine and coarse labels), tiny."""
    out = root / "cifar-100-python"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, n in (("train", n_train), ("test", n_test)):
        batch = {b"fine_labels": rng.integers(0, 100, n).tolist(), b"coarse_labels": rng.integers(0, 20, n).tolist(),
                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
        (out / name).write_bytes(pickle.dumps(batch))
    meta = {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}
    (out / "meta").write_bytes(pickle.dumps(meta))
    return root


FOLDER_CLASSES = ("cat", "dog", "fish")
# Every image of a folder cycles through these: the formats, modes and sizes users' folders hold.
FORMATS = (("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("BMP", "BMP"), ("PNG", "PNG"), ("JPEG", "JPEG"))
MODES = ("RGB", "L", "RGBA", "P")
SIZES = ((40, 30), (64, 64), (23, 50), (100, 80))


def write_image_folder(root: Path, splits: dict[str, int] | None = None, classes=FOLDER_CLASSES, seed: int = 0) -> Path:
    """root/<split>/<class>/<image>, `splits` giving the images per class of each (default train: 8): each class
    a colour plus noise (learnable), the images of mixed sizes, modes and formats, upper-case extensions too."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    i = 0
    for split, per_class in (splits or {"train": 8}).items():
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            colour = np.array([255 * (label == 0), 255 * (label == 1), 255 * (label == 2)])
            for _ in range(per_class):
                (width, height), (kind, suffix), mode = SIZES[i % 4], FORMATS[i % 6], MODES[i % 4]
                pixels = np.clip(colour + rng.normal(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)
                image = Image.fromarray(pixels).convert(mode)
                if kind in ("JPEG", "BMP") and mode in ("RGBA", "P"):
                    image = image.convert("RGB")  # what those formats cannot store
                image.save(folder / f"{i:03d}.{suffix}", kind)
                i += 1
    return root


@pytest.fixture(autouse=True)
def no_terminal_size(monkeypatch):
    """Every test starts with no COLUMNS or LINES, as `python -m agent status` in a pipe: a process that imported
    readline (an xdist worker does) has them set, and the views take COLUMNS as a width asked for."""
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.delenv("LINES", raising=False)


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> Path:
    return write_cifar(tmp_path_factory.mktemp("cifar"))


@pytest.fixture
def offline_env(tmp_path, monkeypatch) -> dict:
    """This process's environment set for offline W&B under tmp_path (subprocesses inherit it)."""
    env = offline_env_under(tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def fake_wandb(tmp_path, mocker):
    """A FakeWandb holding RUNNING sweep ent/proj/* (sweeps/bayes.yaml); W&B pointed at it with a key."""
    server = FakeWandb()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    isolated(tmp_path, mocker, WANDB_API_KEY=KEY, WANDB_BASE_URL=server.url)
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def hold_at(tmp_path):
    """hold_at(phase, occurrence=1): a tests.helpers.Hold in tmp_path, ended when the test is over, so that a test
    that fails while a trial is held leaves no trial held (the session's warm worker waits for its trials)."""
    holds: list[Hold] = []

    def make(phase: str, occurrence: int = 1) -> Hold:
        holds.append(Hold(tmp_path, phase, occurrence))
        return holds[-1]

    yield make
    for hold in holds:
        hold.end()


WARM = pytest.mark.xdist_group("warm-worker")


@pytest.fixture(scope="session")
def warm_worker(tmp_path_factory):
    """One warm worker (agent/program/warm.py) for the session, as `agent local` and `agent launch` start one per slot.
    Its users share the xdist group WARM: one test process starts it (10 s of imports) and runs them in turn."""
    root = tmp_path_factory.mktemp("warm-worker")
    worker = WarmWorker("tests", fresh_env(root), root / "worker.log")
    wait_for(worker.ready, "the warm worker", timeout=300, proc=worker.proc)
    yield worker
    worker.stop()


@pytest.fixture
def started(monkeypatch) -> dict:
    """LocalSweep replaced: the options `agent local` would start it with, and the sweep it opened (none, if it
    refuses first)."""
    seen = {}

    class Started:
        def __init__(self, opened, options, view, on_trial_end=None):
            seen.update(vars(options), opened=opened)

        def run(self):
            return 0

    monkeypatch.setattr("agent.controller.local.LocalSweep", Started)
    return seen


HYPERBAND = pytest.mark.xdist_group("hyperband-sweep")
# Two good learning rates, then a hopeless one (W&B's bar at a band is the median of the runs that reached
# it: it takes three), with epochs long enough (12 batches) that the good ones beat chance at epoch 1. A
# stop comes a band or two into the hopeless one's 6 epochs (its rows reach the controller within a second).
HYPERBAND_SWEEP = {
    "method": "grid", "metric": {"name": "val_acc", "goal": "maximize"},
    "early_terminate": {"type": "hyperband", "min_iter": 1, "eta": 2},
    "parameters": {"lr": {"values": [3.0e-3, 1.0e-3, 1.0e-7]}, "dataset": {"value": "synthetic"},
                   "val_fraction": {"value": QUICK_VAL},
                   "max_epochs": {"value": 6}, "limit_train_batches": {"value": 12},
                   "early_stopping_patience": {"value": 6}},
    "command": ["${env}", "${interpreter}", "-m", "agent", "run", "${args}"]}


@pytest.fixture(scope="session")
def hyperband_sweep(tmp_path_factory) -> SimpleNamespace:
    """`agent local` on HYPERBAND_SWEEP (synthetic data, --workers 2): its folder, environment and trials.
    Its users (test_local.py's hyperband test, test_best.py) share the xdist group HYPERBAND, so it runs once."""
    root = tmp_path_factory.mktemp("hyperband-sweep")
    (root / "hb.yaml").write_text(yaml.safe_dump(HYPERBAND_SWEEP))
    env = fresh_env(root)
    out = subprocess.run(agent_command("local", "hb.yaml", "--workers", "2", "--dir", "D"), cwd=root, env=env,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    return SimpleNamespace(dir=root / "D", env=env, trials=open_store(root / "D").trials())


@pytest.fixture(scope="session")
def postgres() -> SimpleNamespace:
    """A real PostgreSQL server for this test process (tests.helpers.PostgresServer)."""
    server = PostgresServer.start()
    if server is None:
        pytest.skip("needs PostgreSQL's initdb and pg_ctl (apt-get install postgresql): the shared-store tests "
                    "start a real server")
    yield server
    server.stop()


def pytest_collection_modifyitems(items):
    """The slow tier first (xdist hands tests out in this order): the long end-to-end tests start early
    and the quick ones fill in at the end, so the test processes finish together."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
