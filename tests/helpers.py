"""What many tests need: the offline W&B environment, W&B's own reader of offline runs, waiting on a
handshake (a file, a line, a record) instead of on a clock, holding a trial where a signal is to land, and
W&B's agent with a server the test plays."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from wandb.util import get_core_path

from agent.contract import HOLD_ENV
from agent.install import this_python_first

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


def history(records: list[dict]) -> list[dict]:
    """The rows of a run's history, in order, from its records (leet_records)."""
    return [h["item"] for h in records_of(records, "history")]


def validated_epochs(records: list[dict]) -> list[int]:
    """The epochs whose validation a run logged, in order."""
    return [row["epoch"] for row in history(records) if "val_acc" in row]


def model_artifacts(records: list[dict]) -> list[dict]:
    """The `model-<run id>` artifacts a run logged, in order: each improvement, then the tested best."""
    return [a for a in records_of(records, "artifact") if a["type"] == "model"]


def resume_artifact_names(records: list[dict]) -> list[str]:
    """The names of the `resume-<run id>` artifacts a run logged: the full state it saved when preempted."""
    return [a["name"] for a in records_of(records, "artifact") if a["type"] == "checkpoint"]


def exit_codes(records: list[dict]) -> list[int]:
    """The exit code of each exit record of a run (W&B leaves out a 0)."""
    return [e.get("exit_code", 0) for e in records_of(records, "exit")]


def run_dirs(wandb_dir: Path, run_id: str) -> list[Path]:
    """Every attempt's offline run directory of `run_id` under `wandb_dir`, oldest first."""
    return sorted((Path(wandb_dir) / "wandb").glob(f"offline-run-*-{run_id}"))


def run_dir_of(result: dict) -> Path:
    """The offline run directory of a logged_run's result (its best checkpoint is in RUN_DIR/checkpoints)."""
    return Path(result["best_checkpoint"]).parents[1]


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


def waits_on_lock(pid: int, lock: Path) -> bool:
    """Whether process `pid` is blocked in flock on `lock` (/proc/locks marks a waiter with '->')."""
    inode = str(lock.stat().st_ino)
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if fields[1] == "->" and fields[2] == "FLOCK" and fields[5] == str(pid) and fields[6].endswith(f":{inode}"):
            return True
    return False


