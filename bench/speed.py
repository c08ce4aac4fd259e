"""Accuracy per second: our trials against the seed pipeline (CPU) and the speed record (GPU), in one run.

    python bench/speed.py --data-dir D --json OUT.json   (D holds cifar-10-batches-py/)
    python bench/speed.py --data-dir D --skip-cpu        (a GPU box: the GPU comparison only)
    pip install -e ".[bench]"   # airbench, for the GPU reference; the benchmark skips it when missing

Prints a table and writes JSON with:
  data_throughput         images/s of the training data path alone, batch 32 (seed: torchvision + PIL;
                          ours: uint8 tensors, normalise + crop + flip)
  trial_overhead_s        process start -> first training step, cold (offline W&B for both)
  trial_teardown_s        last training step -> process exit: validation, test, artifact, W&B finish
  cpu                     the seed trains 2 epochs with its defaults; its test accuracy is the target.
                          Then each CPU preset inside a normal trial (train(): Lightning, offline W&B,
                          checkpoints, artifact), 3 seeds: its training seconds and final test accuracy
  gpu (with CUDA only)    the record, airbench94 from the `airbench` package (pip install ".[bench]"),
                          on the same data files (its train.pt/test.pt written from D; 50,000 training
                          images), 5 runs after a warm-up run, with its own timer (whitening, training
                          and its test-time-augmented evaluation); then each GPU preset inside a normal
                          trial, 5 seeds after a warm-up run (compile, cuDNN autotuning). Our seconds
                          are CUDA-synchronised spans of the training batches (whitening, validation,
                          checkpoints, artifacts, test excluded); accuracies are with each one's
                          test-time augmentation
Evaluation time is never counted; nothing stops on the test set.

Last measured (2 CPU cores, AMD EPYC with AVX2, no GPU, bundled JPEG copy of CIFAR-10): the seed, 2 epochs,
54.9% in 187.3 s of training; CPU_PRESET 56.1% mean over 3 seeds in 9.0 s, 20.7x sooner; RESNET9_CPU 57.8% in
17.5 s (10.7x). The GPU comparison has not been run yet (no GPU). Details: docs/performance.md.
"""

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The presets: fixed schedules, picked on the validation split, never stopped on the test set.
# CPU: the record's techniques at widths a CPU can afford (16, 32, 32) for 0.35 epoch, ReLU, fp32 (bf16 is
# 8-14x slower on a CPU without AVX-512 BF16 or AMX); the whitening layer frozen from the start, bias too,
# so no gradient flows below the first 3x3 conv (1.35x faster a step).
CPU_PRESET = dict(model="airnet", width=16, width_mult=2, activation="relu", whiten_bias_epochs=0,
                  optimizer="sgd_scaled", lr=40.0, weight_decay=0.0153, momentum=0.85, label_smoothing=0.2,
                  batch_size=128, max_epochs=1, limit_train_batches=0.35, schedule="triangle", lookahead=True,
                  flip="alternating", translate=2, tta=2, channels_last=True)
# GPU: the record's airbench94 settings (10 epochs here; it takes 9.9), 98% of the training set.
GPU_PRESET = dict(model="airnet", width=64, width_mult=4, activation="gelu", optimizer="sgd_scaled", lr=11.5,
                  weight_decay=0.0153, momentum=0.85, label_smoothing=0.2, batch_size=1024, max_epochs=10,
                  schedule="triangle", lookahead=True, flip="alternating", translate=2, tta=2, channels_last=True,
                  precision="bf16-mixed", val_fraction=0.02)
# The presets before the record's techniques, measured beside them.
RESNET9_CPU = dict(model="resnet9", width=8, batch_size=128, optimizer="sgd", lr=0.2, momentum=0.9, nesterov=True,
                   weight_decay=5e-4, schedule="onecycle", max_epochs=1, limit_train_batches=0.5, channels_last=True)
RESNET9_GPU = dict(model="resnet9", width=64, batch_size=512, optimizer="sgd", lr=0.4, momentum=0.9, nesterov=True,
                   weight_decay=5e-4, schedule="onecycle", label_smoothing=0.2, augment=True, max_epochs=10,
                   precision="bf16-mixed", channels_last=True)


