"""`python -m agent validate FILE...`: is this sweep YAML one W&B accepts and our program can run?

Two checks: W&B's own schema (the `sweeps` engine's), then, when the YAML runs
our program, the TrainConfig: every parameter is a config field, every value or
range endpoint one the config accepts, and `metric` matches the runs' `monitor`.
"""

import math
import warnings
from pathlib import Path

import yaml
from pydantic import ValidationError

from agent.errors import UsageError, describe_validation_error
from cifar_core.config import LOGGED_METRICS, MONITORS, TrainConfig

with warnings.catch_warnings():  # sweeps 0.3 imports with a pydantic-v1 config warning
    warnings.simplefilter("ignore")
    import sweeps

# Ranges checkable at their ends, and those given in log space (natural log) among them.
BOUNDED = {"uniform", "q_uniform", "int_uniform", "log_uniform_values", "q_log_uniform_values",
           "log_uniform", "q_log_uniform"}
LOG_SPACE = {"log_uniform", "q_log_uniform"}


def load_sweep(path: str) -> dict:
    try:
        config = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise UsageError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise UsageError(f"{path}: expected a mapping of sweep settings, got {type(config).__name__}")
    return config


def runs_our_program(sweep: dict) -> bool:
    """True when the sweep's command is `... -m agent run ...`."""
    command = [str(c) for c in sweep.get("command") or []]
    return any(command[i:i + 3] == ["-m", "agent", "run"] for i in range(len(command)))


def candidate_values(spec: dict) -> list:
    """The values a parameter spec can take, as far as checkable: the list, or a range's ends."""
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        return list(spec["values"])
    distribution = spec.get("distribution", "uniform")  # W&B's default for min/max (int_uniform for ints)
    if distribution not in BOUNDED:
        return []  # normal, beta, inverse: unbounded or rare; W&B's schema checks the shape
    ends = [spec[k] for k in ("min", "max") if k in spec]
    return [math.exp(v) for v in ends] if distribution in LOG_SPACE else ends


def parameter_problems(name: str, spec) -> list[str]:
    if name not in TrainConfig.model_fields:
        return [f"parameters.{name}: not a config key; allowed: {', '.join(TrainConfig.model_fields)}"]
    if not isinstance(spec, dict):
        return []  # W&B's schema check reports the shape
    problems = []
    for value in candidate_values(spec):
        try:
            TrainConfig(**{name: value})
        except ValidationError as e:
            problems.append(f"parameters.{name}: {describe_validation_error(e)}")
    return problems


def metric_problems(sweep: dict) -> list[str]:
    metric = sweep.get("metric") or {}
    name, goal = metric.get("name"), metric.get("goal", "minimize")
    monitor_spec = (sweep.get("parameters") or {}).get("monitor", {})
    if isinstance(monitor_spec, dict) and len(monitor_spec.get("values", [None])) > 1:
        return ["parameters.monitor: must be one fixed value in a sweep (the sweep's metric follows it)"]
    monitor = monitor_spec.get("value", TrainConfig.model_fields["monitor"].default) \
        if isinstance(monitor_spec, dict) else TrainConfig.model_fields["monitor"].default
    if name is None:
        return []  # no metric is allowed for grid/random; W&B's schema requires it for bayes
    problems = []
    if name not in LOGGED_METRICS:
        problems.append(f"metric.name={name!r}: not a key the program logs; logged: {', '.join(LOGGED_METRICS)}")
    elif name != monitor:
        problems.append(f"metric.name={name!r}: must equal the runs' monitor ({monitor!r}), "
                        f"else early stopping and the best checkpoint follow another metric")
    expected_goal = {"max": "maximize", "min": "minimize"}[MONITORS.get(monitor, "max")]
    if name == monitor and goal != expected_goal:
        problems.append(f"metric.goal={goal!r}: {name} must be {expected_goal}d")
    return problems


def sweep_problems(sweep: dict) -> list[str]:
    problems = list(sweeps.schema_violations_from_proposed_config(sweep))
    if runs_our_program(sweep):
        for name, spec in (sweep.get("parameters") or {}).items():
            problems += parameter_problems(name, spec)
        problems += metric_problems(sweep)
    return problems


def validate(paths: list[str]) -> int:
    """Prints a line per problem, `FILE: ok` for a valid file; returns the exit code."""
    failed = False
    for path in paths:
        try:
            problems = sweep_problems(load_sweep(path))
        except UsageError as e:
            problems = [str(e).removeprefix(f"{path}: ")]
        for problem in problems:
            print(f"{path}: {problem}")
        if not problems:
            print(f"{path}: ok")
        failed |= bool(problems)
    return 1 if failed else 0
