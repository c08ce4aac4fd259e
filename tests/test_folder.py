"""Your images: an image folder checked, decoded once per box into its cache, and split; CIFAR-100."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

from agent.controller.store import open_store
from agent.program.use import best
from cifar_core.config import TrainConfig
from cifar_core.data import ImageDataModule
from cifar_core.fetch import DatasetError
from cifar_core.folder import load_folder, scan, stored_size
from tests.conftest import FOLDER_CLASSES, write_cifar100, write_image_folder
from tests.helpers import REPO, agent_command, fresh_env, leet_summary, python, run_dirs, wait_for, waits_on_lock


def folder_data(data_dir: Path, cache: Path, **kwargs) -> ImageDataModule:
    data = ImageDataModule(TrainConfig(data_dir=str(data_dir), dataset="imagefolder", image_size=32,
                                       cache_dir=str(cache), **kwargs))
    data.load()
    return data


def test_every_mode_and_format_decodes_and_what_is_not_an_image_is_left_out_and_counted(tmp_path):
    root = write_image_folder(tmp_path / "pets", {"train": 8, "val": 2})
    (root / "train" / "cat" / "broken.jpg").write_bytes((root / "train" / "cat" / "000.jpg").read_bytes()[:200])
    for stray in ("README.md", ".DS_Store"):
        (root / "train" / stray).write_text("not an image")
    (root / "train" / "dog" / "Thumbs.db").write_bytes(b"\0" * 10)
    (root / "train" / ".ipynb_checkpoints").mkdir()  # a hidden folder is not a class
    folder = load_folder(root, 32, tmp_path / "cache")
    assert folder.classes == FOLDER_CLASSES
    assert folder.images.shape == (3 * 8 + 3 * 2, 3, stored_size(32), stored_size(32))
    assert folder.splits == {"train": (0, 24), "val": (24, 30)}
    assert np.bincount(folder.labels[:24]).tolist() == [8, 8, 8]  # sorted class folders, in order
    [skipped] = folder.skipped
    assert skipped.startswith("train/cat/broken.jpg: OSError") and folder.ignored == 3
    red, green = folder.images[0].mean(axis=(1, 2)), folder.images[8].mean(axis=(1, 2))  # cat: red, dog: green
    assert red[0] > red[1] + 60 and green[1] > green[0] + 60  # the pixels, not just the shapes
    data = folder_data(root, tmp_path / "cache")
    assert data.notes == {"data/test_split": "val (no test/ folder)", "data/skipped_files": 1,
                          "data/ignored_files": 3, "data/train_images": 24, "data/val_images": 6,
                          "data/test_images": 6}
    assert data.val_set[:6].shape == (6, 3, 32, 32) and torch.equal(data.test_set.labels, data.val_set.labels)


def test_with_no_val_folder_val_is_a_seeded_stratified_part_of_train(tmp_path):
    root = write_image_folder(tmp_path / "pets", {"train": 10})
    data = folder_data(root, tmp_path / "cache", val_fraction=0.2, seed=3)
    assert np.bincount(data.val_set.labels.numpy()).tolist() == [2, 2, 2] and len(data.train_set) == 24
    assert torch.equal(folder_data(root, tmp_path / "cache", val_fraction=0.2, seed=3).val_set.rows, data.val_set.rows)
    assert not torch.equal(folder_data(root, tmp_path / "cache", val_fraction=0.2, seed=4).val_set.rows,
                           data.val_set.rows)
    assert not set(data.train_set.rows.tolist()) & set(data.val_set.rows.tolist())


@pytest.mark.parametrize("damage, expected", [
    (lambda root: os.rename(root / "train", root / "training"), "pets/train: missing; expected train/<class>/<image>"),
    (lambda root: [p.unlink() for p in (root / "train" / "dog").iterdir()], "pets/train/dog: no images; expected"),
    (lambda root: os.rename(root / "val" / "fish", root / "val" / "fishes"),
     "pets/val: its classes differ from train/'s (missing: fish; extra: fishes)"),
    (lambda root: [p.write_bytes(b"junk") for p in (root / "val" / "cat").iterdir()],
     "pets/val/cat: none of its images could be read (first: val/cat/"),
])
def test_a_folder_that_cannot_train_is_refused_in_one_line_naming_where(tmp_path, damage, expected):
    root = write_image_folder(tmp_path / "pets", {"train": 4, "val": 2})
    damage(root)
    with pytest.raises(DatasetError) as e:
        load_folder(root, 32, tmp_path / "cache")
    assert expected in str(e.value) and "\n" not in str(e.value)
    assert not list((tmp_path / "cache").glob("imagefolder-*"))  # nothing half-built left behind


def test_no_class_folders_is_refused(tmp_path):
    (tmp_path / "flat" / "train").mkdir(parents=True)
    (tmp_path / "flat" / "train" / "a.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match="flat/train: no class folders; expected train/<class>/<image>"):
        load_folder(tmp_path / "flat", 32, tmp_path / "cache")


def flat_val(root: Path) -> None:
    shutil.rmtree(root / "val")
    (root / "val").mkdir()
    shutil.copy(root / "train" / "cat" / "000.jpg", root / "val")  # images, but not in class folders


# What a scan refuses, never decoding an image: what `agent validate` and `agent local` check before any trial.
UNTRAINABLE = {
    "one class": (lambda root: [shutil.rmtree(p) for p in root.glob("*/[!c]*")],
                  "pets/train: one class folder (cat); a classifier needs 2 or more: expected train/<class>/<image>, "
                  "a folder per class"),
    "a class of non-images": (lambda root: [p.rename(f"{p}.txt") for p in (root / "train" / "dog").iterdir()],
                              "pets/train/dog: no images; expected files ending in .jpg, "),
    "val's classes empty": (lambda root: [p.unlink() for p in (root / "val").glob("*/*")],
                            "pets/val/cat: no images; expected files ending in .jpg, "),
    "no class folders in val": (flat_val, "pets/val: no class folders; expected val/<class>/<image>"),
}


@pytest.mark.parametrize("case", UNTRAINABLE)
def test_a_scan_refuses_a_folder_that_cannot_train_a_classifier(tmp_path, case):
    damage, expected = UNTRAINABLE[case]
    root = write_image_folder(tmp_path / "pets", {"train": 2, "val": 1})
    damage(root)
    with pytest.raises(DatasetError) as e:
        scan(root)
    assert str(e.value).startswith(f"{tmp_path}/{expected}") and "\n" not in str(e.value)


@pytest.mark.parametrize("case", UNTRAINABLE)
def test_agent_local_refuses_such_a_folder_in_one_line_before_any_trial(tmp_path, case):
    damage, expected = UNTRAINABLE[case]
    damage(write_image_folder(tmp_path / "pets", {"train": 2, "val": 1}))
    sweep = {"method": "grid", "command": ["${env}", "${interpreter}", "-m", "agent", "run", "${args}"],
             "parameters": {"dataset": {"value": "imagefolder"}, "data_dir": {"value": "pets"},  # where it runs
                            "cache_dir": {"value": "cache"}, "lr": {"values": [0.1, 0.01, 0.001, 0.0001]}}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    out = subprocess.run(agent_command("local", "sweep.yaml"), cwd=tmp_path, env=fresh_env(tmp_path),
                         capture_output=True, text=True, timeout=120)
    assert (out.returncode, out.stdout) == (2, ""), out.stdout + out.stderr
    assert out.stderr.startswith(f"agent local: sweep.yaml: parameters.data_dir: {tmp_path}/{expected}")
    assert out.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pets", "sweep.yaml"]  # no sweep, trial log, run or cache


def test_the_cache_is_read_again_and_rebuilt_once_a_file_changes(tmp_path):
    root, cache = write_image_folder(tmp_path / "pets"), tmp_path / "cache"
    first = load_folder(root, 32, cache)
    [built] = cache.glob("imagefolder-*")
    written = (built / "images.u8").stat()
    assert np.array_equal(load_folder(root, 32, cache).images, first.images)
    again = (built / "images.u8").stat()
    assert (again.st_ino, again.st_mtime_ns) == (written.st_ino, written.st_mtime_ns)  # read, not written again
    image = root / "train" / "dog" / "009.BMP"
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))  # touched: maybe edited
    load_folder(root, 32, cache)
    load_folder(root, 48, cache)  # another image size: a cache of its own
    assert len(list(cache.glob("imagefolder-*"))) == 3


def test_a_pool_of_decoders_writes_what_one_process_writes(tmp_path):
    root = write_image_folder(tmp_path / "pets")
    inline = load_folder(root, 32, tmp_path / "one")
    pooled = load_folder(root, 32, tmp_path / "two", processes=2)
    assert np.array_equal(inline.images, pooled.images) and np.array_equal(inline.labels, pooled.labels)


# A trial's data step in its own process; its decoding of the first image waits for HANDSHAKE/go.
BUILD = """
import os, sys
from pathlib import Path
import cifar_core.folder as folder
from tests.helpers import wait_for

