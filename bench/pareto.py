"""Accuracy against latency on CPU: the Pareto front sweeps/cpu-pareto.yaml finds, and where the same budget spent
on accuracy alone lands against it, in one run.

    python bench/pareto.py --archive ../shared/data/cifar10-jpeg.tar.gz [--minutes 15] [--json OUT.json]

Writes bench/folder_speed.py's image folder (10,000 train images of the bundled CIFAR-10 JPEG copy at 64 px; no
val/ or test/, so val is a stratified tenth of train and the test pass scores it), then runs, one after the other,
each for `--minutes` from its controller's start with `--workers` trials at a time (then paused, SIGTERM):
  pareto     sweeps/cpu-pareto.yaml: val_acc max and latency_ms min, Optuna's multi-objective TPE
  accuracy   the same YAML with `metric: val_acc` (max) alone, the same sampler (studies/pareto.py)
It prints the front of `pareto` (each point's accuracy, latency, FLOPs, network), the best `accuracy` trial and the
front trials that dominate it, and what measuring a model's cost took against a trial's time.
Latencies are at batch 1 on one core, while the other core trains another trial: compare them within the run.
Last run (2-core CPU box, 15 minutes each, bench/results/pareto.json): the front, timm/resnet10t at 48 px (56.9%,
5.17 ms) and airnet width 16 at 32 px (54.5%, 1.40 ms); the accuracy-only best, airnet width 16 at 48 px (55.8%,
2.05 ms), lies between them, undominated; measuring costs took 0.76 s a trial (0.8%). docs/performance.md
(#accuracy-against-latency) has the rest.
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from folder_speed import write_folder  # noqa: E402

from agent.controller.store import open_store  # noqa: E402
from agent.views.pareto import objective_values, pareto_front  # noqa: E402

OBJECTIVES = [("val_acc", "maximize"), ("latency_ms", "minimize")]
SHOWN = ("val_acc", "test_acc", "latency_ms", "flops", "params")


def sweeps(images: Path) -> dict[str, dict]:
    pareto = yaml.safe_load((REPO / "sweeps" / "cpu-pareto.yaml").read_text())
    pareto["parameters"]["data_dir"] = {"value": str(images)}
    pareto["scheduler"]["source"] = str(REPO / pareto["scheduler"]["source"])  # each runs in a folder of its own
    accuracy = {k: v for k, v in pareto.items() if k != "metrics"}
    return {"pareto": pareto, "accuracy": {**accuracy, "metric": {"name": "val_acc", "goal": "maximize"}}}


def spend(name: str, sweep: dict, minutes: float, workers: int, root: Path) -> list:
    folder = root / name
    folder.mkdir()
    (folder / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    controller = subprocess.Popen([sys.executable, "-m", "agent", "local", "sweep.yaml", "--workers", str(workers),
                                   "--dir", "D"], cwd=folder, env=dict(os.environ, PYTHONPATH=str(REPO)),
                                  stdout=(folder / "controller.log").open("w"), stderr=subprocess.STDOUT)
    try:
        controller.wait(timeout=minutes * 60)
    except subprocess.TimeoutExpired:
        controller.send_signal(signal.SIGTERM)  # the budget is spent: the running trials are paused
        controller.wait()
    return open_store(str(folder / "D")).trials()


def point(trial) -> dict:
    network = {k: trial.config.get(k) for k in ("model", "image_size")}
    if not network["model"].startswith("timm/"):  # timm's networks have their width in their name
        network["width"] = trial.config.get("width")
    return {"id": trial.id, **{k: trial.summary.get(k) for k in SHOWN}, **network}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archive", required=True, help="the bundled cifar10-jpeg.tar.gz")
    parser.add_argument("--minutes", type=float, default=15)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-pareto-"))
    images = write_folder(Path(args.archive), root / "images")
    trials = {name: spend(name, sweep, args.minutes, args.workers, root) for name, sweep in sweeps(images).items()}

    front = pareto_front(trials["pareto"], OBJECTIVES)
    finished = [t for t in trials["accuracy"] if t.id not in pareto_front(trials["accuracy"], OBJECTIVES).excluded]
    best = max(finished, key=lambda t: t.summary["val_acc"], default=None)
    dominating = []
    if best is not None:
        mine = objective_values(best, OBJECTIVES)
        dominating = [t.id for t in front.trials if t.summary["val_acc"] >= mine["val_acc"]
                      and t.summary["latency_ms"] <= mine["latency_ms"]]
    ended = [t for ts in trials.values() for t in ts if "trial/cost_s" in t.summary and t.duration]
    result = {
        "cores": os.cpu_count(), "minutes": args.minutes, "workers": args.workers,
        "trials": {name: {s: sum(t.state == s for t in ts) for s in {t.state for t in ts}}
                   for name, ts in trials.items()},
        "front": [point(t) for t in front.trials],
        "left_out": front.excluded,
        "accuracy_best": best and point(best),
        "accuracy_best_dominated_by": dominating,
        "cost_s_median": statistics.median(t.summary["trial/cost_s"] for t in ended) if ended else None,
        "cost_share_median": statistics.median(t.summary["trial/cost_s"] / t.duration for t in ended) if ended
        else None,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