class TrainClock(pl.Callback):
    """Seconds of training batches: from each epoch's start to its validation (or end), synchronised
    on a GPU, so that validation, checkpoints and artifacts are not counted."""

    def __init__(self):
        self.seconds, self.started = 0.0, None

    def _now(self, trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module):
        self.started = self._now(trainer)

    def _stop(self, trainer):
        if self.started is not None:
            self.seconds += self._now(trainer) - self.started
            self.started = None

    def on_validation_start(self, trainer, pl_module):
        self._stop(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        self._stop(trainer)


def data_throughput(data_dir: str, batches: int = 300) -> dict:
    from bench.seed_pipeline import SeedDataModule
    from cifar_core.augment import augment_batch
    from cifar_core.config import TrainConfig
    from cifar_core.data import ImageDataModule
    from cifar_core.model import Network
    from cifar_core.networks import SEED_MEAN, SEED_STD

    seed = SeedDataModule(batch_size=32, data_dir=data_dir)
    seed.setup()
    ours = ImageDataModule(TrainConfig(data_dir=data_dir, batch_size=32, augment=True))
    ours.setup()
    normalize = Network(torch.nn.Identity(), SEED_MEAN, SEED_STD).normalize  # what our networks do first
    rates = {}
    for name, loader, finish in [("seed", seed.train_dataloader(), lambda b: b),
                                 ("ours", ours.train_dataloader(), lambda b: (normalize(augment_batch(b[0])), b[1]))]:
        start, seen = time.perf_counter(), 0
        for i, batch in enumerate(loader):
            x, _ = finish(batch)
            seen += len(x)
            if i + 1 == batches:
                break
        rates[name] = seen / (time.perf_counter() - start)
    return rates


def trial_child(which: str, data_dir: str, phase: str):
    """Runs a trial as its program would. phase=start: exits at the first training step;
    phase=end: trains 5 batches, prints when the last step ended, and runs to exit."""
    import wandb

    class Stamp(pl.Callback):
        def on_train_batch_start(self, *args):
            if phase == "start":
                print(f"STAMP {time.time()}", flush=True)
                os._exit(0)

        def on_train_batch_end(self, *args):
            self.last_step = time.time()

        def on_train_end(self, *args):
            print(f"STAMP {self.last_step}", flush=True)

    limit = 5 if phase == "end" else 1.0

    if which == "seed":  # the tutorial's main block, as written
        from lightning.pytorch.loggers import WandbLogger

        from bench.seed_pipeline import SeedDataModule, SeedLitModel

        dm = SeedDataModule(batch_size=32, data_dir=data_dir)
        dm.setup()
        next(iter(dm.val_dataloader()))  # the seed draws its image-logger samples here
        trainer = pl.Trainer(max_epochs=2 if phase == "start" else 1, logger=WandbLogger(project="bench"),
                             enable_progress_bar=False, limit_train_batches=limit,
                             callbacks=[pl.callbacks.EarlyStopping(monitor="val_loss"),
                                        pl.callbacks.ModelCheckpoint(), Stamp()])
        trainer.fit(SeedLitModel(), dm)
        trainer.test(dataloaders=dm.test_dataloader())
        wandb.finish()
    else:  # what `python -m agent run` does: a W&B run around train()
        from agent.program.run import SignalRequests, logged_run
        from cifar_core.config import TrainConfig

        config = TrainConfig(data_dir=data_dir, limit_train_batches=limit, max_epochs=2 if phase == "start" else 1,
                             project="bench")
        with SignalRequests() as requests:
            logged_run(config, requests, [Stamp()])


def trial_overhead(data_dir: str, tmp: Path) -> tuple[dict, dict]:
    """(process start -> first training step, last training step -> process exit), seconds."""
    env = dict(os.environ, WANDB_MODE="offline", WANDB_DIR=str(tmp), WANDB_SILENT="true", PYTHONPATH=str(REPO))
    start = time.time()  # the floor both pay: importing torch, lightning (with torchmetrics, torchvision), wandb
    subprocess.run([sys.executable, "-c", "import torch, lightning.pytorch, wandb"], env=env, check=True)
    start_up, tear_down = {"imports_alone": time.time() - start}, {}
    for which in ("seed", "ours"):
        for phase, into in (("start", start_up), ("end", tear_down)):
            start = time.time()
            proc = subprocess.run([sys.executable, __file__, "--child", which, phase, "--data-dir", data_dir],
                                  capture_output=True, text=True, env=env, cwd=tmp, timeout=600)
            stamp = float(next(line for line in proc.stdout.splitlines() if line.startswith("STAMP")).split()[1])
            into[which] = stamp - start if phase == "start" else time.time() - stamp
    return start_up, tear_down


def seed_two_epochs(data_dir: str) -> tuple[float, float]:
    from bench.seed_pipeline import SeedDataModule, SeedLitModel

    pl.seed_everything(0, verbose=False)
    dm = SeedDataModule(batch_size=32, data_dir=data_dir)
    model, clock = SeedLitModel(), TrainClock()
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, callbacks=[clock])
    trainer.fit(model, dm)
    acc = trainer.test(model, dataloaders=dm.test_dataloader(), verbose=False)[0]["test_acc"]
    return acc, clock.seconds