root, cache, handshake = (Path(a) for a in sys.argv[1:4])
decode = folder.decode

def slow_decode(path, size):
    with (handshake / "decoding").open("a") as f:
        f.write(f"{os.getpid()}\\n")
    wait_for((handshake / "go").exists, "the test's go-ahead", timeout=60)
    return decode(path, size)

folder.decode = slow_decode
print(folder.load_folder(root, 32, cache).images.sum())
"""


def test_two_trials_starting_at_once_decode_the_folder_once(tmp_path):
    root, cache, handshake = write_image_folder(tmp_path / "pets", {"train": 2}), tmp_path / "cache", tmp_path / "hs"
    handshake.mkdir()

    def decoders() -> set[str]:
        return set((handshake / "decoding").read_text().split()) if (handshake / "decoding").exists() else set()

    def start() -> subprocess.Popen:
        return python(BUILD, root, cache, handshake)

    first = start()
    wait_for(decoders, "the first trial to start decoding", 60, first)
    second = start()
    lock = next(cache.glob(".imagefolder-*.lock"))
    wait_for(lambda: waits_on_lock(second.pid, lock), "the second trial to wait for the first one's build", 60, second)
    (handshake / "go").touch()
    outputs = [p.communicate(timeout=60)[0] for p in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], outputs
    assert decoders() == {str(first.pid)} and outputs[0] == outputs[1]


def test_cifar100_reads_its_fine_labels_and_their_names(tmp_path):
    data = ImageDataModule(TrainConfig(data_dir=str(write_cifar100(tmp_path)), dataset="cifar100", val_fraction=0.25))
    data.load()
    assert len(data.classes) == 100 and data.classes[7] == "fine7"
    assert len(data.train_set) == 45 and len(data.val_set) == 15 and len(data.test_set) == 20
    assert data.train_set.labels.max() < 100 and data.test_set.images.shape == (20, 3, 32, 32)


@pytest.mark.slow
def test_a_finetune_sweep_on_a_folder_reports_picks_evaluates_and_exports_with_its_class_names(tmp_path, capsys):
    root = write_image_folder(tmp_path / "pets", {"train": 10, "val": 3})
    weights = tmp_path / "test_resnet.safetensors"  # what pretrained_path points at on a box with no network
    torch.manual_seed(0)
    save_file(timm.create_model("test_resnet").state_dict(), weights)
    sweep = yaml.safe_load((REPO / "sweeps" / "finetune.yaml").read_text())
    del sweep["parameters"]["pretrained"]
    sweep["parameters"].update({k: {"value": v} for k, v in {
        "data_dir": str(root), "model": "timm/test_resnet", "pretrained_path": str(weights), "image_size": 32,
        "cache_dir": str(tmp_path / "cache"), "batch_size": 8, "max_epochs": 2}.items()})
    (tmp_path / "finetune.yaml").write_text(yaml.safe_dump(sweep))
    out = subprocess.run(agent_command("local", "finetune.yaml", "--count", "2", "--dir", "D",
                                       "--report"), cwd=tmp_path, env=fresh_env(tmp_path), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    trials = open_store(tmp_path / "D").trials()
    assert [t.state for t in trials] == ["finished", "finished"], [(t.state, t.reason) for t in trials]
    assert len(list((tmp_path / "cache").glob("imagefolder-*"))) == 1  # decoded once, before the first trial
    for t in trials:  # which weights each trial started from, in its summary and its log
        [run_dir] = run_dirs(tmp_path / "D", t.id)
        assert leet_summary(run_dir)["summary"]["model/weights"] == f"file {weights}"
        assert f"timm/test_resnet: weights from file {weights}" in (tmp_path / "D" / "logs" / f"{t.id}.log").read_text()
    page = (tmp_path / "D" / "report.html").read_text()
    captions = re.findall(r"<figcaption>Pred: (\w+), Label: (\w+)</figcaption>", page)
    assert len(captions) == 9 and {label for _, label in captions} == set(FOLDER_CLASSES)

    assert best(str(tmp_path / "D"), evaluate=True, export=str(tmp_path / "pets.pt2")) == 0
    printed = capsys.readouterr().out
    assert "on 9 images, imagefolder val (no test/ folder) split of" in printed
    [command] = [line for line in printed.splitlines() if line.startswith("config: ")]
    assert "--drop_path_rate=" in command and not {"--width=", "--whiten=", "--bn_momentum="} & set(
        flag.partition("=")[0] + "=" for flag in command.split())  # airnet's fields: not a timm network's
    assert [line.split()[0] for line in printed.splitlines() if line.split()[:1] and line.split()[0] in
            FOLDER_CLASSES] == list(FOLDER_CLASSES)
    extra = {"class_names.json": "", "input.json": ""}
    model = torch.export.load(tmp_path / "pets.pt2", extra_files=extra).module()
    assert json.loads(extra["class_names.json"]) == list(FOLDER_CLASSES)
    assert json.loads(extra["input.json"])["shape"] == ["N", 3, 32, 32]
    assert model(torch.rand(5, 3, 32, 32)).shape == (5, 3)
