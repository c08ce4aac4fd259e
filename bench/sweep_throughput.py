"""Trials per hour of a local sweep, cold against warm, measured in one run on one machine.

    python bench/sweep_throughput.py [--trials 5] [--workers 1 | --gpus 0,0] [--sweep SWEEP.yaml] [--json OUT]

Runs the same N-trial sweep twice with `python -m agent local`: `--cold` (each trial a fresh
process that imports torch, Lightning and wandb itself, as under a bare `wandb agent`) and warm
(a worker per slot forks each trial, agent/program/warm.py). The default sweep is the trivial trial:
synthetic data, ResNet-9 at width 8, 1 epoch of 2 batches, a grid over seeds. Reported per mode:
  sweep_s            the command's wall time, warm workers' start included
  trials_per_hour    trials / sweep_s
  trial_s            each trial's wall time, from the controller starting it to its exit
  overhead_s         trial_s minus its compute (the fit, validation included, and the test pass)
  phases_s           means of what each trial logged (trial/startup_s: process start to training,
                     imports and wandb.init included; wandb_init, the part of start-up it took;
                     setup, fit, test, logging) and finish_and_exit: trial_s minus the others
  gpu_busy           on a GPU: the fraction of sweep_s its utilisation was above zero (nvidia-smi,
                     every 0.1 s)

Last measured (2 CPU cores, no GPU, the trivial trial): `--trials 5`: a trial 6.56 s cold, 1.20 s
warm (5.4x), overhead 5.95 s against 0.56 s; `--trials 10 --workers 2`: 7.82 s against 1.47 s.
Table: docs/performance.md ("Warm trials").
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TRIVIAL = {"dataset": "synthetic", "model": "resnet9", "width": 8, "max_epochs": 1, "limit_train_batches": 2}
PHASES = ("startup", "wandb_init", "setup", "fit", "test", "logging")


def trivial_sweep(trials: int) -> dict:
    return {"method": "grid", "metric": {"name": "val_acc", "goal": "maximize"},
            "parameters": {"seed": {"values": list(range(trials))}, **{k: {"value": v} for k, v in TRIVIAL.items()}},
            "command": ["${env}", "${interpreter}", "-m", "agent", "run", "${args}"]}


class GpuBusy(threading.Thread):
    """Samples whether any GPU is busy, every 0.1 s, while the sweep runs."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples: list[bool] = []
        self.done = threading.Event()

    def run(self):
        while not self.done.wait(0.1):
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout
            self.samples.append(any(int(v) > 0 for v in out.split()))


def summary(run_dir: Path) -> dict:
    out = subprocess.run(["wandb", "leet", "inspect", "--summary", "--json", str(run_dir)], capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out)["summary"]


def measure(sweep_file: Path, trials: int, slots: list[str], cold: bool, root: Path) -> dict:
    directory = root / ("cold" if cold else "warm")
    env = dict(os.environ, PYTHONPATH=str(REPO), WANDB_SILENT="true")
    command = [sys.executable, "-m", "agent", "local", str(sweep_file), "--count", str(trials), "--dir", str(directory),
               *slots, *(["--cold"] if cold else [])]
    gpu = GpuBusy() if shutil.which("nvidia-smi") else None
    if gpu:
        gpu.start()
    start = time.perf_counter()
    subprocess.run(command, cwd=root, env=env, check=True, stdout=subprocess.DEVNULL)
    sweep_s = time.perf_counter() - start
    if gpu:
        gpu.done.set()
        gpu.join()
    listing = subprocess.run([sys.executable, "-m", "agent", "status", str(directory), "--json"], env=env,
                             capture_output=True, text=True, check=True).stdout
    per_trial = []
    for trial in json.loads(listing):
        [run_dir] = (directory / "wandb").glob(f"offline-run-*-{trial['id']}")
        logged = summary(run_dir)
        phases = {p: logged[f"trial/{p}_s"] for p in PHASES}
        # start-up includes wandb.init (shown apart as well)
        phases["finish_and_exit"] = trial["duration_s"] - sum(v for p, v in phases.items() if p != "wandb_init")
        per_trial.append({"trial_s": trial["duration_s"],
                          "overhead_s": trial["duration_s"] - phases["fit"] - phases["test"],
                          "phases_s": phases, "state": trial["state"]})
    result = {
        "sweep_s": sweep_s, "trials_per_hour": trials / sweep_s * 3600,
        "trial_s": [t["trial_s"] for t in per_trial], "overhead_s": [t["overhead_s"] for t in per_trial],
        "mean_trial_s": statistics.mean(t["trial_s"] for t in per_trial),
        "mean_overhead_s": statistics.mean(t["overhead_s"] for t in per_trial),
        "phases_s": {p: statistics.mean(t["phases_s"][p] for t in per_trial) for p in (*PHASES, "finish_and_exit")},
        "states": [t["state"] for t in per_trial],
    }
    if gpu:
        result["gpu_busy"] = sum(gpu.samples) / max(1, len(gpu.samples))
    return result


def main():
    parser = argparse.ArgumentParser(description="Trials per hour of a local sweep, cold against warm.")
    parser.add_argument("--trials", type=int, default=5)
    slots = parser.add_mutually_exclusive_group()
    slots.add_argument("--workers", type=int, default=1)
    slots.add_argument("--gpus", help="as agent local --gpus, e.g. 0,0 for two trials at a time on GPU 0")
    parser.add_argument("--sweep", help="a sweep YAML of our program (default: the trivial trial, a grid over seeds)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    slots = ["--gpus", args.gpus] if args.gpus else ["--workers", str(args.workers)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sweep_file = Path(args.sweep).resolve() if args.sweep else root / "trivial.yaml"
        if not args.sweep:
            sweep_file.write_text(yaml.safe_dump(trivial_sweep(args.trials)))
        results = {"machine": f"{os.cpu_count()} CPU cores", "trials": args.trials, "slots": slots,
                   "sweep": str(args.sweep or f"trivial: {TRIVIAL}")}
        for mode in ("cold", "warm"):
            results[mode] = measure(sweep_file, args.trials, slots, mode == "cold", root)
    cold, warm = results["cold"], results["warm"]
    print(f"{'':28} {'cold':>9} {'warm':>9} {'ratio':>7}   "
          f"({results['machine']}, {args.trials} trials, {' '.join(slots)})")
    for key, label in (("sweep_s", "sweep wall time, s"), ("mean_trial_s", "mean trial wall time, s"),
                       ("mean_overhead_s", "mean per-trial overhead, s")):
        print(f"{label:28} {cold[key]:9.2f} {warm[key]:9.2f} {cold[key] / warm[key]:6.1f}x")
    print(f"{'trials per hour':28} {cold['trials_per_hour']:9.0f} {warm['trials_per_hour']:9.0f}")
    for phase in (*PHASES, "finish_and_exit"):
        label = "  (of which wandb.init)" if phase == "wandb_init" else f"  phase {phase}"
        print(f"{label:28} {cold['phases_s'][phase]:9.2f} {warm['phases_s'][phase]:9.2f}")
    if "gpu_busy" in warm:
        print(f"{'GPU busy, fraction of wall':28} {cold['gpu_busy']:9.2f} {warm['gpu_busy']:9.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
