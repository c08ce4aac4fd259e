"""A sweep's state: the sweep, its trials, the live controllers. In SQLite (DIR/sweep.db: the default, no
server) or in PostgreSQL (a server that controllers on many boxes share), through the same calls
(SQLAlchemy Core).

Every suggestion, state change, metric and exit code is committed before the controller acts on it, so a
killed controller loses nothing: the next one resumes from here. Claims run in transactions no other
controller can interleave: `BEGIN IMMEDIATE` in SQLite (one writer at a time), a transaction-scoped
advisory lock on the sweep in PostgreSQL; so controllers on one DIR, or on many boxes, never hand out the
same trial or more than the sweep's count. A SQLite file that is damaged, no database, or another
program's is refused before anything writes to it; so is a PostgreSQL server that cannot be reached,
refuses the credentials or is older than the store needs.

DIR/store.json points a sweep DIR at its PostgreSQL store (the URL without a password: libpq takes it from
PGPASSWORD or ~/.pgpass), so that `status`, `report` and `best` read a shared sweep from its DIR.
"""

import fcntl
import json
import math
import os
import socket
import sqlite3
import time
import zlib
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import (
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from agent.contract import CRASHED, LIVE, PENDING, STATES
from agent.errors import SWEEP_PATH, UsageError

POINTER = "store.json"
SCHEMA_LOCK = zlib.crc32(b"cifar-sweeps schema")  # PostgreSQL advisory lock key while the tables are made
POSTGRES_MIN = 120000  # server_version_num: 12, the oldest release its project still supported when written
METADATA = MetaData()
SWEEPS = Table("sweeps", METADATA, Column("id", String, primary_key=True), Column("config", Text, nullable=False),
               Column("created", Float, nullable=False))
TRIALS = Table(
    "trials", METADATA,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("sweep_id", String, nullable=False),
    Column("id", String, nullable=False),  # the W&B run id
    Column("params", Text, nullable=False),  # {"lr": {"value": 0.01}, ...}, as W&B's agent receives them
    Column("state", String, nullable=False),
    Column("metric", Float),  # last value of the sweep's metric
    Column("history", Text, nullable=False, server_default="[]"),  # every value of the sweep's metric, in order
    Column("exit_code", Integer),
    Column("reason", Text),  # why failed, crashed, paused or stopped
    Column("controller", String),
    Column("host", String),  # the box it ran on
    Column("pid", Integer),
    Column("gpu", String),  # the GPUs it ran on (CUDA_VISIBLE_DEVICES), if any
    Column("created", Float, nullable=False), Column("started", Float), Column("ended", Float),
    Column("stop_requested", Float),
    # the run's history rows of the sweep's metrics, each with its _step, as W&B's scheduler reads them
    Column("rows", Text, nullable=False, server_default="[]"),
    Column("summary", Text, nullable=False, server_default="{}"),  # the run's latest number for each key it logged
    UniqueConstraint("sweep_id", "id"))
CONTROLLERS = Table("controllers", METADATA, Column("id", String, primary_key=True), Column("sweep_id", String),
                    Column("host", String), Column("pid", Integer), Column("heartbeat", Float))
TABLES = {t.name: {c.name for c in t.columns} for t in (SWEEPS, TRIALS, CONTROLLERS)}
ADDED = {"trials": ("rows", "summary")}  # columns newer than the first store: added to an older one when opened
TRIAL_COLUMNS = ("id", "params", "state", "metric", "history", "exit_code", "reason", "controller", "host", "pid",
                 "gpu", "created", "started", "ended", "stop_requested", "rows", "summary")
JSON_COLUMNS = {"params": "{}", "history": "[]", "rows": "[]", "summary": "{}"}


@dataclass
class Trial:
    id: str
    params: dict
    state: str
    metric: float | None = None
    history: list = field(default_factory=list)
    exit_code: int | None = None
    reason: str | None = None
    controller: str | None = None  # None: a suggestion that no controller has claimed yet
    pid: int | None = None
    gpu: str | None = None
    host: str | None = None  # the box it ran on
    created: float = 0.0
    started: float | None = None
    ended: float | None = None
    stop_requested: float | None = None
    rows: list = field(default_factory=list)  # {"_step": S, metric: value, ...}: the sweep's metrics as logged
    summary: dict = field(default_factory=dict)  # the run's latest number for each key it logged

    @property
    def config(self) -> dict:
        return {name: spec.get("value") for name, spec in self.params.items()}

    @property
    def duration(self) -> float | None:
        return None if self.started is None else (self.ended or time.time()) - self.started


def is_number(value) -> bool:
    """A finite int or float (not a bool): a usable metric or parameter value."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def state_counts(trials: list[Trial]) -> str:
    """"3 finished, 1 stopped", in the order of STATES; "no trials yet" when there are none."""
    return ", ".join(f"{n} {s}" for s in STATES if (n := sum(t.state == s for t in trials))) or "no trials yet"


def _trial(row) -> Trial:
    values = {k: getattr(row, k, JSON_COLUMNS.get(k)) for k in TRIAL_COLUMNS}  # an older store lacks ADDED
    return Trial(**{k: json.loads(v) if k in JSON_COLUMNS else v for k, v in values.items()})


def _ours(name: str, columns: set[str]) -> bool:
    """Whether a table of this name and columns is the store's, as this version or an older one made it."""
    return name in TABLES and columns <= TABLES[name] and TABLES[name] - columns <= set(ADDED.get(name, ()))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sqlite_tables(path: Path) -> set[str]:
    """The tables of the database at `path`, read without writing to it. Refuses (UsageError) one that is damaged,
    no database, or another program's: writing to it could destroy what is left of it."""
    side_files = [path.with_name(path.name + suffix) for suffix in ("-wal", "-shm")]
    existed = [f.exists() for f in side_files]
    try:
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)) as db:
            problem = db.execute("PRAGMA quick_check").fetchone()[0]
            names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                     if not r[0].startswith("sqlite_")]  # sqlite_sequence: SQLite's own
            tables = {n: {c[1] for c in db.execute(f"PRAGMA table_info({n})")} for n in names}
    except sqlite3.DatabaseError as e:
        problem = str(e)
    problem = " ".join(problem.replace("*** in database main ***", "").split())  # one line
    if problem == "ok" and not all(_ours(name, columns) for name, columns in tables.items()):
        problem = "its tables are not a sweep's: another program's, or an older version's"
    for side_file, was_there in zip(side_files, existed):
        if problem != "ok" and not was_there:  # a read-only look at a WAL database creates them
            side_file.unlink(missing_ok=True)
    if problem != "ok":
        raise UsageError(f"{path}: not a readable sweep database ({problem}); it was left as it is")
    return set(tables)


