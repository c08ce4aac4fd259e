"""What a trial on two devices costs to start, against one on one, in one run: `python -m agent run` cold (a
fresh process, as W&B's agent starts a run), DDP on the CPU (gloo, two processes) against one process.

    python bench/ddp_startup.py [--runs 3] [--json OUT.json]

Per trial, from its run's summary: start-up (process start to training: imports, wandb.init) and set-up
(data, network, Trainer and, with two ranks, starting rank 1 and the process group), their sum being the
time to the first training step; and the wall time of the whole trial (2 batches, validation, test pass).
On a GPU box the same command measures GPUs (devices=2 uses two when it sees them).

Last measured: docs/performance.md ("A trial on two devices: start-up").
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.controller.runlog import RunLogReader, find_run_file  # noqa: E402

TRIAL = ["--dataset=synthetic", "--model=resnet9", "--width=8", "--max_epochs=1", "--limit_train_batches=2",
         "--val_fraction=0.02"]


def trial(root: Path, run_id: str, devices: int) -> dict:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_DIR=str(root), WANDB_SILENT="true", PYTHONPATH=str(REPO),
               WANDB_RUN_ID=run_id, OMP_NUM_THREADS="1")
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "agent", "run", *TRIAL, f"--devices={devices}"], cwd=root, env=env,
                         capture_output=True, text=True)
    wall = time.perf_counter() - started
    if out.returncode != 0:
        raise SystemExit(f"the {devices}-device trial exited {out.returncode}:\n{out.stderr[-3000:]}")
    reader = RunLogReader(find_run_file(root, run_id))
    reader.poll()
    startup, setup = reader.summary["trial/startup_s"], reader.summary["trial/setup_s"]
    return {"startup_s": startup, "setup_s": setup, "to_first_step_s": startup + setup, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-ddp-"))
    results = {1: [], 2: []}
    for i in range(args.runs):  # alternated, so that a noisy minute hits both
        for devices in (1, 2):
            results[devices].append(trial(root, f"d{devices}r{i}", devices))
            print(devices, json.dumps(results[devices][-1]), flush=True)
    summary = {f"{d} device{'s' if d > 1 else ''}": {k: statistics.mean(r[k] for r in runs) for k in runs[0]}
               for d, runs in results.items()}
    summary["ratio_to_first_step"] = summary["2 devices"]["to_first_step_s"] / summary["1 device"]["to_first_step_s"]
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": results, "mean": summary}, indent=1))


if __name__ == "__main__":
    main()
