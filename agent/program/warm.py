"""A warm worker: `python -m agent.program.warm SOCKET`, one per GPU or CPU slot, started by `agent local`
and `agent launch` (which wait for it: the socket appears once it is ready).

It imports torch, Lightning, wandb and the project once, then forks a fresh process per trial
(agent/program/handoff.py sends them): each trial is still a process of its own, with its own
signals, exit code, GPU memory and W&B run, but it starts in a fraction of a second instead of
importing for several. What keeps a fork correct:
- CUDA: nothing here may initialise it (no torch.cuda query, no Trainer, nothing on a GPU); a
  canary fork checks at start that children can still use it. Each trial sets its own
  CUDA_VISIBLE_DEVICES before CUDA starts.
- Threads: a child forked after a multi-threaded OpenMP region hangs in its first parallel op,
  so this process runs torch on one thread and forks only while it has exactly one thread.
- wandb: no wandb.setup() here (it starts threads). Trials share one wandb-core, started
  detached and passed as WANDB_SERVICE; a forked child's wandb sees its new pid and sets itself
  up afresh from its own environment. A trial that dies without finishing its run (SIGKILL,
  segfault) leaves that run open in the core, so the core is then retired for a fresh one.
- Environment: settings read only at interpreter start or import (PYTHONPATH, LD_*, torch's)
  must match; a trial whose do not is refused and runs cold.
"""

import json
import os
import selectors
import signal
import socket
import sys
import traceback
from importlib import import_module

from agent.program.handoff import MAX_MESSAGE, RELAYED

ENV_AT_START = dict(os.environ)  # before torch and Lightning edit it
IMPORT_TIME = ("PYTHON", "LD_", "TORCH", "PYTORCH_", "GOMP_", "MKL_", "OPENBLAS_", "CUDA_MODULE_")
RUNTIME_READ = {"PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_NVML_BASED_CUDA_CHECK", "PYTHONUNBUFFERED"}


def preload() -> None:
    import torch

    torch.set_num_threads(1)  # before any tensor op: see the module docstring
    # What a trial imports, once (wandb.init imports wandb.sdk.launch...: 0.5 s a trial otherwise).
    for module in ("agent.program.run", "cifar_core.train", "cifar_core.folder", "timm",
                   "wandb.sdk.launch.inputs.internal"):
        import_module(module)
    import wandb.util

    # Every run's requirements.txt lists the installed packages: read them once, not per trial.
    packages = list(wandb.util.working_set())
    wandb.util.working_set = lambda: iter(packages)
    from agent.install import pair_problem

    pair_problem()  # its metadata reads are cached: once here, not in every trial


def children_can_use_cuda() -> bool:
    import torch

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(w, b"1" if torch._C._cuda_isInBadFork() else b"0")
        os._exit(0)
    os.close(w)
    poisoned = os.read(r, 1) == b"1"
    os.close(r)
    os.waitpid(pid, 0)
    return not poisoned


class WandbCore:
    """The wandb-core the trials share. Detached, so it outlives a crash of this worker and the trials
    running then keep logging; held by an idle connection, so it does not time out between trials."""

    def __init__(self):
        self.current = None
        self.of_trial: dict[int, object] = {}

    def for_next_trial(self):
        if self.current is not None and self.current._process.poll() is not None:
            self.current.keepalive.close()
            self.current = None
        if self.current is None:
            from wandb.sdk.lib.service import service_process
            from wandb.sdk.wandb_settings import Settings

            self.current = service_process.start_detached(Settings(), idle_timeout="10m")
            self.current.keepalive = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.current.keepalive.connect(self.current.token.env_value.split("-unix-", 1)[1])
        return self.current

    def ended(self, pid: int, finished_its_run: bool) -> None:
        core = self.of_trial.pop(pid, None)
        if core is not None and not finished_its_run and core is self.current:
            self.current = None  # its run is still open in there: new trials get a fresh core
            self.for_next_trial()
        if core is not None and core is not self.current and core not in self.of_trial.values():
            self.stop(core)

    def fds(self) -> list[int]:
        return [c.keepalive.fileno() for c in {self.current, *self.of_trial.values()} if c is not None]

    def close(self) -> None:
        if self.current is not None and self.current not in self.of_trial.values():
            self.stop(self.current)

    @staticmethod
    def stop(core) -> None:
        core.keepalive.close()
        core._process.terminate()
        core._process.wait()


