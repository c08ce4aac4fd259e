"""`python -m agent local SWEEP.yaml`: run a W&B sweep YAML with no server.

Suggestions and hyperband stops come from W&B's own engine (the `sweeps`
package); each trial is the YAML's `command`, expanded with W&B's own macro code
and started with the environment `wandb agent` gives (WANDB_SWEEP_ID,
WANDB_RUN_ID, WANDB_SWEEP_PARAM_PATH), offline, with its run under DIR/wandb.
Trials report through what they log: the controller reads each offline run's
transaction log while it is written. State is in DIR/sweep.db (agent/controller/store.py).
"""

import json
import logging
import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from wandb.sdk.lib import config_util
from wandb.sdk.lib.runid import generate_id

from agent import contract
from agent.contract import CRASHED, FAILED, FINISHED, PAUSED, PENDING, RUNNING, STOPPED
from agent.controller.engine import Classic, sweep_metric, sweep_metrics, trial_command
from agent.controller.opened import Opened, trial_limit
from agent.controller.outcome import environment_error, outcome, own_error
from agent.controller.processes import READY_TIMEOUT, WarmWorker, die_with_parent
from agent.controller.runlog import RunLogReader, find_run_file
from agent.controller.scheduler import Scheduler, is_scheduled
from agent.controller.store import Trial, is_number
from agent.errors import UsageError, first_line
from agent.install import this_python_first

POLL_SECONDS = 0.5
REAP_SECONDS = 5.0  # how often the controllers of other boxes are checked on: their trials crash with them


@dataclass
class Running:
    """A started trial: its process, the reader of its run log once it exists, when it was told to stop,
    whether it was told to pause."""
    proc: subprocess.Popen
    reader: RunLogReader | None = None
    summary_seen: dict | None = None  # the run's summary as last recorded
    signalled_at: float | None = None
    paused: bool = False

    def __post_init__(self):
        self.exited = os.pidfd_open(self.proc.pid)  # readable once the process has exited



class ViewLog(logging.Handler):
    """A search library's log records as the live view's event lines."""

    def __init__(self, view, engine: str):
        super().__init__(logging.INFO)
        self.view, self.engine = view, engine

    def emit(self, record: logging.LogRecord) -> None:
        self.view.event(f"{self.engine}: {record.getMessage()}")


@dataclass
class Options:
    """How a controller runs its sweep. `gpus`: a slot each (its CUDA_VISIBLE_DEVICES, or None for a CPU slot).
    `warm`: a warm worker per slot (agent/program/warm.py; our program only). `resumes`: the program continues a
    requeued trial from its saved state (ours): a pause sends it a preemption notice, and its metric history
    goes on. `resume_command`: what every message that promises a resume prints."""
    gpus: list[str | None]
    count: int | None = None
    retry_crashed: bool = False
    max_consecutive_failures: int = 5
    grace: float = 60.0
    warm: bool = False
    resumes: bool = False
    resume_command: str = "the same command"