def ours_in_a_trial(data_dir: str, preset: dict, seed: int) -> tuple[float, float]:
    """(test accuracy, training seconds) of one normal trial: train() with offline W&B, checkpoints, artifact."""
    from agent.program.run import SignalRequests, logged_run
    from cifar_core.config import TrainConfig

    clock = TrainClock()
    with SignalRequests() as requests:
        result = logged_run(TrainConfig(data_dir=data_dir, seed=seed, **preset), requests, [clock])
    return result["test_acc"], clock.seconds


def presets_on(data_dir: str, presets: dict, seeds: int, warm_up: bool) -> dict:
    results = {}
    for name, preset in presets.items():
        if warm_up:  # compile, cuDNN autotuning, first-use allocations: not the recipe's cost
            ours_in_a_trial(data_dir, preset, seed=1000)
        runs = [ours_in_a_trial(data_dir, preset, s) for s in range(seeds)]
        results[name] = {"accs": [a for a, _ in runs], "seconds": [t for _, t in runs], "preset": preset,
                         "acc_mean": statistics.mean(a for a, _ in runs),
                         "seconds_mean": statistics.mean(t for _, t in runs)}
    return results


def airbench94_reference(data_dir: str, runs: int, folder: Path) -> dict | None:
    """The record on the same images: airbench's own loader reads cifar10/train.pt and test.pt from the
    working directory before it would download; written here from D (uint8 NHWC). Its accuracy and
    seconds are its own printed figures: test accuracy with its test-time augmentation, and its CUDA
    event timer (whitening, training batches and that evaluation; its per-epoch evaluation excluded)."""
    try:
        import airbench
    except ImportError:
        return None
    from cifar_core.cifar import read_all
    from cifar_core.data import CIFAR10_CLASSES as CLASSES

    (train_x, train_y), (test_x, test_y) = read_all(Path(data_dir) / "cifar-10-batches-py")
    (folder / "cifar10").mkdir(parents=True, exist_ok=True)
    for name, images, labels in (("train", train_x, train_y), ("test", test_x, test_y)):
        torch.save({"images": images.permute(0, 2, 3, 1).contiguous(), "labels": labels, "classes": list(CLASSES)},
                   folder / "cifar10" / f"{name}.pt")
    here = os.getcwd()
    os.chdir(folder)
    try:
        train_loader = airbench.CifarLoader("cifar10", train=True, batch_size=1024,
                                            aug={"flip": True, "translate": 2}, altflip=True)
        airbench.train94(train_loader, verbose=False)  # warm-up: cuDNN autotuning, first allocations
        accs, seconds = [], []
        for run in range(1, runs + 1):
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                airbench.train94(train_loader, run=run)
            # its last row: | run | epoch ("eval") | ... | tta_val_acc | total_time_seconds |
            last = [line for line in printed.getvalue().splitlines() if line.startswith("|")][-1]
            row = [c.strip() for c in last.strip("|").split("|")]
            accs.append(float(row[5]))
            seconds.append(float(row[6]))
    finally:
        os.chdir(here)
    return {"accs": accs, "seconds": seconds,
            "acc_mean": statistics.mean(accs), "seconds_mean": statistics.mean(seconds)}


