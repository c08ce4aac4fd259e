"""A local sweep's state, in SQLite (DIR/sweep.db): the sweep, its trials, the live controllers.

Every suggestion, state change, metric and exit code is committed before the
controller acts on it, so a killed controller loses nothing: the next one on the
same DIR resumes from here. Claims run under `BEGIN IMMEDIATE` (one writer at a
time), so two controllers on one DIR never hand out the same trial.
"""

import json
import math
import os
import socket
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

STATES = ("pending", "running", "finished", "failed", "crashed", "stopped")
LIVE = ("pending", "running")
SCHEMA = """
CREATE TABLE IF NOT EXISTS sweep (id TEXT PRIMARY KEY, config TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS trials (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,            -- the W&B run id
    params TEXT NOT NULL,               -- {"lr": {"value": 0.01}, ...}, as W&B's agent receives them
    state TEXT NOT NULL,
    metric REAL,                        -- last value of the sweep's metric
    history TEXT NOT NULL DEFAULT '[]', -- every value of the sweep's metric, in order
    exit_code INTEGER,
    reason TEXT,                        -- why failed, crashed or stopped
    controller TEXT,
    pid INTEGER,
    slot TEXT,                          -- the GPU it ran on, if any
    created REAL NOT NULL, started REAL, ended REAL,
    stop_requested REAL
);
CREATE TABLE IF NOT EXISTS controllers (id TEXT PRIMARY KEY, host TEXT, pid INTEGER, heartbeat REAL);
"""


def is_number(value) -> bool:
    """A finite int or float (not a bool): a usable metric or parameter value."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class Trial:
    id: str
    params: dict
    state: str
    metric: float | None = None
    history: list = field(default_factory=list)
    exit_code: int | None = None
    reason: str | None = None
    pid: int | None = None
    slot: str | None = None
    created: float = 0.0
    started: float | None = None
    ended: float | None = None
    stop_requested: float | None = None

    @property
    def config(self) -> dict:
        return {name: spec.get("value") for name, spec in self.params.items()}

    @property
    def duration(self) -> float | None:
        return None if self.started is None else (self.ended or time.time()) - self.started


def _trial(row: sqlite3.Row) -> Trial:
    return Trial(id=row["id"], params=json.loads(row["params"]), state=row["state"], metric=row["metric"],
                 history=json.loads(row["history"]), exit_code=row["exit_code"], reason=row["reason"],
                 pid=row["pid"], slot=row["slot"], created=row["created"], started=row["started"],
                 ended=row["ended"], stop_requested=row["stop_requested"])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Store:
    def __init__(self, path: Path):
        # autocommit mode: each statement commits unless inside an explicit transaction()
        self.db = sqlite3.connect(path, timeout=30, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)

    @contextmanager
    def transaction(self):
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def sweep(self) -> tuple[str, dict] | None:
        row = self.db.execute("SELECT id, config FROM sweep").fetchone()
        return None if row is None else (row["id"], json.loads(row["config"]))

    def create_sweep(self, sweep_id: str, config: dict) -> None:
        self.db.execute("INSERT INTO sweep VALUES (?, ?, ?)", (sweep_id, json.dumps(config), time.time()))

    def trials(self) -> list[Trial]:
        return [_trial(r) for r in self.db.execute("SELECT * FROM trials ORDER BY seq")]

    def trial(self, trial_id: str) -> Trial:
        return _trial(self.db.execute("SELECT * FROM trials WHERE id = ?", (trial_id,)).fetchone())

    def add_trial(self, trial_id: str, params: dict, controller: str) -> None:
        self.db.execute("INSERT INTO trials (id, params, state, controller, created) VALUES (?, ?, 'pending', ?, ?)",
                        (trial_id, json.dumps(params), controller, time.time()))

    def update(self, trial_id: str, **values) -> None:
        if "history" in values:
            values["history"] = json.dumps(values["history"])
        columns = ", ".join(f"{k} = ?" for k in values)
        self.db.execute(f"UPDATE trials SET {columns} WHERE id = ?", (*values.values(), trial_id))

    # controllers: a heartbeat each loop; a dead one's live trials become crashed

    def register_controller(self, controller: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO controllers VALUES (?, ?, ?, ?)",
                        (controller, socket.gethostname(), os.getpid(), time.time()))

    def heartbeat(self, controller: str) -> None:
        self.db.execute("UPDATE controllers SET heartbeat = ? WHERE id = ?", (time.time(), controller))

    def unregister_controller(self, controller: str) -> None:
        self.db.execute("DELETE FROM controllers WHERE id = ?", (controller,))

    def reap_dead_controllers(self, stale_after: float = 30.0) -> list[str]:
        """Marks live trials of controllers that died (or of none) crashed; returns their ids."""
        with self.transaction():
            host, now = socket.gethostname(), time.time()
            dead = [r["id"] for r in self.db.execute("SELECT * FROM controllers")
                    if (r["host"] == host and not _pid_alive(r["pid"])) or now - r["heartbeat"] > stale_after]
            self.db.executemany("DELETE FROM controllers WHERE id = ?", [(c,) for c in dead])
            alive = {r["id"] for r in self.db.execute("SELECT id FROM controllers")}
            orphans = [r["id"] for r in self.db.execute(
                f"SELECT id, controller FROM trials WHERE state IN {LIVE}") if r["controller"] not in alive]
            for trial_id in orphans:
                self.update(trial_id, state="crashed", reason="its controller died", ended=now)
        return orphans
