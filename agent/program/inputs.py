"""A trial's inputs in place before any run exists, or one line saying what is wrong and what fixes it: the data
fetched or decoded once per box, pretrained weights downloaded once per box or checked. `agent local` prepares a
sweep's once, before its first trials."""

import itertools
from pathlib import Path

from agent.errors import UsageError
from agent.program.flags import make_config
from cifar_core.config import TrainConfig


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
                create_model(config, num_classes=1)  # any head: each trial makes its own for its data
    except DatasetError as e:
        raise UsageError(e.in_sweep() if in_sweep else str(e)) from None


# what decides the data a trial reads, and the weights it starts from
DATA_FIELDS = ("dataset", "data_dir", "image_size", "cache_dir", "model", "pretrained", "pretrained_path")


def prepare_sweep(sweep: dict) -> None:
    """The data of a sweep of our program, prepared once before its first trials (not by each at once), or
    one line saying what is wrong. Ranges are left to the trials (they share the same lock)."""
    from agent.program.validate import candidate_values

    if (sweep.get("scheduler") or {}).get("search_space"):
        return  # define-by-run: the user's function makes each config; its trials prepare their own data
    parameters = sweep.get("parameters") or {}
    choices = [candidate_values(parameters[name]) if name in parameters else [None] for name in DATA_FIELDS]
    for values in itertools.product(*choices):
        prepare_data(make_config({k: v for k, v in zip(DATA_FIELDS, values) if v is not None}), in_sweep=True)
