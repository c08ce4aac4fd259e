"""The same CPU budget spent by three searches: the best test accuracy each reaches at 5 and 10 minutes.

    python bench/budget.py --data-dir D [--minutes 10] [--workers 2] [--json bench/results/budget.json]

On CIFAR-10 (D holds cifar-10-batches-py: `python ../shared/data/make_cifar10.py D`), one after another, each
search gets `--workers` trials at a time for `--minutes` from its controller's start (`agent local`, warm workers,
the program of sweeps/*.yaml), then is paused (SIGTERM to the controller):
  bayes-hyperband   sweeps/cpu-fast.yaml: W&B's bayes search and hyperband, 2 x 0.6 epochs a trial
  optuna-asha       sweeps/cpu-asha.yaml: Optuna's TPE and successive halving under W&B's scheduler, up to 10
                    epochs a trial, width and length in the space (studies/asha.py)
  random            sweeps/cpu-asha.yaml's space, W&B's random search, every trial trained to its end
For each, at each mark: the best test accuracy of the trials that had ended by then (a trial's test_acc is its best
model's, measured at its end), and how many trials had ended. Last measured (2 CPU cores, AMD EPYC, quiet;
bench/results/budget.json), best test accuracy at 5 / 10 min: bayes-hyperband 68.1 / 68.1%, optuna-asha 55.0 /
84.5% (82.6% at 5 min 12 s), random none / 85.3% (at 7 min 22 s). More: docs/performance.md.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.controller.store import open_store  # noqa: E402


def searches() -> dict[str, dict]:
    fast = yaml.safe_load((REPO / "sweeps" / "cpu-fast.yaml").read_text())
    asha = yaml.safe_load((REPO / "sweeps" / "cpu-asha.yaml").read_text())
    random = {k: v for k, v in asha.items() if k not in ("scheduler", "run_cap")}
    asha["scheduler"]["source"] = str(REPO / asha["scheduler"]["source"])  # the searches run in a folder of their own
    return {"bayes-hyperband": {**fast, "run_cap": 200}, "optuna-asha": {**asha, "run_cap": 200},
            "random": {**random, "method": "random", "run_cap": 200}}


def spend(name: str, sweep: dict, data_dir: str, minutes: float, workers: int, root: Path) -> dict:
    folder = root / name
    folder.mkdir()
    (folder / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    env = dict(os.environ, CIFAR10_DATA_DIR=data_dir, PYTHONPATH=str(REPO))
    began = time.time()
    controller = subprocess.Popen([sys.executable, "-m", "agent", "local", "sweep.yaml", "--workers", str(workers),
                                   "--dir", "D"], cwd=folder, env=env, stdout=(folder / "controller.log").open("w"),
                                  stderr=subprocess.STDOUT)
    try:
        controller.wait(timeout=minutes * 60)
    except subprocess.TimeoutExpired:
        controller.send_signal(signal.SIGTERM)  # the budget is spent: the running trials are paused
        controller.wait()
    trials = open_store(str(folder / "D")).trials()
    marks = {}
    for mark in (minutes / 2, minutes):
        ended = [t for t in trials if t.ended is not None and t.ended - began <= mark * 60 and "test_acc" in t.summary]
        best = max(ended, key=lambda t: t.summary["test_acc"], default=None)
        marks[f"{mark:g} min"] = {"best_test_acc": best and best.summary["test_acc"], "trial": best and best.id,
                                  "config": best and best.config, "trials_ended": len(ended)}
    states = {s: sum(t.state == s for t in trials) for s in {t.state for t in trials}}
    return {"search": name, "marks": marks, "states": states}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", help="one search, by name")
    parser.add_argument("--json")
    args = parser.parse_args()
    root, results = Path(tempfile.mkdtemp(prefix="bench-budget-")), []
    for name, sweep in searches().items():
        if args.only in (None, name):
            results.append(spend(name, sweep, str(Path(args.data_dir).absolute()), args.minutes, args.workers, root))
            print(json.dumps(results[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"cores": os.cpu_count(), "minutes": args.minutes,
                                               "workers": args.workers, "results": results}, indent=1))


if __name__ == "__main__":
    main()
