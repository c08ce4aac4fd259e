"""The light side of warm trials: `python -m agent run ...` handing itself to its slot's worker.

Standard library only, imported before anything else by agent/__main__.py: a trial that finds
its slot's worker (AGENT_WARM_SOCKET, set by `agent local` and `agent launch`) starts training in
a process forked from one that has imported torch, Lightning and wandb already (agent/program/warm.py),
instead of spending seconds importing them. The request carries argv, environment, working
directory, umask, CPU affinity and this process's stdin/stdout/stderr (as file descriptors), so
the trial writes where this process would have. This process stays the trial to whoever started
it (the local controller, `wandb agent`): it relays every signal it gets to the trial and ends as
the trial ended, with the same exit code or killed by the same signal. No worker, or a worker
that refuses: None, and the program runs cold, as it always could.

`agent local` and `agent launch` start the workers (agent/controller/workers.py).

Messages, one JSON object per datagram:
  client -> worker  {"op": "start", ...} with fds 0, 1, 2;  {"op": "signal", "signum": N}
  worker -> client  {"op": "started", "pid": P};  {"op": "refused", "reason": R};
                    {"op": "exit", "code": C} or {"op": "exit", "signal": S}
  trial  -> client  {"op": "exiting", "code": C}: its own word, for when the worker died first
"""

import json
import os
import signal
import socket
import sys

from agent import contract

RELAYED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGQUIT)
MAX_MESSAGE = 1 << 20


def send(sock: socket.socket, message: dict, fds: tuple[int, ...] = ()) -> None:
    socket.send_fds(sock, [json.dumps(message).encode()], list(fds))


def run_warm(argv: list[str]) -> int | None:
    """Runs `agent run ARGV` in this slot's warm worker: its exit code, or None to run cold."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.connect(os.environ[contract.WARM_SOCKET_ENV])
    except OSError:  # no worker (yet, or any more): the cold path is always correct
        sock.close()
        return None
    # A signal ignored here (SIGINT in a background job of a non-interactive shell) stays ignored
    # in the trial, as in a cold run (run.py's SignalRequests); the others are passed on.
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
