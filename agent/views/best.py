"""`python -m agent best TARGET [--evaluate] [--export PATH]`: a sweep's best trial, ready to use.

TARGET is a local sweep DIR (made by `python -m agent local`, holds DIR/sweep.db) or a W&B sweep
ENTITY/PROJECT/SWEEP_ID. Prints the best trial by the sweep's metric and goal (locally: finished or
stopped trials with a metric): its id, state and metric; its full config as a `python -m agent run`
line that trains it again; and its best checkpoint (locally the file its run logged as the
`model-<id>` artifact; on W&B the `model-<id>:best` artifact, downloaded).

  --evaluate     load the checkpoint (weights only: no pickled code runs) and score it on the test
                 split the trial used, as its own test pass did (same function, same test-time
                 augmentation): test accuracy, beside the one the trial logged, per class.
  --export PATH  write the network with torch.export (a .pt2 file that needs only torch): it takes
                 float images N x 3 x S x S at the trial's image size S, in [0, 1] (torchvision's
                 ToTensor) or 0-255 (uint8 is refused), normalises them inside as its weights
                 expect, averages over the trial's test-time augmentation (its `tta`), returns
                 logits; class names, input and trial in its extra files.

    python -m agent best sweeps-local/SWEEP_ID --evaluate --export best.pt2
    extra = {"class_names.json": ""}
    model = torch.export.load("best.pt2", extra_files=extra).module()
    json.loads(extra["class_names.json"])[model(x).argmax(-1)[0]]
"""

import json
import shlex
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.table import Table
from torch import nn

from agent.errors import UsageError
from agent.program.run import make_config
from agent.controller.runlog import RunLogReader, find_run_files, history_row
from agent.views.status import console
from agent.controller.store import is_local_target, open_store
from agent.views.trials import best_trial, is_number, sweep_metric
from agent.online.api import find_sweep, first_line, wandb_api, wandb_errors
from cifar_core.checkpoints import BEST, checkpoint_dir, load_network
from cifar_core.config import TrainConfig
from cifar_core.evaluate import TTA
from cifar_core.model import NETWORK_FIELDS, network_fields

DONE = ("finished", "stopped")


@dataclass
class Best:
    id: str
    state: str
    where: str  # "trial X of sweep S" or "run X of sweep E/P/S"
    metric_name: str | None
    metric: float | None
    goal: str
    config: TrainConfig
    checkpoint: Path
    logged_test_acc: float | None
    data_roots: tuple[Path, ...]  # where a relative data_dir may lie


class RunLog:
    """What an offline run's log holds for us: config, last logged values, the model artifact."""

    def __init__(self, path: Path):
        self.config, self.summary, self.artifact = {}, {}, None
        for record in RunLogReader(path).records():
            kind = record.WhichOneof("record_type")
            if kind in ("run", "config"):
                for item in (record.run.config if kind == "run" else record.config).update:
                    self.config[item.key or ".".join(item.nested_key)] = json.loads(item.value_json)
            elif kind == "history":
                self.summary.update(history_row(record.history))
            elif kind == "artifact" and record.artifact.type == "model":
                self.artifact = record.artifact


def read_log(path: Path) -> RunLog | None:
    try:
        return RunLog(path)
    except (OSError, ValueError):  # unreadable or corrupt: as if the attempt had left no log
        return None


def flag(key: str, value) -> str:
    text = ("true" if value else "false") if isinstance(value, bool) else repr(value) if isinstance(value, float) \
        else str(value)
    return shlex.quote(f"--{key}={text}")


def run_command(config: TrainConfig) -> str:
    """Every field that applies to the trial's network, so that the line trains the same config even if the defaults
    change (width, say, is not a timm network's)."""
    elsewhere = NETWORK_FIELDS - network_fields(config.model)
    return "python -m agent run " + " ".join(flag(k, v) for k, v in config.model_dump().items()
                                             if v is not None and k not in elsewhere)


def known(values: dict) -> dict:
    return {k: v for k, v in values.items() if k in TrainConfig.model_fields}


