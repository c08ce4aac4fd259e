"""The trial program's flags and config: `--key=value` as W&B's `${args}` macros produce them (`--key=value`,
`--key value`, bare `--flag` for true) into a TrainConfig, a bad key or value as one line (a misspelt key: the
close ones), and `agent run --help`'s list of keys."""

from typing import Literal, get_args, get_origin

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from agent.errors import UsageError, describe_validation_error, did_you_mean
from cifar_core.config import TrainConfig

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
