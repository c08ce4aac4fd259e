"""The light side of warm trials: the workers' starter, and `python -m agent run ...` handing itself
to its slot's worker.

Standard library only, imported before anything else by agent/__main__.py: a trial that finds
its slot's worker (AGENT_WARM_SOCKET, set by `agent local` and `agent launch`) starts training in
a process forked from one that has imported torch, Lightning and wandb already (agent/program/warm.py),
instead of spending seconds importing them. The request carries argv, environment, working
directory, umask, CPU affinity and this process's stdin/stdout/stderr (as file descriptors), so
the trial writes where this process would have. This process stays the trial to whoever started
it (the local controller, `wandb agent`): it relays every signal it gets to the trial and ends as
the trial ended, with the same exit code or killed by the same signal. No worker, or a worker
that refuses: None, and the program runs cold, as it always could.

`agent local` and `agent launch` start a WarmWorker per slot (GPU or CPU worker) and wait until
it is ready; a worker that cannot start only means cold trials, with a line saying so.

Messages, one JSON object per datagram:
  client -> worker  {"op": "start", ...} with fds 0, 1, 2;  {"op": "signal", "signum": N}
  worker -> client  {"op": "started", "pid": P};  {"op": "refused", "reason": R};
                    {"op": "exit", "code": C} or {"op": "exit", "signal": S}
  trial  -> client  {"op": "exiting", "code": C}: its own word, for when the worker died first
"""

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

SOCKET_ENV = "AGENT_WARM_SOCKET"
RELAYED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGQUIT)
MAX_MESSAGE = 1 << 20
READY_TIMEOUT = 300  # seconds a worker may take to import everything on a slow, busy box


def _stop_with_parent():
    # A controller killed with SIGKILL must not leave its workers behind: SIGTERM ends a worker once
    # its running trials have ended.
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class WarmWorker:
    """`python -m agent.program.warm` for one slot, its output in `log`. Socket paths are short (the kernel
    allows 108 bytes), so they live in a temporary folder, not in the sweep's."""

    def __init__(self, name: str, env: dict, log: Path):
        self.folder = tempfile.mkdtemp(prefix="agent-warm-")
        self.socket = os.path.join(self.folder, f"{name}.sock")
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "agent.program.warm", self.socket], env=env, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_stop_with_parent)

    def ready(self) -> bool | None:
        """True once it listens, False if it exited (its trials run cold), None while it is starting."""
        if os.path.exists(self.socket):
            return True
        return False if self.proc.poll() is not None else None

    def stop(self) -> None:
        """Takes no new trial; returns once its running trials have ended and it has exited."""
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait()
        for leftover in Path(self.folder).iterdir():
            leftover.unlink()
        os.rmdir(self.folder)


def send(sock: socket.socket, message: dict, fds: tuple[int, ...] = ()) -> None:
    socket.send_fds(sock, [json.dumps(message).encode()], list(fds))


def run_warm(argv: list[str]) -> int | None:
    """Runs `agent run ARGV` in this slot's warm worker: its exit code, or None to run cold."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.connect(os.environ[SOCKET_ENV])
    except OSError:  # no worker (yet, or any more): the cold path is always correct
        sock.close()
        return None
    # A signal ignored here (SIGINT in a background job of a non-interactive shell) stays ignored
    # in the trial, as in a cold run; the others are passed on.
    ignored = [s for s in RELAYED if signal.getsignal(s) == signal.SIG_IGN]

    def relay(signum, frame):
        try:
            send(sock, {"op": "signal", "signum": signum})
        except OSError:
            pass  # the worker is gone: its closed socket ends the wait below

    previous = {s: signal.signal(s, relay) for s in RELAYED if s not in ignored}
    umask = os.umask(0o022)
    os.umask(umask)
    try:
        send(sock, {"op": "start", "argv": argv, "env": dict(os.environ), "cwd": os.getcwd(), "umask": umask,
                    "affinity": sorted(os.sched_getaffinity(0)), "ignored": [int(s) for s in ignored]},
             fds=(0, 1, 2))
        message = json.loads(sock.recv(MAX_MESSAGE) or b'{"op": "refused"}')
    except OSError:
        message = {"op": "refused"}
    if message["op"] != "started":  # refused, or gone before it started the trial: run cold
        for s, handler in previous.items():
            signal.signal(s, handler)
        sock.close()
        return None
    # From here on the trial runs in the worker: never a second time here, whatever happens.
    try:
        return wait_for_exit(sock, message["pid"])
    finally:
        sock.close()


def wait_for_exit(sock: socket.socket, pid: int) -> int:
    said = None
    try:
        while data := sock.recv(MAX_MESSAGE):
            message = json.loads(data)
            if message["op"] == "exiting":
                said = message["code"]
            elif message["op"] == "exit" and "signal" in message:
                # Killed by a signal: end the same way, so that whoever started us sees it too.
                for s in RELAYED:
                    signal.signal(s, signal.SIG_DFL)
                os.kill(os.getpid(), message["signal"])  # SIGKILL, or a relayed one now at its default
                return 128 + message["signal"]
            elif message["op"] == "exit":
                return message["code"]
    except OSError:
        pass
    print(f"agent run: the warm worker went away before trial {pid} ended", file=sys.stderr)
    return said if said is not None else 1
