"""`python -m agent best TARGET`: a sweep's best trial and its best model's file.

TARGET is a local sweep DIR (made by `python -m agent local`, holds DIR/sweep.db) or a W&B sweep
ENTITY/PROJECT/SWEEP_ID. The best trial by the sweep's metric and goal (locally: finished or stopped trials with
a metric), and its best model: locally the file its run logged as the `model-<id>` artifact; on W&B the
`model-<id>:best` artifact, downloaded. What our program makes of it (its config as a command, --evaluate,
--export) is agent/program/use.py's.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from agent import contract
from agent.contract import FINISHED, STOPPED
from agent.controller.engine import sweep_metric
from agent.controller.runlog import RunLogReader, find_run_files, history_row
from agent.controller.store import is_local_target, is_number, open_store
from agent.errors import UsageError
from agent.online.api import find_sweep, wandb_api, wandb_errors
from agent.views.trials import best_trial


@dataclass
class Best:
    id: str
    state: str
    where: str  # "trial X of sweep S" or "run X of sweep E/P/S"
    metric_name: str | None
    metric: float | None
    goal: str
    checkpoint: Path  # the best model: our program's network and the config that rebuilds it
    logged_test_acc: float | None
    data_roots: tuple[Path, ...]  # where a relative data_dir may lie

    def __str__(self) -> str:
        metric = "no metric" if self.metric is None else f"{self.metric_name}={self.metric:.6g} ({self.goal})"
        return f"best: {self.where}, {self.state}, {metric}"


class RunLog:
    """What an offline run's log holds for us: its last logged values and its last model artifact."""

    def __init__(self, path: Path):
        self.summary, self.model = {}, None
        for record in RunLogReader(path).records():
            kind = record.WhichOneof("record_type")
            if kind == "history":
                self.summary.update(history_row(record.history))
            elif kind == "artifact" and record.artifact.type == "model":
                self.model = record.artifact


def logged_model(log: Path) -> tuple[Path, RunLog] | None:
    """The file of the last model an offline run's log (`log`) logged, if it is still in the run's folder."""
    try:
        run = RunLog(log)
    except (OSError, ValueError):  # unreadable or corrupt: as if the attempt had left no log
        return None
    where = json.loads(run.model.metadata or "{}").get(contract.MODEL_IN_RUN) if run.model else None
    return (log.parent / where, run) if where and (log.parent / where).is_file() else None


def local_best(directory: str) -> Best:
    store = open_store(directory)
    root = Path(directory)
    sweep_id, sweep = store.sweep()
    name, goal = sweep_metric(sweep)
    trial = best_trial([t for t in store.trials() if t.state in (FINISHED, STOPPED)], goal)
    if trial is None:
        raise UsageError(f"{directory}: no finished or stopped trial has a value of {name or 'the metric'} yet")
    # A retried trial has several attempts; the newest that logged a model holds the best of all of them (a
    # resumed attempt carries its predecessors' best).
    found = next(filter(None, map(logged_model, reversed(find_run_files(root, trial.id)))), None)
    if found is None:
        raise UsageError(f"trial {trial.id}: no best model ({root}/wandb/offline-run-*-{trial.id} logged no "
                         f"{contract.MODEL_ARTIFACT.format(run_id=trial.id)} artifact whose file is still there)")
    checkpoint, run = found
    return Best(trial.id, trial.state, f"trial {trial.id} of sweep {sweep_id}", name, trial.metric, goal, checkpoint,
                run.summary.get(contract.TEST_ACC), (Path.cwd(), root.parent, root.parent.parent))


def wandb_best(target: str) -> Best:
    entity, project, _ = target.split("/")
    with wandb_api(target, entity=entity) as api:
        sweep = find_sweep(api, target)
        run = sweep.best_run()
        if run is None:
            raise UsageError(f"{target}: the sweep has no runs yet")
        metric, goal = sweep_metric(sweep.config or {})
        name = f"{entity}/{project}/{contract.MODEL_ARTIFACT.format(run_id=run.id)}:{contract.BEST_ALIAS}"
        with wandb_errors(name):
            folder = api.artifact(name).download()
        # best_run() is lazy: its summary is fetched on first use, before wandb_api's teardown
        run_id, state, summary = run.id, run.state, dict(run.summary or {})
    checkpoint = Path(folder) / contract.MODEL_FILE
    if not checkpoint.is_file():
        raise UsageError(f"{name}: no {contract.MODEL_FILE} in {folder}")
    value = summary.get(metric) if metric else None
    return Best(run_id, state, f"run {run_id} of sweep {target}", metric, value if is_number(value) else None, goal,
                checkpoint, summary.get(contract.TEST_ACC), (Path.cwd(),))


def find_best(target: str) -> Best:
    return local_best(target) if is_local_target(target) else wandb_best(target)
