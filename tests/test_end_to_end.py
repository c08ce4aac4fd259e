"""One real `python -m agent run` on tiny data, read back with W&B's own offline-run reader."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from agent.contract import parse_caption
from cifar_core.config import TrainConfig
from cifar_core.data import CIFAR10_CLASSES as CLASSES
from cifar_core.data import ImageDataModule
from cifar_core.predictions import example_rows
from tests.helpers import (
    agent_command,
    history,
    leet_records,
    leet_summary,
    model_artifacts,
    records_of,
    validated_epochs,
)


@pytest.mark.slow
def test_agent_run_logs_config_metrics_images_and_best_model(cifar_dir, offline_env, tmp_path):
    out = subprocess.run(
        agent_command("run", f"--data_dir={cifar_dir}", "--max_epochs=2", "--limit_train_batches=3",
                      "--batch_size", "16", "--optimizer=sgd", "--lr=0.01", "--nesterov"),
        capture_output=True, text=True, cwd=tmp_path, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    [run_dir] = (tmp_path / "wandb").glob("offline-run-*")

    summary = leet_summary(run_dir)
    assert summary["state"] == "finished" and summary["exit_code"] == 0
    config = summary["config"]
    assert (config["optimizer"], config["lr"], config["batch_size"], config["nesterov"]) == ("sgd", 0.01, 16, True)
    assert config["max_epochs"] == 2 and config["data_dir"] == str(cifar_dir)
    assert 0 <= summary["summary"]["test_acc"] <= 1 and "test_loss" in summary["summary"]

    records = leet_records(run_dir)
    rows = history(records)
    assert validated_epochs(records) == [0, 1]
    [images] = [row for row in rows if "examples.captions" in row]  # once, with the best model's predictions
    captions = [parse_caption(c) for c in images["examples.captions"]]
    val = ImageDataModule(TrainConfig(data_dir=str(cifar_dir)))
    val.load()
    assert {label for _, label in captions} == {CLASSES[y] for y in val.val_set.labels.tolist()}  # every class
    assert all((run_dir / "files" / f).is_file() for f in images["examples.filenames"])
    assert summary["summary"]["trial/fit_s"] > 0 and summary["summary"]["trial/test_s"] > 0

    models = model_artifacts(records)
    assert models == records_of(records, "artifact")  # a run never preempted logs no resume state
    assert models and all(a["name"] == f"model-{summary['run_id']}" and set(a["aliases"]) == {"best", "latest"}
                          for a in models)
    final = models[-1]  # one per improvement, then the tested best with its test metrics
    [entry] = final["manifest"]["contents"]
    assert entry["path"] == "model.ckpt" and Path(entry["local_path"]).is_file()
    assert Path(entry["local_path"]).read_bytes() == (run_dir / "checkpoints" / "best.ckpt").read_bytes()
    metadata = json.loads(final["metadata"])
    assert metadata["monitor"] == "val_acc" and metadata["epoch"] in (0, 1)
    assert metadata["config"]["optimizer"] == "sgd" and 0 <= metadata["val_acc"] <= 1
    assert metadata["test_acc"] == summary["summary"]["test_acc"]


def test_the_logged_examples_show_every_class_alike_with_its_mistakes_first():
    labels = torch.arange(100) % 10  # ten of each class, in turns
    def half_wrong(rows):  # of each class, the 2nd, 4th, ... image
        return torch.where(rows // 10 % 2 == 1, (labels[rows] + 1) % 10, labels[rows])

    shown = example_rows(labels, 10, half_wrong)
    by_class = [[(row, guess) for row, guess in shown if labels[row] == c] for c in range(10)]
    assert all(len(mine) == 3 for mine in by_class)  # 32 images spread over 10 classes: 3 of each
    assert all(mine[0][1] != c and all(guess == c for _, guess in mine[1:]) for c, mine in enumerate(by_class))
    many = example_rows(torch.arange(300) % 100, 100, lambda rows: rows % 100)
    assert sorted(row % 100 for row, _ in many) == list(range(64))  # one each of the first 64 classes
