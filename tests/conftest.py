"""Shared fixtures: tiny CIFAR-10 data in the official python format, offline W&B."""

import pickle
from pathlib import Path

import numpy as np
import pytest

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
