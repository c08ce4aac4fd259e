"""`python -m agent run --key=value ...`: the program every sweep runs.

Parses the flags W&B's `${args}` macros produce (`--key=value`, `--key value`,
bare `--flag` for true) into a TrainConfig, starts the W&B run (a sweep's values
override the flags and defaults), validates the run's final config, and trains.
"""

import os

import wandb
from pydantic import ValidationError

from agent.errors import RunPreempted, UsageError, describe_validation_error
from cifar_core.config import TrainConfig


def parse_flags(argv: list[str]) -> dict[str, str]:
    flags, i = {}, 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            raise UsageError(f"unexpected argument {token!r}: expected --key=value")
        key, has_value, value = token[2:].partition("=")
        if not has_value:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            else:
                value = "true"  # W&B's ${args_no_boolean_flags} passes true booleans bare
        flags[key.replace("-", "_")] = value
        i += 1
    return flags


def make_config(values: dict) -> TrainConfig:
    unknown = sorted(set(values) - set(TrainConfig.model_fields))
    if unknown:
        raise UsageError(f"unknown key {unknown[0]!r}; allowed: {', '.join(TrainConfig.model_fields)}")
    try:
        return TrainConfig(**values)
    except ValidationError as e:
        raise UsageError(describe_validation_error(e)) from None


def config_help() -> str:
    lines = ["Keys (--key=value), with their defaults:"]
    for name, field in TrainConfig.model_fields.items():
        lines.append(f"  --{name}={field.default!r}  ({getattr(field.annotation, '__name__', field.annotation)})")
    return "\n".join(lines)


def run(argv: list[str]) -> dict:
    config = make_config(parse_flags(argv))  # fail before any run exists
    # resume="allow": a requeued (preempted) sweep run comes back under its own id and continues
    run = wandb.init(project=os.environ.get("WANDB_PROJECT") or config.project,
                     config=config.model_dump(), job_type="train", resume="allow")
    try:
        # Under a sweep the run's config holds the sweep's values; validate what will train.
        config = make_config(dict(run.config))
    except UsageError:
        run.finish(exit_code=2)
        raise
    from cifar_core.train import Preempted, train  # torch and lightning load only for valid input

    try:
        result = train(config)
    except Preempted as e:
        run.finish(exit_code=RunPreempted.exit_code)
        raise RunPreempted(str(e)) from None
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish()
    return result
