"""Is a preempted-and-resumed run the run it would have been? `python -m agent run` on CIFAR-10, preempted
(SIGUSR1, as `wandb agent --forward-signals` delivers it) at several moments, then rerun with the same run id
(as W&B's requeue does), against the same config run through once, in one run of this script.

    python bench/resume.py --data-dir D [--delays 1,4,8,12,16] [--json OUT.json] [-- extra run flags]

Each notice is sent DELAY seconds after the run's directory appears. Printed per notice: where the state
was saved, the resume's exit code, its steps, test accuracy and loss, and whether its final weights
(best.ckpt) are bitwise those of the uninterrupted run.

Last measured (2 CPU cores, AMD EPYC, no GPU, bundled JPEG copy of CIFAR-10, seed CNN, 2 epochs of 60
batches with crop + flip augmentation; 166 s): notices at 1, 4, 8, 12 and 16 s saved after batch 1 of
epoch 0 (twice), at the end of epoch 0, after batch 21 of epoch 1 and after training; every resume exited
0 with 120 steps, test_acc 0.2491 and test_loss 2.0089, its weights bitwise those of the uninterrupted run.
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
RUN = ["--max_epochs=2", "--limit_train_batches=60", "--augment=true", "--early_stopping_patience=5"]


def run(root: Path, run_id: str, flags: list[str], notice_after: float | None = None) -> dict:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_DIR=str(root), WANDB_SILENT="true", PYTHONPATH=str(REPO),
               WANDB_DATA_DIR=str(root / "wandb-data"), WANDB_RUN_ID=run_id)
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", *flags], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if notice_after is not None:
        while not list((root / "wandb").glob(f"offline-run-*-{run_id}")) and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(notice_after)
        proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate()
    result = dict(word.split("=", 1) for word in out.split()) if proc.returncode == 0 else {}
    return {"exit": proc.returncode, "said": (err.strip().splitlines() or [""])[-1], **result}


def weights(path: str):
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--delays", default="1,4,8,12,16", help="seconds after the run directory appears")
    parser.add_argument("--json")
    args, extra = parser.parse_known_args()
    flags = [f"--data_dir={Path(args.data_dir).resolve()}", *RUN, *[f for f in extra if f != "--"]]
    root = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    straight = run(root, "straight", flags)
    expected = weights(straight["best_checkpoint"])
    rows = []
    for i, delay in enumerate(float(d) for d in args.delays.split(",")):
        first = run(root, f"notice{i}", flags, notice_after=delay)
        resumed = run(root, f"notice{i}", flags)
        same = resumed["exit"] == 0 and all(a.equal(b) for a, b in zip(weights(resumed["best_checkpoint"]).values(),
                                                                       expected.values()))
        rows.append({"delay_s": delay, "first_exit": first["exit"], "saved": first["said"].removeprefix("agent run: "),
                     "resume_exit": resumed["exit"], "steps": resumed.get("steps"),
                     "test_acc": resumed.get("test_acc"), "test_loss": resumed.get("test_loss"),
                     "identical_weights": same})
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"uninterrupted": {k: straight[k] for k in ("steps", "test_acc", "test_loss")}}))
    if args.json:
        Path(args.json).write_text(json.dumps({"uninterrupted": straight, "preempted": rows}, indent=1))


if __name__ == "__main__":
    main()
