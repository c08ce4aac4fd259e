"""A local sweep's state, in SQLite (DIR/sweep.db): the sweep, its trials, the live controllers.

Every suggestion, state change, metric and exit code is committed before the
controller acts on it, so a killed controller loses nothing: the next one on the
same DIR resumes from here. Claims run under `BEGIN IMMEDIATE` (one writer at a
time), so two controllers on one DIR never hand out the same trial. A file that is
damaged, no database, or another program's is refused before anything writes to it.
"""

import json
import os
import socket
import sqlite3
import time
from contextlib import closing, contextmanager
from pathlib import Path

from agent.errors import SWEEP_PATH, UsageError
from agent.trials import LIVE, Trial

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
    gpu TEXT,                           -- the GPU it ran on (CUDA_VISIBLE_DEVICES), if any
    created REAL NOT NULL, started REAL, ended REAL,
    stop_requested REAL
);
CREATE TABLE IF NOT EXISTS controllers (id TEXT PRIMARY KEY, host TEXT, pid INTEGER, heartbeat REAL);
"""


def _trial(row: sqlite3.Row) -> Trial:
    return Trial(id=row["id"], params=json.loads(row["params"]), state=row["state"], metric=row["metric"],
                 history=json.loads(row["history"]), exit_code=row["exit_code"], reason=row["reason"],
                 pid=row["pid"], gpu=row["gpu"], created=row["created"], started=row["started"],
                 ended=row["ended"], stop_requested=row["stop_requested"])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tables(db: sqlite3.Connection) -> dict[str, set[str]]:
    """Each table's column names."""
    names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
             if not r[0].startswith("sqlite_")]  # sqlite_sequence: SQLite's own
    return {name: {c[1] for c in db.execute(f"PRAGMA table_info({name})")} for name in names}


def _schema_tables() -> dict[str, set[str]]:
    with closing(sqlite3.connect(":memory:")) as db:
        db.executescript(SCHEMA)
        return _tables(db)


TABLES = _schema_tables()


def _check(path: Path) -> dict[str, set[str]]:
    """The tables of the database at `path`, read without writing to it. Refuses (UsageError) a damaged file,
    one that is no database, or another program's: writing to it could destroy what is left of it."""
    side_files = [path.with_name(path.name + suffix) for suffix in ("-wal", "-shm")]
    existed = [f.exists() for f in side_files]
    try:
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)) as db:
            problem = db.execute("PRAGMA quick_check").fetchone()[0]
            tables = _tables(db)
    except sqlite3.DatabaseError as e:
        problem = str(e)
    problem = " ".join(problem.replace("*** in database main ***", "").split())  # one line
    if problem == "ok" and any(TABLES.get(name) != columns for name, columns in tables.items()):
        problem = "its tables are not a sweep's: another program's, or an older version's"
    if problem != "ok":
        for side_file, was_there in zip(side_files, existed):
            if not was_there:  # a read-only look at a WAL database creates them
                side_file.unlink(missing_ok=True)
        raise UsageError(f"{path}: not a readable sweep database ({problem}); it was left as it is")
    return tables


class Store:
    """With `readonly`, nothing is ever written to the file (status, report, best)."""

    def __init__(self, path: Path, readonly: bool = False):
        path = Path(path)
        tables = _check(path) if path.exists() else {}
        if readonly:
            if tables != TABLES:
                raise UsageError(f"{path}: holds no sweep yet")
            self.db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30,
                                      isolation_level=None)
        else:
            # autocommit mode: each statement commits unless inside an explicit transaction()
            self.db = sqlite3.connect(path, timeout=30, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(SCHEMA)
        self.db.row_factory = sqlite3.Row

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


def is_local_target(target: str) -> bool:
    """Whether TARGET of status, report and best names a local sweep (True) or a W&B one (False); neither is
    one line. Light (no torch), so that a wrong TARGET is answered at once."""
    if (Path(target) / "sweep.db").is_file():
        return True
    if Path(target).is_dir():
        raise UsageError(f"{target}: no local sweep here (expected {Path(target) / 'sweep.db'})")
    if SWEEP_PATH.fullmatch(target):
        return False
    raise UsageError(f"{target}: neither a local sweep folder (no sweep.db in it) nor ENTITY/PROJECT/SWEEP_ID")


def open_store(directory: str) -> Store:
    """The sweep in DIR, opened read-only."""
    path = Path(directory) / "sweep.db"
    if not path.is_file():
        raise UsageError(f"{directory}: no local sweep here (expected {path})")
    store = Store(path, readonly=True)
    if store.sweep() is None:
        raise UsageError(f"{path}: holds no sweep yet")
    return store
