"""What `python -m agent best` does with the best model of our program, or the one picked (views/best.py finds it;
with several objectives, from the Pareto front, which it prints first): its config as a `python -m agent run` line
that trains it again, and

  --evaluate     load the checkpoint (weights only: no pickled code runs) and score it on the test split the
                 trial used, as its own test pass did (same function, same test-time augmentation): test
                 accuracy, beside the one the trial logged, per class.
  --export PATH  write the network with torch.export (a .pt2 file that needs only torch): it takes float images
                 N x 3 x S x S at the trial's image size S, in [0, 1] (torchvision's ToTensor) or 0-255 (uint8 is
                 refused), normalises them inside as its weights expect, averages over the trial's test-time
                 augmentation (its `tta`), returns logits; class names, input and trial in its extra files.

    python -m agent best sweeps-local/SWEEP_ID --evaluate --export best.pt2
    extra = {"class_names.json": ""}
    model = torch.export.load("best.pt2", extra_files=extra).module()
    json.loads(extra["class_names.json"])[model(x).argmax(-1)[0]]
"""

import json
import shlex
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from agent.errors import UsageError, first_line
from agent.views.best import Best, find_best
from cifar_core.checkpoints import load_network
from cifar_core.config import TrainConfig
from cifar_core.data import ImageDataModule
from cifar_core.evaluate import TTA, evaluate, inference
from cifar_core.fetch import DatasetError
from cifar_core.model import NETWORK_FIELDS, network_fields


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


def load(path: Path) -> tuple[nn.Module, TrainConfig]:
    """The network saved in a best-model checkpoint of ours, in eval mode, and its trial's config."""
    try:
        net, config, _ = load_network(path)
    except Exception as e:  # missing, truncated, not ours: all a bad checkpoint to the user
        raise UsageError(f"{path}: not a loadable checkpoint of this program ({first_line(e)})") from None
    return net, config


def trial_data(config: TrainConfig, best: Best) -> ImageDataModule:
    """The trial's data, loaded: its test split and class names. A relative data_dir may be relative to where the
    sweep ran."""
    if config.dataset != "synthetic" and not Path(config.data_dir).is_absolute():
        found = next((base / config.data_dir for base in best.data_roots if (base / config.data_dir).is_dir()), None)
        if found is None:
            raise UsageError(f"{Path.cwd() / config.data_dir}: the trial's data is not there (its "
                             f"data_dir={config.data_dir!r}, relative to where the sweep ran)")
        config = config.model_copy(update={"data_dir": str(found)})
    data = ImageDataModule(config)
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


def export_model(net: nn.Module, config: TrainConfig, class_names, path: str, best: Best) -> None:
    """torch.export, loadable with torch alone: torch.export.load(path).module()(x)."""
    size = config.resolution
    module = Exported(net, config.tta).eval()
    with warnings.catch_warnings():  # tracing notices of timm's networks: not the user's to act on
        warnings.simplefilter("ignore")
        program = torch.export.export(module, (torch.rand(2, 3, size, size),),
                                      dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    extra = {"class_names.json": json.dumps(list(class_names)),
             "input.json": json.dumps({"shape": ["N", 3, size, size], "dtype": "float32",
                                       "values": "in [0, 1], or 0-255", "tta": config.tta}),
             "trial.json": json.dumps({"id": best.id, best.metric_name or "metric": best.metric, **best.objectives,
                                       "config": config.model_dump()})}
    try:
        torch.export.save(program, path, extra_files=extra)
    except (OSError, RuntimeError) as e:
        raise UsageError(f"{path}: cannot write ({first_line(e)})") from None


def best(target: str, evaluate: bool = False, export: str | None = None, trial_id: str | None = None,
         where: list[str] = ()) -> int:
    """`agent best TARGET`: the best trial (views/best.py), or the one --trial names, or the best that meets every
    --where; with several objectives, the Pareto front first. Its config as a command and its model's file;
    evaluated and exported if asked."""
    if export and not Path(export).parent.is_dir():
        raise UsageError(f"{export}: cannot write (no directory {Path(export).parent})")
    found = find_best(target, trial_id, where)
    for line in found.listing:
        print(line)
    print(found)
    return use(found, evaluate, export)


def use(best: Best, evaluate_it: bool = False, export: str | None = None) -> int:
    net, config = load(best.checkpoint)
    print(f"config: {run_command(config)}")
    print(f"checkpoint: {best.checkpoint}")
    if not (evaluate_it or export):
        return 0
    data = trial_data(config, best)
    if evaluate_it:
        test = data.test_set
        result = evaluate(net, test, test.labels, num_classes=len(data.classes), **inference(config))
        logged = "" if best.logged_test_acc is None else f" (logged by the trial: {best.logged_test_acc:.4f})"
        print(f"test_acc: {result['test_acc']:.4f}{logged} on {len(test)} images, {config.dataset} "
              f"{data.notes['data/test_split']} split" + ("" if config.dataset == "synthetic" else
                                                           f" of {config.data_dir}"))
        table = Table(box=None, header_style="bold")
        for column in ("class", "accuracy", "images"):
            table.add_column(column, justify="left" if column == "class" else "right")
        counts = torch.bincount(test.labels, minlength=len(data.classes)).tolist()
        for name, acc, n in zip(data.classes, result["per_class_acc"], counts):
            table.add_row(name, f"{acc:.4f}", str(n))
        Console().print(table)
    if export:
        export_model(net, config, data.classes, export, best)
        size = config.resolution
        print(f"exported: {export} (torch.export; torch.export.load(PATH).module()(x): x float N x 3 x {size} x "
              f"{size} in [0, 1] -> logits, test-time augmentation level {config.tta}; class names in its "
              "extra file class_names.json)")
    return 0
