"""W&B's scheduler sweeps offline: a sweep with `scheduler: {engine: optuna | ax | wandb, ...}` (optuna and ax with
`method: custom`) runs through W&B's own optimizer, made by W&B's `make_optimizer(SweepInfo)` from the YAML (the
user's `scheduler.source` runs here, in the controller, as `wandb sweep-scheduler` runs it: a relative path is
relative to the folder the command runs in), and asked and told as W&B's scheduler does online
(wandb/sdk/sweeps/scheduler/ipc.py): at start, every trial the store holds (tell_existing_finished_run,
tell_existing_active_run); then, each time the controller looks, every tracked trial whose rows or state
changed (tell_run, with its history rows and their `_step`, and its summary), its running ones offered for
pruning (prune_runs), and a suggestion asked for a free slot (ask_n_runs). One optimizer a sweep: the
controller that holds the store's scheduler lease (Store.lead) runs it.
"""

import contextlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.contract import CRASHED, FAILED, FINISHED, LIVE, PAUSED, PENDING, RUNNING, STOPPED
from agent.controller.store import Trial
from agent.errors import first_line

# What W&B's scheduler would see of a trial's run. A paused trial goes on when the controller comes back: alive.
RUN_STATES = {PENDING: "PENDING", RUNNING: "RUNNING", PAUSED: "PENDING", FINISHED: "FINISHED", STOPPED: "KILLED",
              FAILED: "FAILED", CRASHED: "CRASHED"}


def is_scheduled(sweep: dict) -> bool:
    """Whether W&B's scheduler, not its sweep engine, drives the sweep (`scheduler:` in the YAML)."""
    return "scheduler" in sweep


@dataclass
class Suggestion:
    params: dict  # {"lr": {"value": 0.01}, ...}, as W&B's agent receives them
    key: Any  # the optimizer's own id of it


ENGINE_PACKAGES = {"optuna": ("optuna", "optuna"), "ax": ("ax", "ax")}  # engine: (its module, our extra)


def scheduler_problems(sweep: dict) -> list[str]:
    """What stops W&B's optimizer of a scheduler sweep from being made, one line each: the engine's package not
    installed (with our extra that installs it), or what W&B's make_optimizer refuses (the source file missing,
    a function not in it or of the wrong signature, a study whose direction disagrees with the sweep's metric)."""
    engine, source = (sweep.get("scheduler") or {}).get("engine"), (sweep.get("scheduler") or {}).get("source")
    if source and not Path(source).is_file():
        return [f"scheduler.source: {source}: no such file here ({Path(source).absolute()}: as `wandb "
                "sweep-scheduler`, a relative path is relative to the folder the command runs in)"]
    if engine in ENGINE_PACKAGES and importlib.util.find_spec(ENGINE_PACKAGES[engine][0]) is None:
        module, extra = ENGINE_PACKAGES[engine]
        return [f"scheduler.engine: {engine} needs the {module} package, which is not installed here; fix: "
                f"pip install 'cifar-sweeps[{extra}]'"]
    try:
        with quiet_libraries(engine):
            optimizer_of("check", sweep)
    except Exception as e:  # the user's source runs here: whatever it raises is theirs to fix
        return [f"scheduler: {first_line(e)}"]
    return []


@contextlib.contextmanager
def quiet_libraries(engine: str):
    """Optuna's notices while the user's source makes a study ("A new study created in memory") are not the user's
    to read; its own switch, as its logger resets its level when first configured."""
    if engine != "optuna":
        yield
        return
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def optimizer_of(sweep_id: str, sweep: dict):
    """W&B's optimizer of the sweep: make_optimizer(SweepInfo), the user's source run. Raises wandb.Error (an
    unknown engine, a source or function that cannot be loaded, a study against the sweep's objective) or
    ImportError (the engine's package missing)."""
    from wandb.sdk.sweeps import SweepInfo
    from wandb.sdk.sweeps.scheduler.optimizer import make_optimizer

    return make_optimizer(SweepInfo(id=sweep_id, name=sweep.get("name") or sweep_id, entity="local",
                                    project=sweep.get("project") or "local", config=sweep,
                                    controller_run_name=f"{sweep_id}-scheduler"))


