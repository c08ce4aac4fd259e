"""`python -m agent run --key=value ...`: the program every sweep runs.

Parses the flags W&B's `${args}` macros produce (`--key=value`, `--key value`,
bare `--flag` for true) into a TrainConfig, starts the W&B run (a sweep's values
override the flags and defaults), validates the run's final config, and trains.
"""

import os

from pydantic import ValidationError

from agent.errors import RunEndedEarly, UsageError, describe_validation_error
from cifar_core.config import TrainConfig
from cifar_core.stopping import EXIT_CODES, INTERRUPT, PREEMPT, StopRequests


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
    """Trains; raises RunEndedEarly when a preemption or Ctrl-C must set a non-zero exit code."""
    config = make_config(parse_flags(argv))  # fail before any run exists
    with StopRequests() as requests:  # from here on a stop is never lost, even during imports and wandb.init
        import wandb

        # resume="allow": a requeued (preempted) sweep run comes back under its own id and continues.
        # stop_fn: W&B's stop reaches the run as a request, not as a KeyboardInterrupt mid-step.
        run = wandb.init(project=os.environ.get("WANDB_PROJECT") or config.project, config=config.model_dump(),
                         job_type="train", resume="allow", settings=wandb.Settings(stop_fn=requests.wandb_stop))
        try:
            # Under a sweep the run's config holds the sweep's values; validate what will train.
            config = make_config(dict(run.config))
        except UsageError:
            run.finish(exit_code=2)
            raise
        from cifar_core.train import Preempted, train  # torch and lightning load only for valid input

        try:
            result = train(config, requests=requests)
        except Preempted as e:
            run.finish(exit_code=EXIT_CODES[PREEMPT])
            raise RunEndedEarly(str(e), EXIT_CODES[PREEMPT]) from None
        except BaseException:
            run.finish(exit_code=1)
            raise
        run.finish(exit_code=EXIT_CODES[requests.reason])
    if requests.reason == INTERRUPT:
        raise RunEndedEarly("interrupted; the best model so far is logged", EXIT_CODES[INTERRUPT])
    return result
