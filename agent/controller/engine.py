"""What W&B does with a sweep YAML, as its own code does it: the schema and the engine (the `sweeps`
package: suggestions, hyperband stops), and the command `wandb agent` starts for a trial.

Nothing here knows our program: the offline controller runs any W&B program through it, and
`agent validate` adds our config's checks on top (validate.py).
"""

import json
import warnings
from pathlib import Path

from agent.contract import LIVE, PAUSED, RUNNING, STOPPED

with warnings.catch_warnings():  # sweeps 0.3 imports with a pydantic-v1 config warning
    warnings.simplefilter("ignore")
    import sweeps
    from sweeps.config.cfg import validator

DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]  # W&B's agent's, without `command:`
# W&B marks a run that exits cleanly after a stop finished; a paused trial is requeued, as a preempted run.
ENGINE_STATES = {STOPPED: "finished", PAUSED: "preempted"}


def schema_problems(sweep: dict) -> list[str]:
    """W&B's schema check, each problem naming its key path (`run_cap: 0 is less than ...`)."""
    problems = sweeps.schema_violations_from_proposed_config(sweep)
    # Its first messages are jsonschema's, in this order, without where they are.
    located = [f"{'.'.join(map(str, e.absolute_path)) or 'sweep'}: {e.message}" for e in validator.iter_errors(sweep)]
    return located + problems[len(located):]


def engine_config(sweep: dict) -> dict:
    """The YAML with W&B's schema defaults filled in, keeping the parameters as written
    (the engine's validation drops nested ones)."""
    filled = dict(sweeps.SweepConfig(sweep))
    filled["parameters"] = sweep["parameters"]
    return filled


def engine_problems(sweep: dict) -> list[str]:
    """What the engine refuses only when asked for a run or a stop (a grid over a continuous parameter,
    say): asked once, with no runs, so that it refuses before any trial or network call. A scheduler sweep's
    engine is W&B's optimizer: made once, the user's source run (scheduler.scheduler_problems)."""
    if "scheduler" in sweep:
        from agent.controller.scheduler import scheduler_problems

        return scheduler_problems(sweep)
    try:
        config = engine_config(sweep)
        sweeps.next_run(config, [])
        if sweep.get("early_terminate"):
            sweeps.stop_runs(config, [])
    except Exception as e:  # whatever the engine raises is the user's YAML to fix
        return [f"W&B's sweep engine refuses it: {(str(e).strip().splitlines() or [type(e).__name__])[0]}"]
    return []


def sweep_metrics(sweep: dict) -> list[tuple[str, str]]:
    """The sweep's objectives, (name, goal) each, W&B's default goal included: `metrics:` (several, a scheduler
    sweep's), else `metric:`; [] when it has none."""
    metrics = sweep.get("metrics") or ([sweep["metric"]] if sweep.get("metric") else [])
    return [(m.get("name"), m.get("goal", "minimize")) for m in metrics if isinstance(m, dict)]


def sweep_metric(sweep: dict) -> tuple[str | None, str]:
    """The sweep's (first) metric name, None when it has none, and its goal."""
    return (sweep_metrics(sweep) or [(None, "minimize")])[0]


def plain(value):
    """numpy scalars from the engine -> Python values that json and yaml can dump."""
    return json.loads(json.dumps(value, default=lambda v: v.item()))


def trial_command(sweep: dict, params: dict, args_json_file: Path) -> list[str]:
    """The command `wandb agent` would run for these params, macros expanded as it does."""
    # Imported here: validation (`agent create` checks a YAML before anything of wandb loads) needs no wandb.
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    variables = create_sweep_command_args({"args": params})
    variables.update(env=["/usr/bin/env"], interpreter=["python"], program=[str(sweep.get("program"))],
                     args_json_file=[str(args_json_file)])
    command = []
    for chunk in create_sweep_command([str(c) for c in sweep.get("command") or DEFAULT_COMMAND]):
        if chunk.startswith("${") and chunk.endswith("}"):
            command += variables.get(chunk[2:-1]) or []
        else:
            command.append(chunk)
    return command


def as_sweep_run(trial, metric: str | None) -> "sweeps.SweepRun":
    """A trial (agent.controller.store.Trial) as the engine reads a run."""
    history = [{metric: v} for v in trial.history] if metric else []
    summary = {metric: trial.metric} if metric and trial.metric is not None else {}
    return sweeps.SweepRun(name=trial.id, state=ENGINE_STATES.get(trial.state, trial.state),
                           config=trial.params, history=history, summary_metrics=summary,
                           stopped=trial.stop_requested is not None)


class Classic:
    """W&B's sweep engine for a sweep with no `scheduler:`: what W&B's server does for grid, random and bayes,
    the `sweeps` package asked for a next run, and its hyperband (`early_terminate`) for the runs to stop."""

    def __init__(self, sweep: dict):
        self.config, self.metric = engine_config(sweep), sweep_metric(sweep)[0]
        self.early_terminate = bool(sweep.get("early_terminate")) and self.metric is not None
        self.exhausted = False

    def suggest(self, trials: list) -> dict | None:
        """A trial's params; None when a grid is done (`exhausted`) or random and bayes keep drawing configs of
        running trials."""
        runs = [as_sweep_run(t, self.metric) for t in trials]
        running = [t.params for t in trials if t.state in LIVE]
        for _ in range(20):  # random/bayes may repeat a running config: draw again
            suggestion = sweeps.next_run(self.config, runs)
            if suggestion is None:
                self.exhausted = True
                return None
            params = plain(suggestion.config)
            if params not in running:
                return params
        return None

    def observe(self, trials: list) -> dict[str, str]:
        """The running trials hyperband stops, with the reason."""
        if not self.early_terminate:
            return {}
        to_stop = sweeps.stop_runs(self.config, [as_sweep_run(t, self.metric) for t in trials])
        live = {t.id for t in trials if t.state == RUNNING and t.stop_requested is None}
        return {run.name: "early-terminated by hyperband" for run in to_stop if run.name in live}