def redacted(url: str) -> str:
    """The URL as it may be printed and written down: no password."""
    return make_url(url)._replace(password=None).render_as_string(hide_password=False)  # set() keeps a None one


def connection_problem(url: str, error: DBAPIError) -> str:
    message = " ".join(str(error.orig).split())
    fix = ("set PGPASSWORD, or put the password in ~/.pgpass" if "password" in message
           else "start the server, or check the host, port and database in the URL")
    return f"{redacted(url)}: cannot use the store ({message}); fix: {fix}"


class Store:
    """A store (`url`: sqlite:///DIR/sweep.db or postgresql://user@host/db), bound to one sweep by `join` or
    `create`. With `readonly`, nothing is ever written (status, report, best)."""

    def __init__(self, url: str, readonly: bool = False):
        self.url, self.readonly = url, readonly
        self.postgres = url.startswith("postgresql")
        self.sweep_id: str | None = None
        self.connection = None  # the open transaction's, if any
        self.lease = None  # the scheduler's lease, when this process holds it (lead)
        if self.postgres:
            self.engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1), pool_pre_ping=True)
            self._check_server()
        else:
            self._open_sqlite(Path(make_url(url).database))
        if not readonly:
            with self.engine.begin() as connection:
                if self.postgres:  # controllers that start together: one makes the tables, the others wait
                    connection.execute(select(func.pg_advisory_xact_lock(SCHEMA_LOCK)))
                METADATA.create_all(connection)
                present = {c["name"] for c in inspect(connection).get_columns("trials")}
                for name in sorted(set(ADDED["trials"]) - present):  # an older version's store goes on in this one
                    connection.execute(text(f"ALTER TABLE trials ADD COLUMN {name} TEXT NOT NULL "
                                            f"DEFAULT '{JSON_COLUMNS[name]}'"))
        with self.engine.connect() as connection:
            found = inspect(connection)
            present = {c["name"] for c in found.get_columns("trials")} if found.has_table("trials") else set()
        self.trial_columns = [c for c in TRIALS.c if c.name in present]  # a read-only older store lacks ADDED
        if not self.postgres:  # a SQLite file holds one sweep: bound to it, if it has one yet
            self.sweep()

    def _open_sqlite(self, path: Path) -> None:
        tables = _sqlite_tables(path) if path.exists() else set()
        if self.readonly and not {"sweeps", "trials"} <= tables:
            raise UsageError(f"{path}: holds no sweep yet")
        where = f"file:{path.resolve()}?mode=ro&uri=true" if self.readonly else str(path)
        self.engine = create_engine(f"sqlite:///{where}", connect_args={"timeout": 30})

        @event.listens_for(self.engine, "connect")
        def _connect(dbapi_connection, record):
            dbapi_connection.isolation_level = None  # transactions are begun here, not by the driver
            if not self.readonly:
                dbapi_connection.execute("PRAGMA journal_mode=WAL")

        @event.listens_for(self.engine, "begin")
        def _begin(connection):
            connection.exec_driver_sql("BEGIN IMMEDIATE" if not self.readonly else "BEGIN")

    def _check_server(self) -> None:
        try:
            with self.engine.connect() as connection:
                version = int(connection.execute(text("SHOW server_version_num")).scalar())
        except DBAPIError as e:
            raise UsageError(connection_problem(self.url, e)) from None
        if version < POSTGRES_MIN:
            raise UsageError(f"{redacted(self.url)}: PostgreSQL {version // 10000} is older than the store needs "
                             f"({POSTGRES_MIN // 10000} or newer)")

    @contextmanager
    def _connect(self):
        if self.connection is not None:
            yield self.connection
            return
        try:
            with self.engine.begin() as connection:
                yield connection
        except OperationalError as e:
            if self.postgres:
                raise UsageError(connection_problem(self.url, e)) from None
            raise

    @contextmanager
    def transaction(self):
        """Statements inside run as one transaction that no other controller of this sweep interleaves with."""
        with self._connect() as connection:
            if self.postgres:
                connection.execute(select(func.pg_advisory_xact_lock(zlib.crc32(self.sweep_id.encode()))))
            self.connection = connection
            try:
                yield
            finally:
                self.connection = None

    def close(self) -> None:
        self.engine.dispose()

    # the sweep

    def sweeps(self) -> list[tuple[str, dict]]:
        with self._connect() as c:
            return [(r.id, json.loads(r.config)) for r in c.execute(select(SWEEPS).order_by(SWEEPS.c.created))]

    def sweep(self) -> tuple[str, dict] | None:
        """The bound sweep; in SQLite, the file's one sweep (binding to it)."""
        query = select(SWEEPS) if self.sweep_id is None else select(SWEEPS).where(SWEEPS.c.id == self.sweep_id)
        with self._connect() as c:
            row = c.execute(query.order_by(SWEEPS.c.created)).first()
        if row is None:
            return None
        self.sweep_id = row.id
        return row.id, json.loads(row.config)

    def join(self, sweep_id: str, config: dict) -> bool:
        """Binds to sweep `sweep_id`, made from `config` here if the store has none by that id; True if it made
        it. A sweep of that id from another YAML is refused."""
        self.sweep_id = sweep_id
        with self.transaction():
            existing = self.sweep()
            if existing is None:
                self.connection.execute(insert(SWEEPS).values(id=sweep_id, config=json.dumps(config),
                                                              created=time.time()))
                return True
        if existing[1] != config:
            raise UsageError(f"{self.where()}: holds sweep {sweep_id} made from another YAML; use a new "
                             f"{'--sweep-id' if self.postgres else '--dir'}")
        return False

    def where(self) -> str:
        return redacted(self.url) if self.postgres else str(make_url(self.url).database)

    # trials

    def trials(self) -> list[Trial]:
        with self._connect() as c:
            rows = c.execute(select(*self.trial_columns).where(TRIALS.c.sweep_id == self.sweep_id)
                             .order_by(TRIALS.c.seq))
            return [_trial(r) for r in rows]

    def trial(self, trial_id: str) -> Trial:
        with self._connect() as c:
            return _trial(c.execute(select(*self.trial_columns).where(TRIALS.c.sweep_id == self.sweep_id,
                                                         TRIALS.c.id == trial_id)).one())

    def add_trial(self, trial_id: str, params: dict, controller: str | None) -> None:
        with self._connect() as c:
            c.execute(insert(TRIALS).values(sweep_id=self.sweep_id, id=trial_id, params=json.dumps(params),
                                            state=PENDING, controller=controller, host=socket.gethostname(),
                                            created=time.time()))

    def update(self, trial_id: str, **values) -> None:
        values = {k: json.dumps(v) if k in JSON_COLUMNS else v for k, v in values.items()}
        with self._connect() as c:
            c.execute(update(TRIALS).where(TRIALS.c.sweep_id == self.sweep_id, TRIALS.c.id == trial_id)
                      .values(**values))

    # controllers: a heartbeat each loop; a dead one's live trials become crashed

    def register_controller(self, controller: str) -> None:
        with self._connect() as c:
            values = dict(sweep_id=self.sweep_id, host=socket.gethostname(), pid=os.getpid(), heartbeat=time.time())
            try:
                c.execute(insert(CONTROLLERS).values(id=controller, **values))
            except IntegrityError:  # registered before: its row goes on
                c.execute(update(CONTROLLERS).where(CONTROLLERS.c.id == controller).values(**values))

    def alive_controllers(self) -> int:
        with self._connect() as c:
            return c.execute(select(func.count()).select_from(CONTROLLERS)
                             .where(CONTROLLERS.c.sweep_id == self.sweep_id)).scalar()

    def lead(self) -> bool:
        """Whether this process holds the sweep's scheduler lease (taking it if it is free): one controller of a
        sweep runs its scheduler, as W&B allows one `wandb sweep-scheduler` a sweep. The lease goes with the
        process: a PostgreSQL session lock on a connection of its own, a lock on DIR/scheduler.lock in SQLite;
        a controller that dies frees it, and another takes it."""
        if self.lease is not None:
            return True
        if self.postgres:
            connection = self.engine.connect()
            key = zlib.crc32(f"scheduler {self.sweep_id}".encode())
            if connection.execute(select(func.pg_try_advisory_lock(key))).scalar():
                connection.commit()
                self.lease = connection
            else:
                connection.close()
        else:
            lock = open(Path(make_url(self.url).database).with_name("scheduler.lock"), "a")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.lease = lock
            except BlockingIOError:
                lock.close()
        return self.lease is not None

    def heartbeat(self, controller: str) -> None:
        with self._connect() as c:
            c.execute(update(CONTROLLERS).where(CONTROLLERS.c.id == controller).values(heartbeat=time.time()))

    def unregister_controller(self, controller: str) -> None:
        with self._connect() as c:
            c.execute(delete(CONTROLLERS).where(CONTROLLERS.c.id == controller))

    def reap_dead_controllers(self, stale_after: float = 30.0) -> list[str]:
        """Marks live trials of this sweep whose controller died (its pid gone on this box, or its heartbeat
        `stale_after` seconds old on any) or is unknown crashed; returns their ids."""
        with self.transaction():
            c, host, now = self.connection, socket.gethostname(), time.time()
            mine = CONTROLLERS.c.sweep_id == self.sweep_id
            dead = [r.id for r in c.execute(select(CONTROLLERS).where(mine))
                    if (r.host == host and not _pid_alive(r.pid)) or now - r.heartbeat > stale_after]
            if dead:
                c.execute(delete(CONTROLLERS).where(CONTROLLERS.c.id.in_(dead)))
            alive = {r.id for r in c.execute(select(CONTROLLERS.c.id).where(mine))}
            orphans = [r.id for r in c.execute(select(TRIALS.c.id, TRIALS.c.controller).where(
                TRIALS.c.sweep_id == self.sweep_id, TRIALS.c.state.in_(LIVE), TRIALS.c.controller.is_not(None)))
                if r.controller not in alive]
            for trial_id in orphans:
                self.update(trial_id, state=CRASHED, reason="its controller died", ended=now)
        return orphans


