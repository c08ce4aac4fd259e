"""The sweep store under many controllers: SQLite (one DIR) against PostgreSQL (one server), W&B's sweep engine
against a scheduler sweep's optimizer (Optuna), in one run.

    python bench/store_scale.py [--trials 96] [--json OUT.json]

For 1, 4 and 16 controllers (`agent local`, a slot each, all on this box), a sweep of an instant program
(/bin/true: a trial costs nothing but what the controller does for it: a suggestion in a claim transaction, the
trial's process, its state changes) is run to `--trials` trials, with each engine:
  classic   `method: random`, W&B's sweep engine asked by whichever controller has a free slot
  optuna    `method: custom`, `scheduler: {engine: optuna}` (W&B's optimizer, Optuna's default TPE): asked by the
            controller that holds the scheduler's lease, which queues a suggestion ahead for each other one.
            /bin/true logs no metric: its trials fail ("no loss logged"), told to the study as failed.
  suggestions_per_s   trials handed out per second, from the first trial's start to the last one's end
  overhead_per_trial  seconds of a slot per trial, less the trial's own run time (what the store and the
                      controller cost it)
The PostgreSQL server is started here (Debian's postgresql), as the tests start theirs.
Last measured (2 CPU cores, AMD EPYC, quiet; bench/results/store_scale.json), suggestions/s at 1 / 4 / 16
controllers: classic SQLite 46.5 / 25.3 / 6.0, PostgreSQL 37.4 / 23.1 / 5.6; optuna SQLite 44.9 / 29.7 / 7.3,
PostgreSQL 41.4 / 24.5 / 8.0. More: docs/performance.md ("The shared store").
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.controller.store import open_store  # noqa: E402
from tests.helpers import PostgresServer  # noqa: E402

SWEEPS = {"classic": {"method": "random", "parameters": {"x": {"min": 0.0, "max": 1.0}}, "command": ["/bin/true"]},
          "optuna": {"method": "custom", "metric": {"name": "loss", "goal": "minimize"},
                     "scheduler": {"engine": "optuna"}, "parameters": {"x": {"min": 0.0, "max": 1.0}},
                     "command": ["/bin/true"]}}


def run(root: Path, controllers: int, trials: int, store: str | None, engine: str) -> dict:
    root.mkdir(parents=True)
    (root / "sweep.yaml").write_text(yaml.safe_dump(SWEEPS[engine]))
    env = dict(os.environ, PYTHONPATH=str(REPO), WANDB_MODE="offline", WANDB_SILENT="true")
    extra = ["--store", store, "--sweep-id", root.name] if store else []
    command = [sys.executable, "-m", "agent", "local", "sweep.yaml", "--count", str(trials), "--dir", "D",
               "--max-consecutive-failures", str(trials), *extra]
    first = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not ((root / "D" / "sweep.db").exists() or (root / "D" / "store.json").exists()):
        time.sleep(0.05)  # the first makes the sweep; the others join it
    procs = [first] + [subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True) for _ in range(controllers - 1)]
    for proc in procs:
        if proc.wait() not in (0, 1):  # 1: a sweep with no finished trial, as /bin/true's are under optuna
            raise SystemExit(f"a controller exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
    done = open_store(str(root / "D")).trials()
    ended = "finished" if engine == "classic" else "failed"
    assert len(done) == trials and all(t.state == ended for t in done), [t.state for t in done]
    span = max(t.ended for t in done) - min(t.started for t in done)
    own = sum(t.ended - t.started for t in done) / trials
    return {"suggestions_per_s": trials / span, "overhead_per_trial_s": span * controllers / trials - own,
            "trial_run_s": own}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=96)
    parser.add_argument("--json")
    args = parser.parse_args()
    server = PostgresServer.start()
    if server is None:
        raise SystemExit("needs PostgreSQL's initdb and pg_ctl: apt-get install postgresql")
    work, results = Path(tempfile.mkdtemp(prefix="bench-store-")), []
    try:
        for engine in SWEEPS:
            for controllers in (1, 4, 16):
                for kind in ("sqlite", "postgresql"):
                    name = f"{engine}{kind}{controllers}"
                    store = server.url(name) if kind == "postgresql" else None
                    results.append({"engine": engine, "store": kind, "controllers": controllers,
                                    **run(work / name, controllers, args.trials, store, engine)})
                    print(json.dumps(results[-1]), flush=True)
    finally:
        server.stop()
    if args.json:
        Path(args.json).write_text(json.dumps({"cores": os.cpu_count(), "trials": args.trials, "results": results},
                                              indent=1))


if __name__ == "__main__":
    main()
