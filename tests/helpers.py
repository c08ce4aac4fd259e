"""What many tests need: the offline W&B environment, W&B's own reader of offline runs, and
waiting on a handshake (a file, a line, a record) instead of on a clock."""

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from wandb.util import get_core_path

from agent.runlog import RunLogReader, find_run_file

REPO = Path(__file__).resolve().parents[1]
PROGRAMS = REPO / "tests" / "programs"
POLL = 0.05  # seconds between two looks at a handshake
# The val_fraction of the tests' synthetic trials: 100 of its 5,000 images (500 took 40% of a short trial's fit).
QUICK_VAL = 0.02


def offline_env(root: Path) -> dict[str, str]:
    """Offline W&B writing everything under `root`, the repo importable, no prompts, and the run log
    flushed often enough (default: every 15 s) for a test to read a run's rows while it runs."""
    return {"WANDB_MODE": "offline", "WANDB_DIR": str(root), "WANDB_DATA_DIR": str(root / "wandb-data"),
            "WANDB_CACHE_DIR": str(root / "wandb-cache"), "WANDB_CONFIG_DIR": str(root / "wandb-config"),
            "WANDB_SILENT": "true", "WANDB__TRANSACTION_LOG_FLUSH_INTERVAL": "0.1", "PYTHONPATH": str(REPO)}


def agent_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent", *args]


def wandb_reader(run_dir: Path, *flags: str) -> str:
    """What `wandb leet inspect FLAGS RUN_DIR` prints. The reader is W&B's own (wandb-core), started with
    the arguments W&B's CLI gives it for an offline run's file (wandb/cli/leet.py), without the CLI's
    Python start-up: 1.7 s a call here, ~40 CPU-s a suite. The output is the CLI's, byte for byte."""
    [run_file] = Path(run_dir).glob("*.wandb")
    command = [get_core_path(), "leet", "inspect", "--no-observability", *flags, "--run-file", str(run_file),
               str(Path(run_dir).parent)]
    return subprocess.run(command, capture_output=True, text=True, check=True, timeout=60).stdout


def leet_records(run_dir: Path) -> list[dict]:
    """Every record of an offline run, as W&B's own reader (`wandb leet inspect --json`) gives them."""
    return [json.loads(line) for line in wandb_reader(run_dir, "--json").splitlines()]


def leet_summary(run_dir: Path) -> dict:
    """An offline run's state, config and latest values (`wandb leet inspect --summary --json`)."""
    return json.loads(wandb_reader(run_dir, "--summary", "--json"))


def records_of(records: list[dict], kind: str) -> list[dict]:
    return [r[kind] for r in records if r["type"] == kind]


def run_dirs(wandb_dir: Path, run_id: str) -> list[Path]:
    """Every attempt's offline run directory of `run_id` under `wandb_dir`, oldest first."""
    return sorted((Path(wandb_dir) / "wandb").glob(f"offline-run-*-{run_id}"))


def wait_for(condition: Callable[[], object], what: str, timeout: float = 120,
             proc: subprocess.Popen | None = None) -> object:
    """Waits until `condition()` is truthy and returns it. With `proc`, fails at once if that process
    ends first (its output in the message when it was piped)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if proc is not None and proc.poll() is not None:
            output = proc.communicate()[0] if proc.stdout else ""
            raise AssertionError(f"gave up waiting for {what}: the process exited {proc.returncode}\n"
                                 f"{(output or '')[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {timeout:.0f} s")
        threading.Event().wait(POLL)
    return value


def validated(wandb_dir: Path, run_id: str, epoch: int) -> Callable[[], bool]:
    """A wait_for condition: the newest run `run_id` under `wandb_dir` has logged its validation of `epoch`."""
    rows: list[dict] = []
    readers: dict[Path, RunLogReader] = {}

    def seen() -> bool:
        path = find_run_file(wandb_dir, run_id)
        if path is not None:
            rows.extend(readers.setdefault(path, RunLogReader(path)).poll())
        return any(r.get("epoch") == epoch and "val_acc" in r for r in rows)
    return seen


def fresh_env(root: Path, **extra: str) -> dict[str, str]:
    """os.environ with offline W&B under `root` and `extra` on top (no W&B variables of the caller's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return {**env, **offline_env(root), **extra}