def sqlite_url(directory: Path) -> str:
    return f"sqlite:///{Path(directory) / 'sweep.db'}"


def write_pointer(directory: Path, store: Store) -> None:
    """DIR/store.json: where a sweep DIR's PostgreSQL store is, and its sweep."""
    (Path(directory) / POINTER).write_text(json.dumps({"store": redacted(store.url), "sweep_id": store.sweep_id}))


def is_local_target(target: str) -> bool:
    """Whether TARGET of status, report and best names a sweep DIR (True; its store SQLite or PostgreSQL) or a
    W&B sweep (False); neither is one line. Light (no torch), so that a wrong TARGET is answered at once."""
    if (Path(target) / "sweep.db").is_file() or (Path(target) / POINTER).is_file():
        return True
    if Path(target).is_dir():
        raise UsageError(f"{target}: no local sweep here (expected {Path(target) / 'sweep.db'})")
    if SWEEP_PATH.fullmatch(target):
        return False
    raise UsageError(f"{target}: neither a local sweep folder (no sweep.db in it) nor ENTITY/PROJECT/SWEEP_ID")


def open_store(directory: str) -> Store:
    """The sweep of DIR, opened read-only: DIR/sweep.db, or the PostgreSQL store DIR/store.json names."""
    pointer = Path(directory) / POINTER
    if pointer.is_file():
        where = json.loads(pointer.read_text())
        store = Store(where["store"], readonly=True)
        store.sweep_id = where["sweep_id"]
    elif (Path(directory) / "sweep.db").is_file():
        store = Store(sqlite_url(Path(directory)), readonly=True)
    else:
        raise UsageError(f"{directory}: no local sweep here (expected {Path(directory) / 'sweep.db'})")
    if store.sweep() is None:
        raise UsageError(f"{store.where()}: holds no sweep {store.sweep_id or ''}".rstrip())
    return store