def local_best(directory: str) -> Best:
    store = open_store(directory)
    root = Path(directory)
    sweep_id, sweep = store.sweep() or (None, None)
    if sweep is None:
        raise UsageError(f"{directory}: sweep.db holds no sweep yet")
    name, goal = sweep_metric(sweep)
    trial = best_trial([t for t in store.trials() if t.state in DONE], goal)
    if trial is None:
        raise UsageError(f"{directory}: no finished or stopped trial has a value of {name or 'the metric'} yet")
    # A retried trial has several attempts; the newest that saved a best model holds the best of all
    # of them (a resumed attempt carries its predecessors' best).
    attempts = [p.parent for p in reversed(find_run_files(root, trial.id))]
    checkpoint = next((checkpoint_dir(a) / BEST for a in attempts if (checkpoint_dir(a) / BEST).is_file()), None)
    if checkpoint is None:
        raise UsageError(f"trial {trial.id}: no best model ({root}/wandb/offline-run-*-{trial.id}/"
                         f"checkpoints/{BEST} missing)")
    run = read_log(checkpoint.parent.parent / f"run-{trial.id}.wandb")
    config = json.loads(run.artifact.metadata or "{}").get("config") if run and run.artifact else None
    if config is not None or (run is not None and known(run.config)):
        config = make_config(known(config if config is not None else run.config))
    else:  # no run log: the YAML's constants and the trial's values over the defaults
        constants = {k: s["value"] for k, s in (sweep.get("parameters") or {}).items()
                     if isinstance(s, dict) and "value" in s}
        try:
            config = make_config({**constants, **trial.config})
        except UsageError as e:
            raise UsageError(f"trial {trial.id}: not a config of this program: {e}") from None
    return Best(trial.id, trial.state, f"trial {trial.id} of sweep {sweep_id}", name, trial.metric, goal, config,
                checkpoint, run.summary.get("test_acc") if run else None, (Path.cwd(), root.parent, root.parent.parent))


def wandb_best(target: str) -> Best:
    entity, project, _ = target.split("/")
    with wandb_api(target, entity=entity) as api:
        sweep = find_sweep(api, target)
        run = sweep.best_run()
        if run is None:
            raise UsageError(f"{target}: the sweep has no runs yet")
        metric, goal = sweep_metric(sweep.config or {})
        name = f"{entity}/{project}/model-{run.id}:best"
        with wandb_errors(name):
            folder = api.artifact(name).download()
        # best_run() is lazy: its config and summary are fetched on first use, before wandb_api's teardown
        run_id, state, summary, config = run.id, run.state, dict(run.summary or {}), dict(run.config)
    checkpoint = Path(folder) / "model.ckpt"
    if not checkpoint.is_file():
        raise UsageError(f"{name}: no model.ckpt in {folder}")
    value = summary.get(metric) if metric else None
    return Best(run_id, state, f"run {run_id} of sweep {target}", metric, value if is_number(value) else None, goal,
                make_config(known(config)), checkpoint, summary.get("test_acc"), (Path.cwd(),))


def load_net(path: Path) -> nn.Module:
    """The network saved in a best-model checkpoint of ours, in eval mode."""
    try:
        return load_network(path)[0]
    except Exception as e:  # missing, truncated, not ours: all a bad checkpoint to the user
        raise UsageError(f"{path}: not a loadable checkpoint of this program ({first_line(e)})") from None


def trial_data(best: Best):
    """The trial's data (cifar_core.data.ImageDataModule, loaded): its test split and class names. A relative
    data_dir may be relative to where the sweep ran."""
    from cifar_core.data import datamodule_for
    from cifar_core.fetch import DatasetError

    config = best.config
    if config.dataset != "synthetic" and not Path(config.data_dir).is_absolute():
        found = next((base / config.data_dir for base in best.data_roots if (base / config.data_dir).is_dir()), None)
        if found is None:
            raise UsageError(f"{Path.cwd() / config.data_dir}: the trial's data is not there (its "
                             f"data_dir={config.data_dir!r}, relative to where the sweep ran)")
        config = config.model_copy(update={"data_dir": str(found)})
    data = datamodule_for(config)
    try:
        data.load()
    except DatasetError as e:
        raise UsageError(str(e)) from None
    return data