def main():
    parser = argparse.ArgumentParser(description="Accuracy per second against the seed and the record.")
    parser.add_argument("--data-dir", required=True, help="folder holding cifar-10-batches-py/")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--skip-cpu", action="store_true", help="on a GPU box: only the GPU comparison")
    args = parser.parse_args()
    if args.child:
        return trial_child(*args.child[:1], args.data_dir, args.child[1])

    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    cuda = torch.cuda.is_available()
    results = {"machine": f"{os.cpu_count()} CPU cores" + (f", {torch.cuda.get_device_name()}" if cuda else ", no GPU")}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("WANDB_DIR", tmp)
        if not args.skip_cpu:
            results["data_throughput"] = data_throughput(args.data_dir)
            results["trial_overhead_s"], results["trial_teardown_s"] = trial_overhead(args.data_dir, Path(tmp))
            target, seed_seconds = seed_two_epochs(args.data_dir)
            results["cpu"] = {"seed": {"acc": target, "seconds": seed_seconds},
                              **presets_on(args.data_dir, {"CPU_PRESET": CPU_PRESET, "RESNET9_CPU": RESNET9_CPU},
                                           seeds=3, warm_up=False)}
        if cuda:
            results["gpu"] = {"airbench94": airbench94_reference(args.data_dir, 5, Path(tmp) / "airbench"),
                              **presets_on(args.data_dir, {"GPU_PRESET": GPU_PRESET, "RESNET9_GPU": RESNET9_GPU},
                                           seeds=5, warm_up=True)}
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def report(results: dict) -> None:
    print(f"({results['machine']})")
    if "cpu" in results:
        d, o, e = results["data_throughput"], results["trial_overhead_s"], results["trial_teardown_s"]
        print(f"{'measure':34} {'seed':>10} {'ours':>10} {'ratio':>8}")
        print(f"{'data path, images/s':34} {d['seed']:10.0f} {d['ours']:10.0f} {d['ours'] / d['seed']:7.1f}x")
        print(f"{'start -> first training step, s':34} {o['seed']:10.2f} {o['ours']:10.2f} "
              f"{o['seed'] / o['ours']:7.1f}x   (imports alone: {o['imports_alone']:.2f} s)")
        print(f"{'last training step -> exit, s':34} {e['seed']:10.2f} {e['ours']:10.2f} {e['seed'] / e['ours']:7.1f}x")
        seed = results["cpu"]["seed"]
        print(f"seed, 2 epochs: {seed['acc']:.1%} test accuracy after {seed['seconds']:.1f} s of training")
        for name in ("CPU_PRESET", "RESNET9_CPU"):
            r = results["cpu"][name]
            print(f"{name:12} {r['acc_mean']:.1%} mean test accuracy ({', '.join(f'{a:.1%}' for a in r['accs'])}) "
                  f"in {r['seconds_mean']:.1f} s: {seed['seconds'] / r['seconds_mean']:.1f}x sooner"
                  f"{'' if r['acc_mean'] >= seed['acc'] else ' (short of the target)'}")
    if "gpu" in results:
        reference = results["gpu"]["airbench94"]
        if reference:
            print(f"airbench94   {reference['acc_mean']:.2%} mean test accuracy in {reference['seconds_mean']:.2f} s")
        for name in ("GPU_PRESET", "RESNET9_GPU"):
            r = results["gpu"][name]
            ratio = f", {r['seconds_mean'] / reference['seconds_mean']:.2f}x its time" if reference else ""
            print(f"{name:12} {r['acc_mean']:.2%} mean test accuracy in {r['seconds_mean']:.2f} s{ratio}")


if __name__ == "__main__":
    main()
