"""`python -m agent create` and `python -m agent launch`: a W&B sweep across GPU boxes.

create: a sweep the CLI has validated (no network on failure): check W&B (mode, credentials), then
`wandb.sweep`; prints the launch command. launch: check W&B and the sweep once, before any agent starts (a missing
key, an unreachable server or a missing sweep is one line, not agents failing and restarting); then,
on one box, one program-based `wandb agent` per GPU slot (a fresh process per run: no GPU memory
carried between runs), pinned with CUDA_VISIBLE_DEVICES, started staggered, restarted with backoff if
it dies, and stopped with the signals the box gets (forwarded to the runs, which checkpoint).
"""

import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent.contract import WARM_SOCKET_ENV
from agent.controller.processes import READY_TIMEOUT, WarmWorker
from agent.errors import SWEEP_PATH, UsageError
from agent.install import this_python_first
from agent.online.api import find_sweep, wandb_api

RUN_STARTED = re.compile(r"Agent Starting Run: (\w+)")
BACKOFF_BASE, BACKOFF_MAX = 2.0, 60.0  # seconds before restarting a dead agent: base ** crashes, capped
POLL_SECONDS = 0.2
# Seconds between W&B's stop (SIGTERM) and its SIGKILL of a run; W&B's default is 30. A stopped run
# of ours tests and logs its best model first: a large test set on a slow box may need the margin.
KILL_DELAY = "60"
# A sweep in one of these states hands out no more runs: its agents would only exit (or fail).
OVER = ("FINISHED", "CANCELED")
ONLINE = "unset WANDB_MODE or run `wandb online`; or run the sweep with no server: python -m agent local SWEEP.yaml"


def create(path: str, sweep: dict, project: str, entity: str | None) -> int:
    """`sweep`, read from `path` and checked by the CLI, created in `project` on W&B."""
    import wandb

    with wandb_api(f"{path}: W&B did not create the sweep", f"a sweep is created on the W&B server; {ONLINE}") as api:
        sweep_id = wandb.sweep(sweep, project=project, entity=entity)
        entity = entity or api.settings["entity"] or api.default_entity  # where wandb.sweep put it
    sweep_path = f"{entity}/{project}/{sweep_id}"
    print(f"created sweep {sweep_path}")
    if "scheduler" not in sweep:
        print(f"on each GPU box: python -m agent launch {sweep_path} --gpus all")
        return 0
    # W&B's optimizer runs beside the agents, one a sweep (`wandb sweep-scheduler`), where its source file is.
    where = f" (with {sweep['scheduler']['source']}, in this folder)" if sweep["scheduler"].get("source") else ""
    print(f"on one GPU box{where}: python -m agent launch {sweep_path} --gpus all --scheduler")
    print(f"on each other GPU box: python -m agent launch {sweep_path} --gpus all")
    return 0


def visible_gpus() -> list[str]:
    """The GPUs this process may use, named as CUDA_VISIBLE_DEVICES names them (a SLURM job's 2,3)."""
    import torch

    count = torch.cuda.device_count()
    inherited = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    return inherited[:count] if inherited else [str(i) for i in range(count)]


def parse_gpus(spec: str, command: str = "launch", per_trial: int = 1) -> list[str | None]:
    """The slots: `all` -> every GPU torch sees ([None]: one CPU slot when there is none); `0,1,3` -> those;
    with `per_trial` N, groups of N in order (`0,1` and `2,3`), each a slot's CUDA_VISIBLE_DEVICES."""
    if spec == "all":
        gpus = visible_gpus()
        if not gpus:
            slot = "agent" if command == "launch" else "trial at a time"
            print(f"{command}: no GPU visible to torch; running one CPU {slot}", file=sys.stderr)
    else:
        gpus = [g.strip() for g in spec.split(",") if g.strip()]
        if not gpus or not all(g.isdigit() for g in gpus):
            raise UsageError(f"--gpus={spec!r}: expected all or a comma-separated list of GPU indices like 0,1,3")
    if not gpus:
        return [None]
    if len(gpus) % per_trial:
        raise UsageError(f"--gpus-per-trial={per_trial}: {len(gpus)} GPUs ({','.join(gpus)}) do not split into "
                         f"groups of {per_trial}")
    return [",".join(gpus[i:i + per_trial]) for i in range(0, len(gpus), per_trial)]


@dataclass
class AgentSlot:
    gpu: str | None
    index: int
    proc: subprocess.Popen | None = None
    runs: list[str] = field(default_factory=list)
    crashes: int = 0
    restart_at: float = 0.0
    done: bool = False
    worker: WarmWorker | None = None

    @property
    def name(self) -> str:
        return f"gpu{self.gpu.replace(',', '+')}.{self.index}" if self.gpu is not None else f"cpu.{self.index}"