class LocalSweep:
    """The controller's loop: slots filled with the engine's suggestions, trials polled for their metrics and
    their end, stops and pauses sent. `view`: the live view (views/status.SweepView: update(trials), event(line),
    a context manager). `on_trial_end(DIR)`: called as each trial ends (the report: --report); its last return
    value is printed last."""

    def __init__(self, opened: Opened, options: Options, view, on_trial_end: Callable[[Path], Path] | None = None):
        self.store, self.sweep_id, self.sweep = opened.store, opened.sweep_id, opened.sweep
        self.root = opened.root.resolve()
        self.options, self.view, self.on_trial_end = options, view, on_trial_end
        self.classic = None if is_scheduled(self.sweep) else Classic(self.sweep)
        self.scheduler: Scheduler | None = None  # a scheduler sweep's optimizer, on the controller that runs it
        self.restore_library_logs: Callable[[], None] = lambda: None
        self.metric = sweep_metric(self.sweep)[0]
        self.limit = trial_limit(self.sweep, options.count)
        self.gpus, self.grace = options.gpus, options.grace
        self.slot_trials: list[str | None] = [None] * len(self.gpus)  # per slot: its running trial
        self.workers: list[WarmWorker | None] = [None] * len(self.gpus)
        self.last_report: Path | None = None
        self.controller = generate_id(12)
        self.procs: dict[str, Running] = {}
        self.signals_received = self.signals_handled = 0  # SIGINT/SIGTERM: the handler counts, the loop acts
        self.interrupted_by: str | None = None  # the first of them, as a user says it
        self.to_retry: list[str] = []
        self.earlier_logs: dict[str, Path | None] = {}
        self.exhausted = self.stopping = self.interrupted = False
        self.consecutive_failures = 0
        self.failure_message = ""

    # the loop

    def run(self) -> int:
        self.store.register_controller(self.controller)
        self.reap()
        trials = self.store.trials()
        retried = (PAUSED, CRASHED) if self.options.retry_crashed else (PAUSED,)
        self.to_retry = [t.id for t in trials if t.state in retried]
        if paused := sum(t.state == PAUSED for t in trials):
            self.view.event(f"resuming {paused} paused trial(s) first")
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            with self.view:
                self.start_workers()
                reaped = time.monotonic()
                while True:
                    self.store.heartbeat(self.controller)
                    if time.monotonic() - reaped > REAP_SECONDS:
                        self.to_retry += [t for t in self.reap() if self.options.retry_crashed]
                        reaped = time.monotonic()
                    self.handle_signals()
                    self.poll_trials()
                    if not self.stopping:  # trials being paused are not stopped on the way
                        self.early_terminate()
                    if not self.stopping and (self.to_retry or not self.exhausted):
                        self.fill_slots()
                        self.queue_ahead()
                    if not self.procs and (self.stopping or (self.exhausted and not self.to_retry)):
                        break
                    self.view.update(self.store.trials())
                    # Wake as soon as a trial exits, so that the next one starts at once.
                    select.select([r.exited for r in self.procs.values()], [], [], POLL_SECONDS)
                trials = self.store.trials()
                self.view.update(trials)
            if paused := sum(t.state == PAUSED for t in trials):
                self.view.event(f"{paused} trial(s) paused; resume: {self.options.resume_command}")
            if self.on_trial_end is not None:  # the last line: where to look
                self.view.event(f"report: {self.last_report or self.on_trial_end(self.root)}")
        finally:
            for worker in filter(None, self.workers):
                worker.stop()
            self.restore_library_logs()
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.store.unregister_controller(self.controller)
        if self.interrupted:
            return contract.EXIT_INTERRUPTED
        if not self.failure_message and any(t.state == FAILED for t in trials) and \
                not any(t.state in (FINISHED, STOPPED) for t in trials):
            self.view.event(f"no trial finished; {sum(t.state == 'failed' for t in trials)} failed")
            return 1
        return 1 if self.failure_message else 0

    def _on_signal(self, signum, frame):
        self.signals_received += 1
        said = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        self.interrupted_by = self.interrupted_by or said

    def reap(self) -> list[str]:
        """The live trials of controllers that died, here or on another box, marked crashed."""
        reaped = self.store.reap_dead_controllers()
        for trial_id in reaped:
            retrying = "; retrying it" if self.options.retry_crashed else \
                f"; resume it: {self.options.resume_command} --retry-crashed"
            self.view.event(f"{trial_id} crashed: its controller died{retrying}")
        return reaped

    def handle_signals(self):
        """First SIGINT/SIGTERM: pause the running trials (ours save their state: a preemption notice; others
        get a stop), SIGKILL after --grace; a second: kill them (ours resume from their last full epoch)."""
        if self.signals_received == self.signals_handled:
            return
        first = self.signals_handled == 0
        self.signals_handled = self.signals_received
        self.stopping = self.interrupted = True
        if first:
            saving = "they save their state" if self.options.resumes else "they are stopped"
            self.view.event(f"interrupted: pausing running trials ({saving}); interrupt again to kill them; "
                            f"resume: {self.options.resume_command}")
        else:
            self.view.event("interrupted again: killing running trials" +
                            (" (they resume from their last full epoch)" if self.options.resumes else ""))
            self.grace = 0
        for running in self.procs.values():
            running.paused = True
            if running.signalled_at is None or not first:
                pause = contract.PREEMPT if self.options.resumes else contract.STOP
                self._signal(running.proc, pause if first else signal.SIGKILL)
                running.signalled_at = running.signalled_at or time.time()

    # trials

    def fill_slots(self):
        for slot, trial_id in enumerate(self.slot_trials):
            if trial_id is not None:
                continue
            trial = self.claim()
            if trial is None:
                return
            self.start(trial, slot)

    def claim(self) -> Trial | None:
        """The next trial to run, committed as pending before it starts; None when there is none (yet)."""
        with self.store.transaction():
            trials = self.store.trials()
            while self.to_retry:
                retry = self.store.trial(self.to_retry.pop(0))
                if retry.state in (PAUSED, CRASHED):
                    # A program that resumes goes on from its saved epoch: its metric history goes on too.
                    kept = {} if self.options.resumes else {"history": [], "metric": None, "rows": [], "summary": {}}
                    self.store.update(retry.id, state=PENDING, controller=self.controller, reason=None,
                                      stop_requested=None, exit_code=None, host=socket.gethostname(), **kept)
                    return self.store.trial(retry.id)
            queued = next((t for t in trials if t.state == PENDING and t.controller is None), None)
            if queued is not None:  # the scheduler's, made ahead for whichever controller has a free slot
                self.store.update(queued.id, controller=self.controller, host=socket.gethostname())
                return self.store.trial(queued.id)
            return self.suggest(trials, self.controller)

    def suggest(self, trials: list[Trial], controller: str | None) -> Trial | None:
        """A new trial of the engine's, for `controller` (None: queued for any), inside the store's transaction."""
        engine = self.engine()
        if self.limit is not None and len(trials) >= self.limit:
            self.exhausted = True
            return None
        if engine is None:  # another controller runs the scheduler: its suggestions are queued
            return None
        suggestion = engine.suggest(trials)
        self.exhausted = engine.exhausted
        if suggestion is None:
            return None
        trial_id = generate_id(8)
        self.store.add_trial(trial_id, suggestion if isinstance(engine, Classic) else suggestion.params, controller)
        if isinstance(engine, Scheduler):
            engine.track(trial_id, suggestion.key)
        return self.store.trial(trial_id)

    def engine(self) -> Classic | Scheduler | None:
        """W&B's sweep engine; or for a scheduler sweep its optimizer, if this controller runs it: the first to take
        the store's lease does, warm-started from the store; it goes to another when this one dies."""
        if self.classic is not None or self.scheduler is not None:
            return self.classic or self.scheduler
        if not self.store.lead():
            return None
        try:
            self.scheduler = Scheduler(self.sweep_id, self.sweep, self.store.trials(), self.options.retry_crashed)
        except Exception as e:  # the user's source file or the engine's package: this controller cannot go on
            raise UsageError(f"scheduler: {first_line(e)}") from None
        engine = self.scheduler.optimizer.engine
        self.view.event(f"scheduling the sweep: W&B's {engine} optimizer, on this controller")
        # What the search library says of its trials (Optuna: each finished or pruned), as W&B's scheduler shows it
        self.restore_library_logs = self.scheduler.optimizer.route_library_logs(ViewLog(self.view, engine))
        return self.scheduler

    def queue_ahead(self):
        """The scheduler's controller keeps a suggestion ready for each other controller of the sweep."""
        if self.scheduler is None or self.stopping:
            return
        with self.store.transaction():
            trials = self.store.trials()
            queued = sum(t.state == PENDING and t.controller is None for t in trials)
            if queued < self.store.alive_controllers() - 1:
                self.suggest(trials, None)

    def start(self, trial: Trial, slot: int):
        sweep_dir = self.root / "wandb" / f"sweep-{self.sweep_id}"
        sweep_dir.mkdir(parents=True, exist_ok=True)
        param_path = sweep_dir / f"config-{trial.id}.yaml"
        config_util.save_config_file_from_dict(str(param_path), trial.params)
        args_json_file = sweep_dir / f"args-{trial.id}.json"
        command = trial_command(self.sweep, trial.params, args_json_file)
        if "${args_json_file}" in (self.sweep.get("command") or []):
            args_json_file.write_text(json.dumps(trial.config))
        env = self.slot_env(slot)
        env.update(WANDB_SWEEP_ID=self.sweep_id, WANDB_RUN_ID=trial.id, WANDB_SWEEP_PARAM_PATH=str(param_path))
        if self.workers[slot] is not None:
            env[contract.WARM_SOCKET_ENV] = self.workers[slot].socket
        gpu = self.gpus[slot]
        try:
            with (self.root / "logs" / f"{trial.id}.log").open("ab") as log:
                proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True,
                                        # A trial outliving a kill -9'd controller would finish unseen. PREEMPT:
                                        # ours saves its full state, which --retry-crashed resumes from.
                                        preexec_fn=lambda: die_with_parent(contract.PREEMPT))
        except OSError as e:
            self.store.update(trial.id, state=FAILED, reason=f"cannot start {command[0]}: {e.strerror}",
                              ended=time.time())
            self._count_failure(trial.id, f"cannot start {command[0]}: {e.strerror}")
            return
        self.store.update(trial.id, state=RUNNING, pid=proc.pid, gpu=gpu, started=time.time())
        self.procs[trial.id] = Running(proc)
        self.slot_trials[slot] = trial.id
        # a retried trial reuses its run id: its earlier attempt's log is not this attempt's
        self.earlier_logs[trial.id] = find_run_file(self.root, trial.id)
        self.view.event(f"{trial.id} started: {' '.join(command)}")

    def slot_env(self, slot: int) -> dict:
        """The environment of the slot's trials (and of its warm worker)."""
        # wandb-core writes the run log every 15 s by default: too late for hyperband decisions.
        # W&B stages each logged model file in WANDB_DATA_DIR until a sync uploads it: keep a local
        # sweep's copies with the sweep.
        env = dict({"WANDB__TRANSACTION_LOG_FLUSH_INTERVAL": "0.5", "WANDB_DATA_DIR": str(self.root / "wandb-data")},
                   **os.environ)
        env.update(WANDB_MODE="offline", WANDB_DIR=str(self.root))
        env = this_python_first(env)
        if self.sweep.get("project"):
            env["WANDB_PROJECT"] = self.sweep["project"]
        if len(self.gpus) > 1 and "OMP_NUM_THREADS" not in env:
            # K CPU-bound trials each spawning a thread per core oversubscribe the machine
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // len(self.gpus)))
        if self.gpus[slot] is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus[slot]
        return env

    def start_workers(self):
        """A warm worker per slot, ready before the first trial (a trial that found none would start cold).
        One that cannot import what every trial imports is an error before the first trial."""
        (self.root / "logs").mkdir(exist_ok=True)
        if not self.options.warm:
            return
        self.view.event(f"starting {len(self.gpus)} warm worker(s): torch, Lightning and wandb are imported "
                        "once per slot, not once per trial")
        logs = [self.root / "logs" / f"warm-slot{i}.log" for i in range(len(self.gpus))]
        self.workers = [WarmWorker(f"slot{i}", self.slot_env(i), log) for i, log in enumerate(logs)]
        deadline = time.monotonic() + READY_TIMEOUT
        while any(w.ready() is None for w in self.workers) and time.monotonic() < deadline \
                and self.signals_received == 0:
            select.select([], [], [], 0.05)
        for i, worker in enumerate(self.workers):
            if not worker.ready():
                worker.stop()
                self.workers[i] = None
                why = own_error(logs[i].read_text(errors="replace")) if logs[i].exists() else "no output"
                if broken := environment_error(why, self.slot_env(i)):
                    raise UsageError(f"the sweep's program cannot start here: {broken} (from {logs[i]})")
                self.view.event(f"slot {i}: no warm worker ({why}; {logs[i]}); its trials start cold")

    def poll_trials(self):
        for trial_id, running in list(self.procs.items()):
            running.reader = running.reader or self._reader(trial_id)
            code = running.proc.poll()
            if running.reader is not None:
                self._record_metrics(trial_id, running)
            trial = self.store.trial(trial_id)
            if code is not None:
                self._finish(trial, code, running)
            elif trial.stop_requested and running.signalled_at is None:
                self._signal(running.proc, contract.STOP)
                running.signalled_at = time.time()
            elif running.signalled_at is not None and time.time() - running.signalled_at > self.grace:
                self._signal(running.proc, signal.SIGKILL)

    def _reader(self, trial_id: str) -> RunLogReader | None:
        path = find_run_file(self.root, trial_id)
        return None if path in (None, self.earlier_logs.get(trial_id)) else RunLogReader(path)

    def _record_metrics(self, trial_id: str, running: Running):
        """What the trial's run logged since the last look: the rows of the sweep's metrics with their _step (as
        W&B's scheduler reads them), the values of its first (the history hyperband and the views read), and the
        latest number of every key (the summary)."""
        logged, summary = running.reader.poll(), dict(running.reader.summary)
        if not logged and summary == running.summary_seen:
            return
        running.summary_seen = summary
        trial, names = self.store.trial(trial_id), [name for name, _ in sweep_metrics(self.sweep)]
        rows = [{"_step": row["_step"], **{n: row[n] for n in names if n in row}} for row in logged
                if any(n in row for n in names)]
        values = {"summary": {**trial.summary, **{k: v for row in [*logged, summary] for k, v in row.items()
                                                  if is_number(v) and not k.startswith("_")}}}
        if rows:
            history = trial.history + [row[self.metric] for row in rows if self.metric in row]
            values.update(rows=trial.rows + rows, history=history,
                          metric=float(history[-1]) if history and is_number(history[-1]) else None)
        self.store.update(trial_id, **values)

    def _finish(self, trial: Trial, code: int, running: Running):
        os.close(self.procs.pop(trial.id).exited)
        self.slot_trials[self.slot_trials.index(trial.id)] = None
        output = (self.root / "logs" / f"{trial.id}.log").read_text(errors="replace")
        summary = running.reader.summary if running.reader is not None else {}
        state, reason = outcome(code, trial.stop_requested is not None, running.paused, summary, self.metric,
                                trial.metric, trial.history, output)
        if state == PAUSED:
            reason = f"paused by {self.interrupted_by}; resume: {self.options.resume_command}"
        elif state == STOPPED:
            reason = trial.reason  # what stopped it: hyperband, a scheduler's pruner
        self.store.update(trial.id, state=state, reason=reason, exit_code=code, ended=time.time())
        self.view.event(f"{trial.id} {state}" + (f": {reason}" if reason else ""))
        if self.on_trial_end is not None:
            self.last_report = self.on_trial_end(self.root)
        if state == FAILED:
            self._count_failure(trial.id, reason)
        else:
            self.consecutive_failures = 0

    def _count_failure(self, trial_id: str, reason: str):
        self.consecutive_failures += 1
        if self.stopping:
            return
        if broken := environment_error(reason, self.slot_env(0)):  # the next trials would fail the same way
            self.stopping = True
            self.failure_message = f"stopping: the sweep's program cannot run here: {trial_id}: {broken}"
        elif self.consecutive_failures >= self.options.max_consecutive_failures:
            self.stopping = True
            self.failure_message = (f"stopping: {self.consecutive_failures} trials failed in a row "
                                    f"(--max-consecutive-failures); last: {trial_id}: {reason}")
        if self.failure_message:
            self.view.event(self.failure_message)

    @staticmethod
    def _signal(proc: subprocess.Popen, signum: int):
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    def early_terminate(self):
        """What the engine stops: hyperband, decided by any controller; a scheduler's pruner, by the one running it.
        Either decides on every box's trials; a trial's own controller sends the stop."""
        engine = self.classic or self.scheduler
        if engine is None:
            return
        for trial_id, reason in engine.observe(self.store.trials()).items():
            self.store.update(trial_id, stop_requested=time.time(), reason=reason)
            self.view.event(f"{trial_id} stopping: {reason}")