def pruner(optimizer) -> str:
    """Who prunes, as a trial's reason names it: Optuna's pruner by its class, else the engine's scheduler."""
    study = getattr(optimizer, "study", None)
    return f"Optuna's {type(study.pruner).__name__}" if study is not None else f"the {optimizer.engine} scheduler"


class Scheduler:
    """The sweep's optimizer, warm-started from the store's trials (`retrying`: crashed trials this controller will
    run again, adopted as active like the paused ones)."""

    def __init__(self, sweep_id: str, sweep: dict, trials: list[Trial], retrying: bool):
        from wandb.sdk.sweeps import RunState
        from wandb.sdk.sweeps.scheduler.optimizer import Run, RunConfig

        with quiet_libraries((sweep.get("scheduler") or {}).get("engine")):
            self.optimizer = optimizer_of(sweep_id, sweep)
        self.keys: dict[str, Any] = {}  # trial id -> the optimizer's id of it, while it is told
        self.told: dict[str, tuple] = {}  # trial id -> what it was last told (state, rows, summary)
        self.exhausted = False
        for t in trials:
            alive = t.state in (*LIVE, PAUSED) or (retrying and t.state == CRASHED)
            if alive:
                key = self.optimizer.tell_existing_active_run(
                    Run(config=RunConfig.from_values(t.config), state=RunState.PENDING, wandb_run_id=t.id))
                if key is not None:
                    self.keys[t.id] = key
            else:
                self.optimizer.tell_existing_finished_run(self._data(t))

    @staticmethod
    def _data(trial: Trial):
        from wandb.sdk.sweeps import RunState
        from wandb.sdk.sweeps.scheduler.optimizer import RunConfig, RunWithMetrics

        return RunWithMetrics(config=RunConfig.from_values(trial.config), state=RunState[RUN_STATES[trial.state]],
                              wandb_run_id=trial.id, summary_metrics=trial.summary, history_metrics=trial.rows)

    def suggest(self, trials: list[Trial]) -> Suggestion | None:
        """A trial to start, or None: the search has nothing more (`exhausted`), or declines for now. The trials
        are the optimizer's to know already (observe)."""
        if self.exhausted or self.optimizer.should_terminate_sweep():
            self.exhausted = True
            return None
        asked = self.optimizer.ask_n_runs(1)
        if asked is None:  # the strategy waits for results of trials in flight
            return None
        if not asked:
            self.exhausted = True
            return None
        return Suggestion(asked[0].config.wire_dict(), asked[0].run_id)

    def track(self, trial_id: str, key: Any) -> None:
        self.keys[trial_id] = key

    def observe(self, trials: list[Trial]) -> dict[str, str]:
        """Tells the optimizer what changed, and returns the running trials it prunes, with the reason."""
        told = {}
        for t in trials:
            if t.id not in self.keys or self.told.get(t.id) == (t.state, len(t.rows), t.summary):
                continue
            data = self._data(t)
            self.optimizer.tell_run(self.keys[t.id], data)
            self.told[t.id] = (t.state, len(t.rows), t.summary)
            if data.state.is_alive:
                told[t.id] = data
            else:  # finalized: W&B's scheduler tells a finished run once
                del self.keys[t.id]
        running = {t.id for t in trials if t.state == RUNNING and t.stop_requested is None}
        candidates = [trial_id for trial_id in told if trial_id in running]
        if not candidates:
            return {}
        pruned = set(self.optimizer.prune_runs([self.keys[c] for c in candidates], [told[c] for c in candidates]))
        return {c: f"pruned by {pruner(self.optimizer)}" for c in candidates if self.keys[c] in pruned}