def scheduler_command(sweep_path: str) -> list[str]:
    return [sys.executable, "-m", "wandb", "sweep-scheduler", sweep_path]


def agent_command(sweep_path: str, count: int | None) -> list[str]:
    command = [sys.executable, "-m", "wandb", "agent", "--forward-signals"]
    return command + (["--count", str(count)] if count else []) + [sweep_path]


class Launcher:
    def __init__(self, sweep_path: str, gpus: str, agents_per_gpu: int, count: int | None,
                 stagger: float, max_restarts: int, warm_for: Callable[[dict], bool] | None = None,
                 gpus_per_trial: int = 1, scheduler: bool = False):
        if not SWEEP_PATH.fullmatch(sweep_path):
            raise UsageError(f"{sweep_path!r}: expected ENTITY/PROJECT/SWEEP_ID")
        if agents_per_gpu < 1:
            raise UsageError("--agents-per-gpu must be at least 1")
        self.sweep_path = sweep_path
        self.command = agent_command(sweep_path, count)
        self.slots = [AgentSlot(gpu, i) for gpu in parse_gpus(gpus, "launch", gpus_per_trial)
                      for i in range(agents_per_gpu)]
        self.stagger, self.max_restarts = stagger, max_restarts
        self.stopped_by: int | None = None  # the signal that stopped the launcher
        self.forwarded = False  # whether the agents have been told
        self.relays: list[threading.Thread] = []
        self.lock = threading.Lock()
        # A warm worker per agent (agent/program/warm.py) for a sweep config it is true of: the CLI's test of
        # whether the sweep runs our program (the W&B side knows no program).
        self.warm_for = warm_for
        self.scheduler = scheduler  # whether this box runs the sweep's `wandb sweep-scheduler` (W&B allows one)
        self.scheduler_proc: subprocess.Popen | None = None

    def env(self, slot: AgentSlot) -> dict:
        env = this_python_first(dict({"WANDB_AGENT_KILL_DELAY": KILL_DELAY}, **os.environ))
        if slot.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot.gpu
        if slot.worker is not None:  # the agent passes its environment on to each run it starts
            env[WARM_SOCKET_ENV] = slot.worker.socket
        return env

    def dry_run(self) -> int:
        if self.scheduler:
            print(shlex.join(scheduler_command(self.sweep_path)))
        for slot in self.slots:
            prefix = f"CUDA_VISIBLE_DEVICES={slot.gpu} " if slot.gpu is not None else ""
            print(prefix + shlex.join(self.command))
        return 0

    def start(self, slot: AgentSlot):
        # Own session: a terminal's Ctrl-C reaches the agents once, through forward(), not twice
        # (wandb agent takes a second signal as "kill the runs now").
        slot.proc = subprocess.Popen(self.command, env=self.env(slot), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
                                     start_new_session=True)
        relay = threading.Thread(target=self._relay, args=(slot, slot.proc), daemon=True)
        relay.start()
        self.relays.append(relay)

    def _relay(self, slot: AgentSlot, proc: subprocess.Popen):
        for line in proc.stdout:
            match = RUN_STARTED.search(line)
            if match:
                slot.runs.append(match.group(1))
            with self.lock:
                sys.stdout.write(f"[{slot.name}] {line}")
                sys.stdout.flush()

    def sweep_on_wandb(self) -> tuple[str, dict]:
        """The sweep's state on W&B (RUNNING, PAUSED, FINISHED, ...) and config, looked up once, before any
        agent starts: an agent would find a missing key or sweep only after it started, and be restarted for it."""
        needs_online = f"the agents ask the W&B server for runs, and the runs must report to it; {ONLINE}"
        with wandb_api(self.sweep_path, needs_online, entity=self.sweep_path.split("/")[0]) as api:
            sweep = find_sweep(api, self.sweep_path)
            return str(sweep.state).upper(), dict(sweep.config or {})

    def start_workers(self):
        """A warm worker per agent, ready before the agent starts (its runs would otherwise start cold)."""
        logs = Path(tempfile.mkdtemp(prefix="agent-launch-"))
        for slot in self.slots:
            slot.worker = WarmWorker(slot.name, self.env(slot), logs / f"warm-{slot.name}.log")
        deadline = time.monotonic() + READY_TIMEOUT
        while any(s.worker.ready() is None for s in self.slots) and time.monotonic() < deadline and not self.stopped_by:
            self.pause(POLL_SECONDS)
        for slot in self.slots:
            if not slot.worker.ready():
                print(f"launch: {slot.name}: no warm worker (see {logs}/warm-{slot.name}.log); its runs start cold",
                      file=sys.stderr)
                slot.worker.stop()
                slot.worker = None

    def run(self) -> int:
        state, config = self.sweep_on_wandb()
        if state in OVER:  # not an error: a box that joins late finds the work done
            print(f"launch: sweep {self.sweep_path} is {state.lower()} on W&B; no agent started", file=sys.stderr)
            return 0
        self.start_scheduler(config)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            if self.warm_for is not None and self.warm_for(config):
                self.start_workers()
            for i, slot in enumerate(self.slots):
                if i:  # staggered: agents asking at once would be handed the same first config
                    self.pause(self.stagger)
                if self.stopped_by:
                    break
                self.start(slot)
            while not all(s.done or s.proc is None for s in self.slots):
                self.supervise()
                self.pause(POLL_SECONDS)
        finally:
            for worker in (s.worker for s in self.slots if s.worker is not None):
                worker.stop()
            self.stop_scheduler()
            for s, handler in previous.items():
                signal.signal(s, handler)
        return self.summary()

    def start_scheduler(self, config: dict) -> None:
        """`wandb sweep-scheduler` beside the agents, when this box is the one that runs it (--scheduler): W&B's own
        optimizer of a scheduler sweep, its `source` file run in this folder. Checked first, as `validate` does: a
        source that is not here, or does not load, is one line before anything starts."""
        if "scheduler" not in config:
            if self.scheduler:
                raise UsageError(f"--scheduler: sweep {self.sweep_path} has no scheduler: block; W&B's server runs "
                                 "its search")
            return
        if not self.scheduler:
            print(f"launch: sweep {self.sweep_path} needs W&B's scheduler on one box: there, python -m agent launch "
                  f"{self.sweep_path} --scheduler ...", file=sys.stderr)
            return
        from agent.controller.scheduler import scheduler_problems

        if problems := scheduler_problems(config):
            raise UsageError(f"{self.sweep_path}: " + "; ".join(problems))
        self.scheduler_proc = subprocess.Popen(scheduler_command(self.sweep_path), env=this_python_first(dict(
            os.environ)), start_new_session=True)

    def stop_scheduler(self) -> None:
        """With the agents: SIGINT is its own graceful stop (it finishes its step; the sweep stays resumable)."""
        if self.scheduler_proc is not None and self.scheduler_proc.poll() is None:
            self.scheduler_proc.send_signal(signal.SIGINT)
            try:
                self.scheduler_proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.scheduler_proc.kill()
                self.scheduler_proc.wait()

    def _on_signal(self, signum, frame):
        self.stopped_by = self.stopped_by or signum  # the loop acts on it (pause returns at once)

    def pause(self, seconds: float):
        """Sleeps, but passes a signal on to the agents within POLL_SECONDS."""
        end = time.monotonic() + seconds
        while True:
            if self.stopped_by and not self.forwarded:
                self.forward(self.stopped_by)
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, POLL_SECONDS))

    def forward(self, signum: int):
        """SIGTERM means the box is going away: first a preemption notice (SIGUSR1, which `wandb agent
        --forward-signals` passes to its run and survives), so each run saves its state and is requeued;
        then SIGTERM, so each agent waits for its run and takes no new one. SIGINT is passed on as is."""
        self.forwarded = True
        notices = [signal.SIGUSR1, signal.SIGTERM] if signum == signal.SIGTERM else [signum]
        for slot in self.slots:
            for notice in notices:
                if slot.proc is not None and slot.proc.poll() is None:
                    slot.proc.send_signal(notice)

    def supervise(self):
        for slot in self.slots:
            if slot.done or slot.proc is None:
                continue
            code = slot.proc.poll()
            if code is None:
                continue
            if code == 0 or self.stopped_by:  # sweep finished, stopped, cancelled, count reached; or us
                slot.done = True
            elif time.time() < slot.restart_at:
                continue
            elif slot.restart_at == 0.0:  # just died: schedule a restart with backoff
                slot.crashes += 1
                if slot.crashes > self.max_restarts:
                    print(f"launch: {slot.name} agent exited {code} {slot.crashes} times; giving up on it",
                          file=sys.stderr)
                    slot.done = True
                else:
                    delay = min(BACKOFF_MAX, BACKOFF_BASE ** slot.crashes)
                    print(f"launch: {slot.name} agent exited {code}; restarting in {delay:.0f}s", file=sys.stderr)
                    slot.restart_at = time.time() + delay
            else:
                slot.restart_at = 0.0
                self.start(slot)

    def summary(self) -> int:
        for relay in self.relays:  # the last lines, and the run counts they carry
            relay.join(timeout=5)
        print("launch: summary")
        for slot in self.slots:
            state = "gave up" if slot.crashes > self.max_restarts else "done"
            print(f"  {slot.name}: {len(slot.runs)} runs, {slot.crashes} agent failures, {state}")
        if self.stopped_by:  # a scheduler must see a stopped job, not a completed one
            return 128 + self.stopped_by
        return 1 if any(s.crashes > self.max_restarts for s in self.slots) else 0
