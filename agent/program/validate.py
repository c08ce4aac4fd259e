"""`python -m agent validate FILE...`: is this sweep YAML one W&B accepts and our program can run?

Three checks: W&B's own schema (the `sweeps` engine's); what W&B's agent needs to start a trial
(a command or a program, macros it knows, a metric for bayes and early_terminate); and, when the
YAML runs our program, the TrainConfig: every parameter is a config field, every value or range
endpoint one the config accepts, `metric` matches the runs' `monitor`, and the inputs that are on this
box: the image folder of dataset imagefolder, one the trials can train on as far as its file names
tell (no image is decoded), and a pretrained_path that holds its network's weights.

Runs our program: the command W&B's agent starts (`command:`, else its default
`${env} ${interpreter} ${program} ${args}`, `${program}` being `program:`) holds the items
`-m`, `agent`, `run` in a row, with or without ${env} and ${interpreter}. Its flags macro must be
one `agent run` parses: ${args}, ${args_no_equals} or ${args_no_boolean_flags} (or none: the
sweep's values reach the run through W&B's config all the same); ${args_no_hyphens},
${args_json} and the other forms are refused. A YAML that names our code in a form W&B cannot
start gets the config checks too, and is refused with the command to use: `-m agent run` inside
one item (W&B passes each item as one argument), or `agent/program/run.py`, `agent/__main__.py`,
`agent` or `agent.program.run` as the program (W&B starts `python PROGRAM`: agent/program/run.py exits 0
having trained nothing; the others lack the `run` command or the package on the path).
"""

import math
import re
from pathlib import Path

import yaml
from pydantic import ValidationError

from agent.contract import COSTS
from agent.controller.engine import DEFAULT_COMMAND, engine_problems, schema_problems
from agent.errors import UsageError, describe_validation_error, did_you_mean
from cifar_core.config import LOGGED_METRICS, MONITORS, TrainConfig, default_project

# What our program logs, and the goal that makes sense for it (None: either).
GOALS = {**dict.fromkeys(LOGGED_METRICS), "val_acc": "maximize", "test_acc": "maximize", "val_loss": "minimize",
         "test_loss": "minimize", **dict.fromkeys(COSTS, "minimize")}
# Ranges checkable at their ends, and those given in log space (natural log) among them.
BOUNDED = {"uniform", "q_uniform", "int_uniform", "log_uniform_values", "q_log_uniform_values",
           "log_uniform", "q_log_uniform"}
LOG_SPACE = {"log_uniform", "q_log_uniform"}

# As a block list: in YAML's flow form, [${env}, ...], each `{` would start a mapping.
USE_OUR_COMMAND = "use the command of sweeps/bayes.yaml, a block list: `command:` then the lines `- ${env}`, " \
                  "`- ${interpreter}`, `- -m`, `- agent`, `- run`, `- ${args}`"
# The items W&B's agent replaces (wandb_agent.py, create_sweep_command_args); it turns any other
# `${...}` item into nothing, and leaves a macro inside a longer item as it is.
FLAG_MACROS = ("args", "args_no_equals", "args_no_hyphens", "args_no_boolean_flags", "args_json", "args_json_file",
               "args_dict", "args_append_hydra", "args_override_hydra")
MACROS = ("env", "interpreter", "program", *FLAG_MACROS)
OUR_FLAGS = ("args", "args_no_equals", "args_no_boolean_flags")  # what agent/program/run.py's parse_flags reads
MACRO = re.compile(r"\$\{(\w+)\}")
ENVVAR = re.compile(r"\$\{envvar:[A-Z0-9_]*\}")  # W&B substitutes these inside any item
OUR_FILES = {("program", "run.py"), ("agent", "__main__.py")}


