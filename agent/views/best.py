"""`python -m agent best TARGET`: a sweep's best trial, or the one asked for, and its best model's file.

TARGET is a local sweep DIR (made by `python -m agent local`, holds DIR/sweep.db) or a W&B sweep
ENTITY/PROJECT/SWEEP_ID. The best trial by the sweep's metric and goal (locally: finished or stopped trials with
a metric); with several objectives, the Pareto front (views/pareto.py) listed, best first by the first objective,
and its first. `--where "latency_ms < 2"` (repeatable) takes the best that meets every constraint; `--trial ID`
takes that trial, on the front or not. Its best model: locally the file its run logged as the `model-<id>`
artifact; on W&B the `model-<id>:best` artifact, downloaded. What our program makes of it (its config as a
command, --evaluate, --export) is agent/program/use.py's.
"""

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from agent import contract
from agent.contract import FINISHED, STOPPED
from agent.controller.engine import sweep_metric, sweep_metrics
from agent.controller.runlog import RunLogReader, find_run_files, history_row
from agent.controller.store import Trial, is_local_target, is_number, open_store
from agent.errors import UsageError
from agent.online.api import find_sweep, wandb_api, wandb_errors
from agent.views.pareto import Front, heading, left_out, objective_values, pareto_front, parse_where, pick, several
from agent.views.trials import number, ranked, run_trial, short, swept


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
    objectives: dict[str, float | None] = field(default_factory=dict)  # several objectives: the pick's values
    goals: dict[str, str] = field(default_factory=dict)  # several objectives: each one's goal
    label: str = "best"  # "picked" for the trial --trial names
    why: str = ""  # how it was chosen, when not only as the best by the metric
    listing: list[str] = field(default_factory=list)  # several objectives: the front, a line per trial

    def __str__(self) -> str:
        if self.objectives:
            said = ", ".join(f"{name}={number(value) or 'none'} ({self.goals[name]})"
                             for name, value in self.objectives.items())
        else:
            said = "no metric" if self.metric is None else f"{self.metric_name}={self.metric:.6g} ({self.goal})"
        return f"{self.label}: {self.where}, {self.state}, {said}" + (f"; {self.why}" if self.why else "")


@dataclass
class Choice:
    trial: Trial
    label: str
    why: str
    listing: list[str]


def front_listing(front: Front, params: list[str]) -> list[str]:
    """The front, best first by the first objective: a line per trial, its id, objectives and swept values, in
    aligned columns; then the trials left out of it and why."""
    objectives = front.objectives
    cells = [[t.id, *(f"{n}={number(v)}" for n, v in objective_values(t, objectives).items()),
              *(f"{p}={short(t.config.get(p))}" for p in params)] for t in front.trials]
    widths = [max(map(len, column)) for column in zip(*cells)]
    lines = [heading(front) + (f", best {objectives[0][0]} first" if len(front.trials) > 1 else "")]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return lines + list(filter(None, [left_out(front)]))


def choose(trials: list[Trial], sweep: dict, trial_id: str | None, where: list[str], sweep_name: str) -> Choice:
    """The trial `best` takes: --trial's, else the best of the front (several objectives) or of the finished and
    stopped trials with a metric, meeting every --where constraint."""
    objectives = sweep_metrics(sweep)
    constraints = [parse_where(text, objectives) for text in where]  # a bad one is refused before anything else
    name, goal = sweep_metric(sweep)
    front = pareto_front(trials, objectives) if several(objectives) else None
    if front is not None:
        listing, pool = front_listing(front, swept(sweep)), front.trials
        who, whose, among = "trial on the front", "the front's", f"the front's best {name}"
    else:
        listing = []
        pool = ranked([t for t in trials if t.state in (FINISHED, STOPPED) and is_number(t.metric)], goal)
        who, whose, among = f"finished or stopped trial with a {name or 'metric'}", "their", f"the best {name}"
    if trial_id is not None:
        trial = next((t for t in trials if t.id == trial_id), None)
        if trial is None:
            raise UsageError(f"--trial {trial_id}: no such trial in {sweep_name} (its trials: "
                             f"{', '.join(t.id for t in trials) or 'none yet'})")
        return Choice(trial, "picked", "", listing)
    if not pool:
        if front is not None:
            raise UsageError(f"{sweep_name}: no trial is on the Pareto front yet (it takes finished trials with every "
                             f"objective: {', '.join(n for n, _ in objectives)}); {left_out(front) or 'no trials yet'}")
        raise UsageError(f"{sweep_name}: no finished or stopped trial has a value of {name or 'the metric'} yet")
    if constraints:
        return Choice(pick(pool, constraints, objectives, who, whose), "best",
                      f"{among} with {' and '.join(map(str, constraints))}", listing)
    return Choice(pool[0], "best", among if front is not None else "", listing)