def python(source: str, *args) -> subprocess.Popen:
    """`python -c SOURCE ARGS` with the repo importable, its output piped (a test's second process)."""
    return subprocess.Popen([sys.executable, "-c", source, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def dead(pid: int) -> bool:
    """Exited: a zombie its parent has not reaped yet, or gone (reaped between two looks is gone too)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


# The signals tests send: each process a test will signal starts with them at their default.
SENT = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def default_signals() -> None:
    """preexec_fn of a process a test will signal. A process inherits ignored signals, and bash starts a
    background job (`pytest ... &` in a script) with SIGINT ignored: a warm trial's client then passes the
    ignore on to its trial on purpose (agent/program/handoff.py), and a Ctrl-C test's trial would run to its
    end. What the test sends must reach what it tests, however the suite was started."""
    for signum in SENT:
        signal.signal(signum, signal.SIG_DFL)


def signalled(command: list[str], **popen) -> subprocess.Popen:
    """subprocess.Popen of a process the test will signal (or whose children it will): SENT at their default."""
    return subprocess.Popen(command, preexec_fn=default_signals, **popen)


class Hold:
    """The test's side of agent/program/hold.py: `env` (for the trial's environment, or that of whatever starts
    it) holds a trial the `occurrence`-th time it reaches `phase`, so that a signal lands exactly there. Tests
    make theirs with the `hold_at` fixture, which ends each at teardown.

    wait() until a trial is held; deliver() a signal to it (sent to whatever relays it, and waited for until the
    trial has handled it) and release it; release() alone; end() the hold, for trials that inherit `env` later.
    A released hold holds again the next trial that reaches its point (a sweep's next trial inherits `env`)."""

    def __init__(self, directory: Path, phase: str, occurrence: int = 1):
        self.where = f"{phase}:{occurrence}"
        self.fifo = Path(directory) / f"hold-{phase}-{occurrence}"
        os.mkfifo(self.fifo)
        self.env = {HOLD_ENV: f"{self.where} {self.fifo}"}
        self.held, self.signals = Path(f"{self.fifo}.held"), Path(f"{self.fifo}.signals")

    def wait(self, proc: subprocess.Popen | None = None, timeout: float = 120) -> None:
        wait_for(self.held.exists, f"a trial held at {self.where}", timeout, proc)

    def deliver(self, send: Callable[[], object], signum: int, proc: subprocess.Popen | None = None) -> None:
        """Calls `send`, which sends a signal that reaches the held trial as `signum` (maybe through others),
        waits until the trial has handled it, then releases it."""
        send()
        name = signal.Signals(signum).name
        wait_for(lambda: self.signals.exists() and name in self.signals.read_text().split(),
                 f"{name} to reach the trial held at {self.where}", 60, proc)
        self.release()

    def release(self) -> None:
        self.held.unlink()
        self.signals.unlink(missing_ok=True)
        fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)  # the held trial has it open: never blocks
        try:
            os.write(fd, b"go")
        finally:
            os.close(fd)

    def end(self) -> None:
        """No trial holds here any more: one held now (a test that failed meanwhile) goes on too."""
        ended = self.fifo.with_name(f"{self.fifo.name}.ended")
        try:
            os.replace(self.fifo, ended)  # no trial opens it from now on; one that has it open is let go below
        except FileNotFoundError:
            return
        try:
            fd = os.open(ended, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: no trial has it open
            pass
        else:
            os.write(fd, b"go")
            os.close(fd)
        ended.unlink()


def fresh_env(root: Path, **extra: str) -> dict[str, str]:
    """os.environ with offline W&B under `root` and `extra` on top (no W&B variables of the caller's), and this
    Python first on PATH, as `agent local` and `agent launch` give their trials: W&B's agent started by a test
    runs `python`, which must be the one running the tests, activated or not."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return this_python_first({**env, **offline_env(root), **extra})


# W&B's real `wandb agent`, its server calls replaced (tests/programs/wandb_agent_offline.py), driven through files.
AGENT = [sys.executable, str(PROGRAMS / "wandb_agent_offline.py")]


class Server:
    """The test's side of the fake W&B server: command files in, heartbeats out."""

    def __init__(self, control: Path, args: dict):
        self.control, self.args, self.sent = control, args, 0

    def send(self, *commands: dict):
        (self.control / f"{self.sent:03d}.json").write_text(json.dumps(list(commands)))
        self.sent += 1

    def run(self, run_id: str, kind: str = "run", **args):
        self.send({"type": kind, "run_id": run_id, "program": "unused", "args": {**self.args, **args}})

    def heartbeats(self) -> list[dict]:
        path = self.control / "heartbeats.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def running(self, run_id: str) -> bool:
        beats = self.heartbeats()
        return bool(beats) and run_id in beats[-1]

    def handed_out(self) -> bool:
        return not list(self.control.glob("*.json"))


def start_wandb_agent(tmp_path: Path, command: list[str], args: dict, **env: str) -> tuple[Server, subprocess.Popen]:
    """W&B's agent (AGENT) in `command`, its server the returned Server, handing out runs of `args`."""
    control = tmp_path / "control"
    control.mkdir()
    sweep = yaml.safe_load((REPO / "sweeps" / "bayes.yaml").read_text())
    (control / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    env = fresh_env(tmp_path, WANDB_API_KEY="x" * 40, WANDB_BASE_URL="https://api.wandb.test", **env)
    command = [part.format(control=control) for part in command]
    proc = signalled(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return Server(control, args), proc


def run_record(root, run_id, attempt=-1) -> tuple[list[dict], int]:
    """The records of an attempt of `run_id` under `root` (the newest by default) and its exit code."""
    records = leet_records(run_dirs(root, run_id)[attempt])
    [code] = exit_codes(records)
    return records, code


class PostgresServer:
    """A real PostgreSQL server in a temporary folder, from Debian's postgresql (initdb and pg_ctl, off PATH):
    local (Unix socket) connections trusted, TCP on 127.0.0.1 with `password`. `url(db)` makes a fresh
    database and names it. As root, the server runs as the package's postgres user (initdb refuses root)."""

    password = "secret"

    def __init__(self, binaries: Path, root: Path, port: int, as_server: list[str]):
        self.binaries, self.root, self.port, self.as_server = binaries, root, port, as_server

    @classmethod
    def start(cls) -> "PostgresServer | None":
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True)
        binaries = found[0].parent if found else Path(shutil.which("initdb")).parent if shutil.which("initdb") else None
        if binaries is None:
            return None
        root = Path(tempfile.mkdtemp(prefix="pg-"))
        as_server = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if as_server:
            shutil.chown(root, "postgres")
        (root / "pw").write_text(f"{cls.password}\n")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = cls(binaries, root, port, as_server)
        server.ctl("initdb", "-D", root / "data", "-U", "sweeps", "--auth-local=trust", "--auth-host=scram-sha-256",
                   f"--pwfile={root / 'pw'}", "--no-sync")
        server.ctl("pg_ctl", "-D", root / "data", "-l", root / "log", "-w", "-o",
                   f"-k {root} -c listen_addresses=127.0.0.1 -p {port} -c fsync=off -c max_connections=200", "start")
        return server

    def ctl(self, program: str, *args) -> None:
        subprocess.run([*self.as_server, self.binaries / program, *map(str, args)], check=True, capture_output=True)

    def url(self, name: str) -> str:
        from sqlalchemy import create_engine, text

        engine = create_engine(f"postgresql+psycopg://sweeps@/postgres?host={self.root}&port={self.port}",
                               isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        return f"postgresql://sweeps@/{name}?host={self.root}&port={self.port}"

    def stop(self) -> None:
        self.ctl("pg_ctl", "-D", self.root / "data", "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


def logged_run(config, callbacks=()) -> dict:
    """One run of `config` in this process as `agent run` runs it: listening to the contract's signals, logged to
    a W&B run (offline under the test's WANDB_DIR), its result's `ended_by` as the contract names it."""
    from agent.program.run import SignalRequests
    from agent.program.run import logged_run as program_run

    with SignalRequests() as requests:
        return program_run(config, requests, callbacks)
