"""Shared fixtures: tiny CIFAR-10 data in the official python format, offline W&B."""

import pickle
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.fake_wandb import KEY, FakeWandb, isolated
from agent.warm_client import WarmWorker
from tests.helpers import fresh_env, wait_for
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


@pytest.fixture(scope="session")
def warm_worker(tmp_path_factory):
    """One warm worker (agent/warm.py) for the session, as `agent local` and `agent launch` start one per slot."""
    root = tmp_path_factory.mktemp("warm-worker")
    worker = WarmWorker("tests", fresh_env(root), root / "worker.log")
    wait_for(worker.ready, "the warm worker", timeout=300, proc=worker.proc)
    yield worker
    worker.stop()