def load_sweep(path: str) -> dict:
    try:
        config = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text; expected a sweep YAML file") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: a directory; expected a sweep YAML file") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise UsageError(f"{path}: not valid YAML ({yaml_problem(e)})") from None
    if config is None:
        raise UsageError(f"{path}: empty; expected sweep settings (method, metric, parameters, command)")
    if not isinstance(config, dict):
        raise UsageError(f"{path}: expected a mapping of sweep settings, got {type(config).__name__}")
    return config


def yaml_problem(error: yaml.YAMLError) -> str:
    """The parser's first line, and the fix where a macro in a flow list, [${env}, ...], is the cause."""
    first = str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    line = mark.buffer.splitlines()[mark.line] if mark is not None and mark.buffer else ""
    if "flow" in first and "${" in line:
        return (f"{first}, line {mark.line + 1}: inside [...] a `{{` starts a mapping, so ${{...}} macros there "
                f"must be quoted (\"${{env}}\") or the list written as a block, one `- ${{env}}` per line, "
                f"as sweeps/bayes.yaml does")
    return first


def command_items(sweep: dict) -> list[str]:
    """The items W&B's agent starts, `${program}` filled in; other macros as written."""
    command = sweep.get("command") or DEFAULT_COMMAND
    program = sweep.get("program")
    return [str(program) if item == "${program}" and program is not None else str(item)
            for item in (command if isinstance(command, list) else [command])]


def names_our_code(item: str) -> bool:
    return any(Path(word).name == "agent" or Path(word).parts[-2:] in OUR_FILES or word == "agent.program.run"
               for word in item.split())


def runs_our_program(sweep: dict) -> bool:
    """True when the YAML means to run our program, in a form W&B can start or not: the config checks apply."""
    return any(map(names_our_code, command_items(sweep)))


def command_problems(sweep: dict) -> list[str]:
    """What stops W&B's agent from starting any program: no command, unknown or split macros."""
    if not sweep.get("command") and "program" not in sweep:
        return ["command: missing, and no program for W&B's default `${env} ${interpreter} ${program} ${args}`; "
                f"to run ours, {USE_OUR_COMMAND}"]
    if not isinstance(sweep.get("command") or [], list):
        return []  # W&B's schema check reports it
    problems = []
    for item in map(str, sweep.get("command") or []):
        if macro := MACRO.fullmatch(item):
            if macro[1] not in MACROS:
                problems.append(f"command: {item}: not a macro W&B's agent knows (it passes nothing); "
                                f"{did_you_mean(macro[1], MACROS)}")
            elif macro[1] == "program" and "program" not in sweep:
                problems.append("command: ${program} is used but program: is not set")
        elif "${" in ENVVAR.sub("", item):
            problems.append(f"command: {item!r}: W&B replaces a macro only as a whole item; split it into items")
    return problems


def our_command_problems(sweep: dict) -> list[str]:
    items = command_items(sweep)
    problems = []
    if not any(items[i:i + 3] == ["-m", "agent", "run"] for i in range(len(items))):
        program = sweep.get("program")
        if program in items and names_our_code(str(program)):
            problems.append(f"program: {program!r}: not how our program starts (W&B runs `python PROGRAM`, "
                            f"PROGRAM as one argument); {USE_OUR_COMMAND}")
        else:
            problems.append("command: our program starts only as the items -m, agent, run (W&B passes each item "
                            f"as one argument); {USE_OUR_COMMAND}")
    for item in items:
        if (macro := MACRO.fullmatch(item)) and macro[1] in FLAG_MACROS and macro[1] not in OUR_FLAGS:
            problems.append(f"command: {item}: `agent run` cannot parse the flags it gives; use ${{args}}")
    return problems


def metric_required(sweep: dict) -> list[str]:
    needs = [what for what, used in (("method bayes", sweep.get("method") == "bayes"),
                                     ("early_terminate", "early_terminate" in sweep)) if used]
    if not needs or "metric" in sweep:
        return []
    return [f"metric: {' and '.join(needs)} need{'s' if len(needs) == 1 else ''} metric.name and metric.goal "
            "(minimize or maximize), e.g. metric: {name: val_acc, goal: maximize}"]


