"""What W&B does with a sweep YAML, as its own code does it: the schema and the engine (the `sweeps`
package: suggestions, hyperband stops), and the command `wandb agent` starts for a trial.

Nothing here knows our program: the offline controller runs any W&B program through it, and
`agent validate` adds our config's checks on top (validate.py).
"""

import json
import warnings
from pathlib import Path

from agent.contract import PAUSED, STOPPED

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
    say): asked once, with no runs, so that it refuses before any trial or network call."""
    try:
        config = engine_config(sweep)
        sweeps.next_run(config, [])
        if sweep.get("early_terminate"):
            sweeps.stop_runs(config, [])
    except Exception as e:  # whatever the engine raises is the user's YAML to fix
        return [f"W&B's sweep engine refuses it: {(str(e).strip().splitlines() or [type(e).__name__])[0]}"]
    return []


def sweep_metric(sweep: dict) -> tuple[str | None, str]:
    """The sweep's metric name (None when it has none) and goal, W&B's default goal included."""
    metric = sweep.get("metric") or {}
    return metric.get("name"), metric.get("goal", "minimize")


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