class Exported(nn.Module):
    """What --export saves: float images in, logits out, with the network's normalisation and the trial's
    test-time augmentation (cifar_core.evaluate.TTA, as its test pass used it) inside. Floats in [0, 1]
    (torchvision's ToTensor) are taken as they are; an image whose values exceed 1 (floats in 0-255) is
    scaled by 1/255 first. The exported program refuses uint8 (its input dtype is fixed when traced)."""

    def __init__(self, net: nn.Module, tta: int):
        super().__init__()
        self.model = TTA(net, tta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return self.model(torch.where(x.amax(dim=(1, 2, 3), keepdim=True) > 1, x / 255, x))


def export_model(net: nn.Module, class_names, path: str, best: Best) -> None:
    """torch.export, loadable with torch alone: torch.export.load(path).module()(x)."""
    size = best.config.resolution
    module = Exported(net, best.config.tta).eval()
    with warnings.catch_warnings():  # tracing notices of timm's networks: not the user's to act on
        warnings.simplefilter("ignore")
        program = torch.export.export(module, (torch.rand(2, 3, size, size),),
                                      dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    extra = {"class_names.json": json.dumps(list(class_names)),
             "input.json": json.dumps({"shape": ["N", 3, size, size], "dtype": "float32",
                                       "values": "in [0, 1], or 0-255",
                                       "tta": best.config.tta}),
             "trial.json": json.dumps({"id": best.id, best.metric_name or "metric": best.metric,
                                       "config": best.config.model_dump()})}
    try:
        torch.export.save(program, path, extra_files=extra)
    except (OSError, RuntimeError) as e:
        raise UsageError(f"{path}: cannot write ({first_line(e)})") from None


def find_best(target: str) -> Best:
    return local_best(target) if is_local_target(target) else wandb_best(target)


def best(target: str, evaluate: bool = False, export: str | None = None) -> int:
    if export and not Path(export).parent.is_dir():
        raise UsageError(f"{export}: cannot write (no directory {Path(export).parent})")
    found = find_best(target)
    metric = "no metric" if found.metric is None else f"{found.metric_name}={found.metric:.6g} ({found.goal})"
    print(f"best: {found.where}, {found.state}, {metric}")
    print(f"config: {run_command(found.config)}")
    print(f"checkpoint: {found.checkpoint}")
    if not (evaluate or export):
        return 0
    net = load_net(found.checkpoint)
    data = trial_data(found)
    if evaluate:
        from cifar_core.evaluate import evaluate as score, inference

        test = data.test_set
        result = score(net, test, test.labels, num_classes=len(data.classes), **inference(found.config))
        logged = "" if found.logged_test_acc is None else f" (logged by the trial: {found.logged_test_acc:.4f})"
        print(f"test_acc: {result['test_acc']:.4f}{logged} on {len(test)} images, {found.config.dataset} "
              f"{data.notes['data/test_split']} split" + ("" if found.config.dataset == "synthetic" else
                                                           f" of {found.config.data_dir}"))
        table = Table(box=None, header_style="bold")
        for column in ("class", "accuracy", "images"):
            table.add_column(column, justify="left" if column == "class" else "right")
        counts = torch.bincount(test.labels, minlength=len(data.classes)).tolist()
        for name, acc, n in zip(data.classes, result["per_class_acc"], counts):
            table.add_row(name, f"{acc:.4f}", str(n))
        console().print(table)
    if export:
        export_model(net, data.classes, export, found)
        size = found.config.resolution
        print(f"exported: {export} (torch.export; torch.export.load(PATH).module()(x): x float N x 3 x {size} x "
              f"{size} in [0, 1] -> logits, test-time augmentation level {found.config.tta}; class names in its "
              "extra file class_names.json)")
    return 0
