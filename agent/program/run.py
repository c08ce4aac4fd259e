"""`python -m agent run --key=value ...`: the program every sweep runs.

Parses the flags W&B's `${args}` macros produce (`--key=value`, `--key value`,
bare `--flag` for true) into a TrainConfig, starts the W&B run (a sweep's values
override the flags and defaults), validates the run's final config, and trains.
A bad key, value or data file exits 2 with one line (a misspelt key: the close ones).
"""

import itertools
import os
from pathlib import Path
from typing import Literal, get_args, get_origin

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from agent.errors import RunEndedEarly, UsageError, describe_validation_error, did_you_mean
from cifar_core.config import TrainConfig
from cifar_core.stopping import EXIT_CODES, INTERRUPT, PREEMPT, StopRequests, completed_exit_code

BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}  # pydantic's Field constraints, as help shows them


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
        raise UsageError(f"unknown key {unknown[0]!r}; {did_you_mean(unknown[0], TrainConfig.model_fields)}")
    try:
        return TrainConfig(**values)
    except ValidationError as e:
        raise UsageError(describe_validation_error(e)) from None


def as_flag(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def allowed_values(name: str, field: FieldInfo) -> str:
    """What a key accepts, as a user types it: `adam | adamw | sgd`, `true | false`, `float, lr > 0`."""
    if field.description:
        return field.description
    if get_origin(field.annotation) is Literal:
        return " | ".join(map(as_flag, get_args(field.annotation)))
    if field.annotation is bool:
        return "true | false"
    bounds = [(op, getattr(m, attr)) for attr, op in BOUNDS.items() for m in field.metadata if hasattr(m, attr)]
    kinds = [t for t in get_args(field.annotation) if t is not type(None)] or [field.annotation]
    kind = kinds[0].__name__ + (", or unset" if len(kinds) < len(get_args(field.annotation)) else "")
    if len(bounds) == 2:  # lower first, as BOUNDS lists them
        (low_op, low), (high_op, high) = bounds
        return f"{kind}, {low} {low_op.replace('>', '<')} {name} {high_op} {high}"
    return ", ".join([kind, *(f"{name} {op} {v}" for op, v in bounds)])


def config_help() -> str:
    lines = ["Keys (--key=value), with their defaults and what each accepts:"]
    for name, field in TrainConfig.model_fields.items():
        flag = f"  --{name}={as_flag(field.get_default(call_default_factory=True))}"
        lines.append(f"{flag:<30}  ({allowed_values(name, field)})")
    return "\n".join(lines)


def seconds_since_process_start() -> float:
    """From the start of this process (Python's own start-up and the imports included), by Linux's clock."""
    with open("/proc/self/stat") as f:
        started = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
    with open("/proc/uptime") as f:
        return float(f.read().split()[0]) - started


def prepare_data(config: TrainConfig, in_sweep: bool = False) -> None:
    """The config's inputs in place, or one line saying what is missing or wrong and what fixes it (as flags,
    or as the sweep's parameters when the config comes from a sweep): CIFAR fetched once per box, an image
    folder checked and decoded once per box, pretrained weights downloaded once per box, a pretrained_path
    that holds the network's weights (the network made once to compare). Before any run exists; without
    torch, but for pretrained weights."""
    from cifar_core.fetch import ARCHIVES, DatasetError, fetch

    if config.pretrained_path and not Path(config.pretrained_path).expanduser().is_file():
        raise UsageError(f"pretrained_path={config.pretrained_path!r}: no such file (expected the network's "
                         "weights: a .safetensors file or a torch state dict)")
    try:
        if config.dataset in ARCHIVES:
            fetch(config.dataset, config.data_dir)
        elif config.dataset == "imagefolder":
            from cifar_core.folder import load_folder

            load_folder(config.data_dir, config.resolution, config.cache_dir)
        if config.pretrained_path:
            from cifar_core.model import check_pretrained

            check_pretrained(config.model, config.pretrained_path)
        elif config.pretrained:
            from cifar_core.model import TIMM, create_model, in_hub_cache

            if not in_hub_cache(config.model.removeprefix(TIMM)):  # downloaded once, under the lock
                create_model(config.model, pretrained=True)
    except DatasetError as e:
        raise UsageError(e.in_sweep() if in_sweep else str(e)) from None


# what decides the data a trial reads, and the weights it starts from
DATA_FIELDS = ("dataset", "data_dir", "image_size", "cache_dir", "model", "pretrained", "pretrained_path")


def prepare_sweep(sweep: dict) -> None:
    """The data of a sweep of our program, prepared once before its first trials (not by each at once), or
    one line saying what is wrong. Ranges are left to the trials (they share the same lock)."""
    from agent.program.validate import candidate_values

    parameters = sweep.get("parameters") or {}
    choices = [candidate_values(parameters[name]) if name in parameters else [None] for name in DATA_FIELDS]
    for values in itertools.product(*choices):
        prepare_data(make_config({k: v for k, v in zip(DATA_FIELDS, values) if v is not None}), in_sweep=True)


def run(argv: list[str]) -> dict:
    """Trains; raises RunEndedEarly when a preemption or Ctrl-C must set a non-zero exit code."""
    config = make_config(parse_flags(argv))  # fail before any run exists
    in_sweep = bool(os.environ.get("WANDB_SWEEP_ID"))
    with StopRequests() as requests:  # from here on a stop is never lost, even during imports and wandb.init
        prepare_data(config, in_sweep)
        import wandb

        started_init = seconds_since_process_start()
        # resume="allow": a requeued (preempted) sweep run comes back under its own id and continues.
        # stop_fn: W&B's stop reaches the run as a request, not as a KeyboardInterrupt mid-step.
        # Under a sweep the project is the sweep's: naming one only makes wandb print that it ignores it.
        run = wandb.init(project=None if in_sweep else config.project, config=config.model_dump(),
                         job_type="train", resume="allow", settings=wandb.Settings(stop_fn=requests.wandb_stop))
        initialized = seconds_since_process_start()
        try:
            # Under a sweep the run's config holds the sweep's values; validate what will train.
            config = make_config(dict(run.config))
            prepare_data(config, in_sweep)
        except UsageError:
            run.finish(exit_code=2)
            raise
        from cifar_core.ddp import RankDied
        from cifar_core.fetch import DatasetError
        from cifar_core.train import Preempted, train  # torch and lightning load only for valid input
        # Where a trial's time goes, beside its metrics (train() adds setup, fit, test and logging):
        # start-up is this process's start to training's, imports and wandb.init included.
        run.summary.update({"trial/startup_s": seconds_since_process_start(),
                            "trial/wandb_init_s": initialized - started_init})

        try:
            result = train(config, requests=requests)
        except DatasetError as e:  # corrupt data files: the user's to fix, not a crash
            run.finish(exit_code=2)
            raise UsageError(str(e)) from None
        except Preempted as e:
            run.finish(exit_code=EXIT_CODES[PREEMPT])
            raise RunEndedEarly(str(e), EXIT_CODES[PREEMPT]) from None
        except RankDied as e:  # what failed is that rank, not the collective rank 0 was waiting in
            run.summary["failed_rank"] = str(e)
            run.finish(exit_code=1)
            raise RunEndedEarly(str(e), 1) from None
        except BaseException:
            run.finish(exit_code=1)
            raise
        run.finish(exit_code=completed_exit_code(requests.reason))
    if requests.reason == INTERRUPT:
        raise RunEndedEarly("interrupted; the best model so far is logged", EXIT_CODES[INTERRUPT])
    return result