def candidate_values(spec: dict) -> list:
    """The values a parameter spec can take, as far as checkable: the list, or a range's ends."""
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        return list(spec["values"]) if isinstance(spec["values"], list) else []
    distribution = spec.get("distribution", "uniform")  # W&B's default for min/max (int_uniform for ints)
    if distribution not in BOUNDED:
        return []  # normal, beta, inverse: unbounded or rare; W&B's schema checks the shape
    ends = [spec[k] for k in ("min", "max") if isinstance(spec.get(k), (int, float))]
    # Past e^709 a float overflows; such an end is out of any range anyway.
    return [math.exp(min(v, 709)) for v in ends] if distribution in LOG_SPACE else ends


def parameter_problems(name: str, spec: dict, around: dict) -> list[str]:
    """Each value the parameter can take, with the other parameters `around` it."""
    if name not in TrainConfig.model_fields:
        return [f"parameters.{name}: not a config key; {did_you_mean(name, TrainConfig.model_fields)}"]
    problems = []
    for value in candidate_values(spec):
        try:
            TrainConfig(**{**around, name: value})
        except ValidationError as e:
            if any(error["loc"] in ((name,), ()) for error in e.errors()):  # not only another parameter's own
                problems.append(f"parameters.{name}: {describe_validation_error(e)}")
    return problems


def metric_problems(sweep: dict, parameters: dict) -> list[str]:
    """Each objective (`metric:`, or each of `metrics:`) a key our program logs, with its goal; a validation metric
    the runs' monitor too, else early stopping and the best checkpoint would follow another metric."""
    key = "metrics" if isinstance(sweep.get("metrics"), list) else "metric"
    written = sweep.get("metrics") if key == "metrics" else [sweep.get("metric")] if sweep.get("metric") else []
    monitor_spec = parameters.get("monitor", {})
    if isinstance(monitor_spec.get("values"), list) and len(monitor_spec["values"]) > 1:
        return ["parameters.monitor: must be one fixed value in a sweep (the sweep's metric follows it)"]
    monitor = monitor_spec.get("value", TrainConfig.model_fields["monitor"].default)
    problems = []
    for i, metric in enumerate(m for m in written if isinstance(m, dict)):
        where = f"metrics[{i}]" if key == "metrics" else "metric"
        name, goal = metric.get("name"), metric.get("goal", "minimize")
        if name not in GOALS:
            problems.append(f"{where}.name={name!r}: not a key the program logs; logged: {', '.join(GOALS)}")
        elif name in MONITORS and name != monitor:
            problems.append(f"{where}.name={name!r}: must equal the runs' monitor ({monitor!r}), else early stopping "
                            "and the best checkpoint follow another metric")
        elif GOALS[name] and goal != GOALS[name]:
            problems.append(f"{where}.goal={goal!r}: {name} must be {GOALS[name]}d")
    return problems


def image_folders(parameters: dict) -> list[str]:
    """The image folders a sweep's trials would read (relative to where it runs). A data_dir left to the default,
    or to the command's flags, may be another one on each box."""
    dataset = parameters.get("dataset", {"value": TrainConfig.model_fields["dataset"].default})
    if "imagefolder" not in candidate_values(dataset) or "data_dir" not in parameters:
        return []
    return [d for d in candidate_values(parameters["data_dir"]) if isinstance(d, str)]


def folder_problems(parameters: dict) -> list[str]:
    """Each image folder the sweep names that is on this box and that the trials' scan refuses: a stat per file,
    its decoding left to the trials. One that is not here may be on the GPU boxes."""
    from cifar_core.fetch import DatasetError
    from cifar_core.folder import scan

    problems = []
    for data_dir in image_folders(parameters):
        if Path(data_dir).is_dir():
            try:
                scan(Path(data_dir).absolute())
            except DatasetError as e:
                problems.append(f"parameters.data_dir: {e.in_sweep()}")
    return problems


