"""Your images, decoded once per box, against torchvision's ImageFolder + DataLoader, in one run.

    python bench/folder_speed.py --archive ../shared/data/cifar10-jpeg.tar.gz [--json OUT.json]

Writes an image folder from the bundled JPEG copy of CIFAR-10: train/<class>/ with 1,000 images per class
(10,000), resized to 64 px, JPEG. Then, in this process (as a warm worker's trials run: imports done):
  first_trial    a trial (train(): offline W&B, timm/test_resnet at 64 px, 2 steps) on a fresh cache: seconds
                 from the data step's start to the first training step (the folder is decoded into the cache)
  later_trials   3 more trials on the same folder: the same span (the cache is read)
  data path      images/s to batches ready for the network (64 images, random-resized-crop + flip, normalised),
                 ours (the cache, batch-wise crops on the device) against torchvision's ImageFolder + DataLoader
                 (PIL decode, RandomResizedCrop, RandomHorizontalFlip, ToTensor, Normalize per image, every
                 epoch), num_workers = the cores, as a user would set it

Goals: later trials at their first step <= 1 s after the data step begins; the data path >= 10x.
Last measured (2 CPU cores, AMD EPYC, no GPU; bench/results/folder_speed.json): the first trial 8.94 s (it
decodes the 10,000 images), later ones 0.23-0.35 s; the data path 46,727 images/s against 2,588: 18.1x.
"""

import argparse
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PER_CLASS, SIZE, BATCH = 1000, 64, 64


def write_folder(archive: Path, root: Path) -> Path:
    from PIL import Image

    counts: dict[str, int] = {}
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or "train" not in parts:
                continue
            name = parts[parts.index("train") + 1]
            if counts.get(name, 0) >= PER_CLASS:
                continue
            counts[name] = counts.get(name, 0) + 1
            with Image.open(tar.extractfile(member)) as image:
                out = root / "train" / name / Path(member.name).name
                out.parent.mkdir(parents=True, exist_ok=True)
                image.convert("RGB").resize((SIZE, SIZE), Image.BICUBIC).save(out, "JPEG", quality=90)
    return root


class FirstStep(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        self.train_start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.step = getattr(self, "step", None) or time.perf_counter()


def trial(config) -> dict:
    """A normal trial: seconds from its data step's start to its first training step, and of its data step."""
    import wandb

    from agent.controller.runlog import RunLogReader
    from agent.program.run import SignalRequests, logged_run

    stamp = FirstStep()
    with SignalRequests() as requests:
        result = logged_run(config, requests, [stamp])
    wandb.teardown()
    [log] = Path(result["best_checkpoint"]).parent.parent.glob("*.wandb")
    reader = RunLogReader(log)
    reader.poll()
    # trial/setup_s: from the data step's start to on_train_start; then the first batch's fetch
    return {"to_first_step_s": reader.summary["trial/setup_s"] + stamp.step - stamp.train_start,
            "data_step_s": reader.summary["trial/data_s"]}


def ours_rate(config, batches: int) -> float:
    from cifar_core.data import ImageDataModule, TensorBatches
    from cifar_core.model import create_model

    data = ImageDataModule(config)
    data.setup()
    data.trainer = type("Training", (), {"training": True, "current_epoch": 0})()  # what the augmentation asks
    normalize = create_model(config, num_classes=10).normalize
    start, seen = time.perf_counter(), 0
    for i, batch in enumerate(TensorBatches(data.train_set, BATCH, shuffle=True, seed=config.seed)):
        images, _ = data.on_after_batch_transfer(batch, 0)
        seen += len(normalize(images))
        if i + 1 == batches:
            break
    return seen / (time.perf_counter() - start)


def torchvision_rate(root: Path, batches: int) -> float:
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.RandomResizedCrop(SIZE, scale=(0.35, 1)),
                                    transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                    transforms.Normalize((0.5,) * 3, (0.5,) * 3)])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(root / "train", transform), batch_size=BATCH,
                                         shuffle=True, num_workers=os.cpu_count() or 1)
    start, seen = time.perf_counter(), 0
    for i, (images, _) in enumerate(loader):
        seen += len(images)
        if i + 1 == batches:
            break
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archive", required=True, help="the bundled cifar10-jpeg.tar.gz")
    parser.add_argument("--json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-folder-"))
    os.environ.update(WANDB_MODE="offline", WANDB_DIR=str(work), WANDB_SILENT="true")
    started = time.perf_counter()
    root = write_folder(Path(args.archive), work / "images")
    print(f"wrote {sum(1 for _ in root.rglob('*.jpg'))} images in {time.perf_counter() - started:.1f} s", flush=True)

    from cifar_core.config import TrainConfig

    config = TrainConfig(dataset="imagefolder", data_dir=str(root), image_size=SIZE, cache_dir=str(work / "cache"),
                         model="timm/test_resnet", augment=True, batch_size=BATCH, max_epochs=1,
                         limit_train_batches=2, val_fraction=0.02)
    first = trial(config)
    later = [trial(config) for _ in range(3)]
    batches = 100
    ours, theirs = ours_rate(config, batches), torchvision_rate(root, batches)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    results = {"machine": f"{os.cpu_count()} CPU cores, {gpu}", "images": PER_CLASS * 10, "image_size": SIZE,
               "first_trial": first, "later_trials": later,
               "data_path_images_per_s": {"ours": ours, "torchvision": theirs}, "data_path_ratio": ours / theirs}
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