def refusal(env: dict) -> str | None:
    keys = {k for k in (*env, *ENV_AT_START) if k.startswith(IMPORT_TIME) and k not in RUNTIME_READ}
    for key in sorted(keys):
        if env.get(key) != ENV_AT_START.get(key):
            return f"{key}={env.get(key)!r} differs from the worker's {ENV_AT_START.get(key)!r}"
    threads = len(os.listdir("/proc/self/task"))
    return None if threads == 1 else f"the worker has {threads} threads: forking it is unsafe"


def become_trial(conn: socket.socket, request: dict, fds: list[int], inherited: list[int], mask,
                 finished_w: int, core_token: str) -> None:
    """In the forked child: turn into the trial `python -m agent run ARGV` would be. Never returns."""
    code = 1
    try:
        os.setsid()  # its own process group: the worker relays the client's signals to it
        for fd in inherited:
            os.close(fd)
        for s in RELAYED:
            signal.signal(s, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for s in request["ignored"]:
            signal.signal(s, signal.SIG_IGN)
        signal.set_wakeup_fd(-1)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # what was relayed meanwhile arrives now
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        # The same sys.std* objects, now on the client's descriptors: wandb's console capture
        # wrapped their write() at import.
        sys.stdout.reconfigure(line_buffering=os.isatty(1))
        os.chdir(request["cwd"])
        os.umask(request["umask"])
        os.sched_setaffinity(0, request["affinity"])
        os.environ.clear()
        os.environ.update({"WANDB_SERVICE": core_token, **request["env"]})  # the client's own core wins

        import torch

        threads = os.environ.get("OMP_NUM_THREADS", "")
        torch.set_num_threads(int(threads) if threads.isdigit() else len(request["affinity"]))
        import agent.__main__ as program

        sys.argv = [program.__file__, "run", *request["argv"]]
        sys.modules["__main__"] = program  # what wandb records as the program, as for a cold run
        code = program.main(["run", *request["argv"]])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            import wandb

            if wandb.run is not None:  # what wandb's exit hook does in a cold process
                wandb.run.finish(exit_code=code)
            sys.stdout.flush()
            sys.stderr.flush()
            conn.send(json.dumps({"op": "exiting", "code": code}).encode())
            os.write(finished_w, b"F")  # ended through Python: no run left open in the shared core
        finally:
            os._exit(code & 0xFF)


class Worker:
    def __init__(self, path: str, core: WandbCore):
        self.path, self.core = path, core
        self.selector = selectors.DefaultSelector()
        self.trials: dict[int, dict] = {}  # by connection fd: conn, pid, pidfd, finished_r
        self.stopping = False
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w)
        self.selector.register(self.wake_r, selectors.EVENT_READ, ("wake", None))
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self.on_stop)
        partial = f"{path}.{os.getpid()}"  # bound, then renamed: the socket appears only when ready
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(partial)
        self.listener.listen(64)
        os.replace(partial, path)
        self.selector.register(self.listener, selectors.EVENT_READ, ("listen", None))

    def on_stop(self, signum, frame):
        self.stopping = True

    def serve(self) -> None:
        while not (self.stopping and not self.trials):
            if self.stopping and self.listener.fileno() >= 0:  # no new trials; running ones finish
                self.selector.unregister(self.listener)
                self.listener.close()
                os.unlink(self.path)
            for key, _ in self.selector.select(timeout=1.0):
                kind, conn = key.data
                if kind == "listen":
                    conn, _ = self.listener.accept()
                    self.trials[conn.fileno()] = {"conn": conn, "pid": None}
                    self.selector.register(conn, selectors.EVENT_READ, ("conn", conn))
                elif kind == "wake":
                    os.read(self.wake_r, 512)
                elif kind == "conn":
                    self.on_message(conn)
                else:
                    self.on_exit(conn)

    def on_message(self, conn: socket.socket) -> None:
        trial = self.trials[conn.fileno()]
        try:
            data, fds, _, _ = socket.recv_fds(conn, MAX_MESSAGE, 3)
        except OSError:
            data, fds = b"", []
        if not data:  # the client is gone (killed): its trial must not outlive it
            if trial["pid"]:
                self.signal(trial["pid"], signal.SIGKILL)
                self.selector.unregister(conn)
                trial["orphan"] = True  # reaped when its pidfd says so
            else:
                self.forget(conn)
            return
        message = json.loads(data)
        if message["op"] == "signal" and trial["pid"]:
            self.signal(trial["pid"], message["signum"])
        elif message["op"] == "signal":  # relayed before the trial existed: it gets it once it does
            trial.setdefault("pending", []).append(message["signum"])
        elif message["op"] == "start" and not trial["pid"] and len(fds) == 3:
            reason = "the worker is stopping" if self.stopping else refusal(message["env"])
            if reason:
                conn.send(json.dumps({"op": "refused", "reason": reason}).encode())
            else:
                self.start(conn, trial, message, fds)
        for fd in fds if not trial["pid"] else ():
            os.close(fd)

    def start(self, conn: socket.socket, trial: dict, request: dict, fds: list[int]) -> None:
        core = self.core.for_next_trial()
        inherited = [self.listener.fileno(), self.selector.fileno(), self.wake_r, self.wake_w, *self.core.fds(),
                     *[t["conn"].fileno() for t in self.trials.values() if t["conn"] is not conn],
                     *[fd for t in self.trials.values() if t["pid"] for fd in (t["pidfd"], t["finished_r"])]]
        finished_r, finished_w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        # Blocked across the fork: no signal may reach the child while it still has our handlers.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, set(RELAYED))
        pid = os.fork()
        if pid == 0:
            os.close(finished_r)
            become_trial(conn, request, fds, inherited, mask, finished_w, core.token.env_value)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(finished_w)
        for fd in fds:
            os.close(fd)
        self.core.of_trial[pid] = core
        trial.update(pid=pid, pidfd=os.pidfd_open(pid), finished_r=finished_r)
        self.selector.register(trial["pidfd"], selectors.EVENT_READ, ("pidfd", conn))
        conn.send(json.dumps({"op": "started", "pid": pid}).encode())
        for signum in trial.pop("pending", []):
            self.signal(pid, signum)

    def on_exit(self, conn: socket.socket) -> None:
        trial = self.trials.pop(conn.fileno())
        _, status = os.waitpid(trial["pid"], 0)
        self.selector.unregister(trial["pidfd"])
        os.close(trial["pidfd"])
        finished = os.read(trial["finished_r"], 1) == b"F"
        os.close(trial["finished_r"])
        self.core.ended(trial["pid"], finished)
        if not trial.get("orphan"):
            report = {"op": "exit", "signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status) else \
                {"op": "exit", "code": os.waitstatus_to_exitcode(status)}
            try:
                conn.send(json.dumps(report).encode())
            except OSError:
                pass
            self.selector.unregister(conn)
        conn.close()

    def forget(self, conn: socket.socket) -> None:
        self.selector.unregister(conn)
        self.trials.pop(conn.fileno(), None)
        conn.close()

    @staticmethod
    def signal(pid: int, signum: int) -> None:
        try:
            os.killpg(pid, signum)
        except ProcessLookupError:  # not in its own group yet (setsid pending), or gone
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m agent.program.warm SOCKET", file=sys.stderr)
        return 2
    preload()
    if not children_can_use_cuda():
        print("agent.program.warm: a forked trial could not use CUDA here; trials run cold", file=sys.stderr)
        return 1
    core = WandbCore()
    core.for_next_trial()  # started now, off the first trial's clock
    try:
        Worker(argv[0], core).serve()
    finally:
        core.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
