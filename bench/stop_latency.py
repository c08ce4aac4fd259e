"""Seconds from a stop (SIGTERM: hyperband, W&B's Stop button) or a preemption notice (SIGUSR1) to
the exit of `python -m agent run`: W&B's agent kills a stopped run 30 s after its SIGTERM.

    python bench/stop_latency.py --data-dir D [--json OUT.json] [-- extra run flags]

Each signal goes to a fresh run once its log shows its first validation (mid-run); the time
covers ending fit at the next batch, the test pass on the 10,000 test images, the model artifact
(and on SIGUSR1 the saved state and its artifact) and W&B's finish.

Last measured (2 CPU cores, no GPU, bundled JPEG copy of CIFAR-10, the seed CNN with 200 batches
an epoch; two runs): SIGTERM -> exit 0 in 7.2 / 7.4 s, SIGUSR1 -> exit 138 in 1.6 / 1.7 s.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.controller.runlog import RunLogReader, find_run_file  # noqa: E402


def latency(data_dir: str, signum: int, extra: list[str], root: Path) -> dict:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_DIR=str(root), WANDB_SILENT="true", PYTHONPATH=str(REPO),
               WANDB_DATA_DIR=str(root / "wandb-data"), WANDB__TRANSACTION_LOG_FLUSH_INTERVAL="0.1",
               WANDB_RUN_ID=f"stop{signum}")
    command = [sys.executable, "-m", "agent", "run", f"--data_dir={data_dir}", "--max_epochs=10",
               "--limit_train_batches=200", *extra]
    proc = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    reader, rows = None, []
    while not any("val_acc" in row for row in rows):
        if proc.poll() is not None:
            raise SystemExit(f"the run exited {proc.returncode} before its first validation:\n{proc.stderr.read()}")
        path = find_run_file(root, f"stop{signum}")
        if path is not None:
            reader = reader or RunLogReader(path)
            rows += reader.poll()
        time.sleep(0.05)
    start = time.perf_counter()
    proc.send_signal(signum)
    proc.wait()
    return {"signal": signal.Signals(signum).name, "exit_code": proc.returncode,
            "seconds": round(time.perf_counter() - start, 2)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder holding cifar-10-batches-py/")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("extra", nargs="*", help="more `agent run` flags, after --")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [latency(args.data_dir, s, args.extra, Path(tmp)) for s in (signal.SIGTERM, signal.SIGUSR1)]
    for r in results:
        print(f"{r['signal']}: exit {r['exit_code']} after {r['seconds']:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