def best_of(choice: Choice, sweep: dict, where: str, checkpoint: Path, data_roots: tuple[Path, ...]) -> Best:
    trial, objectives = choice.trial, sweep_metrics(sweep)
    name, goal = sweep_metric(sweep)
    values = objective_values(trial, objectives) if several(objectives) else {}
    test_acc = trial.summary.get(contract.TEST_ACC)
    return Best(trial.id, trial.state, where, name, trial.metric, goal, checkpoint,
                test_acc if is_number(test_acc) else None, data_roots, values, dict(objectives), choice.label,
                choice.why, choice.listing)


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


def local_best(directory: str, trial_id: str | None = None, where: list[str] = ()) -> Best:
    store = open_store(directory)
    root = Path(directory)
    sweep_id, sweep = store.sweep()
    choice = choose(store.trials(), sweep, trial_id, list(where), f"sweep {sweep_id}")
    trial = choice.trial
    # A retried trial has several attempts; the newest that logged a model holds the best of all of them (a
    # resumed attempt carries its predecessors' best).
    found = next(filter(None, map(logged_model, reversed(find_run_files(root, trial.id)))), None)
    if found is None:
        raise UsageError(f"trial {trial.id}: no best model ({root}/wandb/offline-run-*-{trial.id} logged no "
                         f"{contract.MODEL_ARTIFACT.format(run_id=trial.id)} artifact whose file is still there)")
    checkpoint, run = found
    best = best_of(choice, sweep, f"trial {trial.id} of sweep {sweep_id}", checkpoint,
                   (Path.cwd(), root.parent, root.parent.parent))
    best.logged_test_acc = run.summary.get(contract.TEST_ACC)
    return best


def wandb_best(target: str, trial_id: str | None = None, where: list[str] = ()) -> Best:
    entity, project, sweep_id = target.split("/")
    with wandb_api(target, entity=entity) as api:
        sweep = find_sweep(api, target)
        config = sweep.config or {}
        metric, goal = sweep_metric(config)
        if several(sweep_metrics(config)) or trial_id is not None or where:
            # The runs with their summaries in one request, as `report` lists them (sweep.runs: one request a run).
            runs = api.runs(f"{entity}/{project}", filters={"$and": [{"sweep": sweep_id}]}, lazy=False)
            choice = choose([run_trial(run, metric) for run in runs], config, trial_id, list(where), target)
        else:
            run = sweep.best_run()
            if run is None:
                raise UsageError(f"{target}: the sweep has no runs yet")
            # its summary fetched here, inside wandb_api; its state as W&B names it, as `best` has always said it
            choice = Choice(replace(run_trial(run, metric), state=run.state), "best", "", [])
        name = f"{entity}/{project}/{contract.MODEL_ARTIFACT.format(run_id=choice.trial.id)}:{contract.BEST_ALIAS}"
        with wandb_errors(name):
            folder = api.artifact(name).download()
    checkpoint = Path(folder) / contract.MODEL_FILE
    if not checkpoint.is_file():
        raise UsageError(f"{name}: no {contract.MODEL_FILE} in {folder}")
    return best_of(choice, config, f"run {choice.trial.id} of sweep {target}", checkpoint, (Path.cwd(),))


def find_best(target: str, trial_id: str | None = None, where: list[str] = ()) -> Best:
    if is_local_target(target):
        return local_best(target, trial_id, where)
    return wandb_best(target, trial_id, where)