def weights_problems(parameters: dict) -> list[str]:
    """Each pretrained_path the sweep names that is on this box and is not weights of its timm network (another
    network's would load in part, the rest left random): one network built for each, which imports torch."""
    if "pretrained_path" not in parameters:
        return []
    from cifar_core.fetch import DatasetError
    from cifar_core.model import TIMM, check_pretrained

    problems = []
    for model in candidate_values(parameters.get("model", {"value": TrainConfig.model_fields["model"].default})):
        for path in candidate_values(parameters["pretrained_path"]):
            if isinstance(model, str) and model.startswith(TIMM) and isinstance(path, str) and Path(path).is_file():
                try:
                    check_pretrained(model, path)
                except DatasetError as e:
                    problems.append(f"parameters.pretrained_path: {str(e).removeprefix('pretrained_path=')}")
    return problems


def sweep_problems(sweep: dict) -> list[str]:
    """A line per problem W&B or our program would hit; [] for a sweep that can run."""
    # The sweeps engine's check raises on parameters that are not mappings: it gets them as mappings.
    config = dict(sweep)
    written = config.pop("parameters", None)
    if written is not None and not isinstance(written, dict):
        return [f"parameters: expected a mapping of names to specs, got {type(written).__name__}"]
    problems, parameters = [], {}
    for name, spec in (written or {}).items():
        if not isinstance(spec, dict):
            spec = {"values": spec} if isinstance(spec, list) else {"value": spec}
            problems.append(f"parameters.{name}: expected a mapping, e.g. "
                            f"{yaml.safe_dump(spec, default_flow_style=True).strip()}")
        parameters[str(name)] = spec
    if written is not None:
        config["parameters"] = parameters
    problems += schema_problems(config)
    problems += command_problems(sweep) + metric_required(sweep)
    if not problems:  # the engine's own checks assume a schema-valid sweep
        problems += engine_problems(config)
    if runs_our_program(sweep):
        problems += our_command_problems(sweep)
        # Each value is checked beside the others' first (a constant's only) values: a value that clashes with
        # another field (drop_path_rate, for a non-timm model) is one that a trial of this sweep would get.
        around = {name: values[0] for name, spec in parameters.items()
                  if name in TrainConfig.model_fields and (values := candidate_values(spec))}
        for name, spec in parameters.items():
            problems += parameter_problems(name, spec, around)
        problems += metric_problems(sweep, parameters) + folder_problems(parameters) + weights_problems(parameters)
    return problems


def unchecked(sweep: dict) -> str:
    """What `ok` could not cover here, of a sweep with no problems: the image folders that are not on this box."""
    folders = image_folders(sweep.get("parameters") or {}) if runs_our_program(sweep) else []
    away = [d for d in folders if not Path(d).is_dir()]
    return f" (parameters.data_dir {', '.join(map(repr, away))}: not on this box; checked where it runs)" if away \
        else ""


def checked_sweep(path: str) -> dict:
    """The sweep in `path`, refused in one line naming every problem W&B or our program would hit."""
    sweep = load_sweep(path)
    if problems := sweep_problems(sweep):
        raise UsageError(f"{path}: " + "; ".join(problems))
    return sweep


def project_of(sweep: dict) -> str:
    """The W&B project a new sweep goes to when the command names none: its own, else our runs' default."""
    return sweep.get("project") or default_project()


def validate(paths: list[str]) -> int:
    """Prints a line per problem, `FILE: ok` for a valid file; returns the exit code."""
    failed = False
    for path in paths:
        try:
            sweep = load_sweep(path)
            problems = sweep_problems(sweep)
        except UsageError as e:
            problems = [str(e).removeprefix(f"{path}: ")]
        for problem in problems:
            print(f"{path}: {problem}")
        if not problems:
            print(f"{path}: ok{unchecked(sweep)}")
        failed |= bool(problems)
    return 1 if failed else 0
