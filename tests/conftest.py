"""Shared fixtures: tiny CIFAR-10 data in the official python format, offline W&B."""

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
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
    """Environment for a subprocess run of our program: offline W&B writing under tmp_path."""
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
           "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"), "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
           "WANDB_SILENT": "true", "PYTHONPATH": str(REPO)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def agent_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent", *args]
