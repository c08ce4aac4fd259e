"""The networks behind one entry point, `create_model(config, num_classes)`: ours (networks.BUILT_IN:
seed_cnn, resnet9, airnet) or any of timm's (`timm/<name>`, with its pretrained weights), wrapped in a
Network that knows its input: uint8 images or floats in [0, 1], normalised with the mean and std its
weights expect (timm's pretrained config; the seed's 0.5 for ours). So training, the test pass and an
exported model feed it the same thing. Plain nn.Modules: images in, logits out, no training logic.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from cifar_core.fetch import DatasetError, box_lock, first_line
from cifar_core.networks import BUILT_IN, SEED_MEAN, SEED_STD

if TYPE_CHECKING:  # the config validates model names here: model.py may not import it at run time
    from cifar_core.config import TrainConfig


SCRATCH = "none (trained from scratch)"


class Network(nn.Module):
    """A network and its input contract: uint8 images (0-255) or floats in [0, 1], N x 3 x H x W, normalised
    here with the mean and std its weights were trained with (buffers: they travel with the weights).
    `weights`: what its weights started from (`file PATH`, `hub ID`, or SCRATCH), for the run's record."""

    def __init__(self, body: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], weights: str = SCRATCH):
        super().__init__()
        self.body = body
        self.weights = weights  # a plain attribute: a checkpoint's state dict holds its weights, not their origin
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        # (x / 255 - mean) / std as one multiply (the one new tensor) and an in-place subtract
        scale = 1 / (self.std * 255) if x.dtype == torch.uint8 else 1 / self.std
        return (x * scale).sub_(self.mean / self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(x))

    @property
    def head(self) -> nn.Module:
        """The classifier layer (what fine-tuning trains at the full lr; a new one for the data's classes)."""
        return self.body.get_classifier() if hasattr(self.body, "get_classifier") else self.body.head

    # What a network of ours may ask of training (networks.py); timm's ask nothing.

    def prepare(self, training_images) -> None:
        """Before fit: `training_images(n)` gives n training images, normalised as the network sees them."""
        if hasattr(self.body, "prepare"):
            self.body.prepare(lambda n: self.normalize(training_images(n)))

    def at_epoch(self, epoch: int) -> None:
        if hasattr(self.body, "at_epoch"):
            self.body.at_epoch(epoch)

    @property
    def freezes_parameters(self) -> bool:
        return getattr(self.body, "freezes_parameters", False)


TIMM = "timm/"
TIMM_FIELDS = ("pretrained", "pretrained_path", "drop_path_rate", "dropout")  # dropout: timm's drop_rate
NETWORK_FIELDS = frozenset(TIMM_FIELDS).union(*(fields for _, fields in BUILT_IN.values()))


def network_fields(model: str) -> set[str]:
    """The TrainConfig fields network `model` reads: those of NETWORK_FIELDS it lacks do not apply to it."""
    return set(TIMM_FIELDS if model.startswith(TIMM) else BUILT_IN[model][1])


def timm_models() -> list[str]:
    import timm

    return timm.list_models()


def unknown_model(name: str) -> str | None:
    """Why `name` names no network, with the close ones; None when it names one."""
    if name in BUILT_IN:
        return None
    if not name.startswith(TIMM):
        return f"unknown model {name!r}; expected one of {', '.join(BUILT_IN)}, or timm/<name> (any of timm's)"
    known = timm_models()
    if name[len(TIMM):] in known:
        return None
    close = difflib.get_close_matches(name[len(TIMM):], known, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(TIMM + c) for c in close)}?" if close else \
        "`python -c \"import timm; print(timm.list_models('*resnet*'))\"` lists them"
    return f"not a timm model; {hint}"


def create_model(config: TrainConfig, num_classes: int, pretrained: bool = True) -> Network:
    """The network of `config` for `num_classes` classes. timm's start from pretrained weights if the config says
    so (and `pretrained`; a checkpoint's own weights follow otherwise): from timm's hub cache, or from
    `pretrained_path` (a safetensors or state-dict file, loaded by timm with weights_only; refused unless it
    holds the network's weights, all but the classifier's), with the classifier made anew for `num_classes`;
    normalised with the weights' own mean and std."""
    if config.model in BUILT_IN:
        build, _ = BUILT_IN[config.model]
        return Network(build(config, num_classes), SEED_MEAN, SEED_STD)
    if problem := unknown_model(config.model):
        raise ValueError(f"model={config.model!r}: {problem}")
    import timm

    model, name = config.model, config.model[len(TIMM):]
    options = {"num_classes": num_classes, "drop_rate": config.dropout}
    if config.drop_path_rate:
        options["drop_path_rate"] = config.drop_path_rate
    if not pretrained or not (config.pretrained or config.pretrained_path):
        body, weights = timm.create_model(name, **options), SCRATCH
    elif config.pretrained_path:
        path = config.pretrained_path
        file = Path(path).expanduser().absolute()
        try:
            body = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(file)}, **options)
        except Exception as e:  # not a weights file, pickled code (weights_only), tensors of another shape
            check_pretrained(model, path)  # names the tensors of another shape, where that is why
            raise cannot_load(model, path, e) from None
        check_pretrained(model, path, body)
        weights = f"file {file}"
    else:
        from huggingface_hub import constants

        try:
            body = from_hub(name, **options)
        except Exception as e:  # no network and not in the cache, or no weights published for it
            raise DatasetError(f"model={model!r} with pretrained=true: no weights in the hub cache "
                               f"({constants.HF_HUB_CACHE}) and none downloaded ({type(e).__name__}: {first_line(e)})",
                               "{0} (weights downloaded where there is network), {1} (train from scratch), or run "
                               "it once on a box with network", (("pretrained_path", "FILE"), ("pretrained", "false"))
                               ) from None
        hub_id = body.pretrained_cfg.get("hf_hub_id")
        weights = f"hub {hub_id}" if hub_id else f"url {body.pretrained_cfg['url']}"  # where timm downloads from
    return Network(body, tuple(body.pretrained_cfg["mean"]), tuple(body.pretrained_cfg["std"]), weights)


def check_pretrained(model: str, path: str, body: nn.Module | None = None) -> None:
    """Refuses the file `path` unless it holds the weights of timm's network `model` (`body`, else one made here):
    read by timm's own reader, as timm's load reads it (safetensors, or a torch state dict loaded weights_only)."""
    import timm
    from timm.models import load_state_dict

    try:
        state = load_state_dict(str(Path(path).expanduser()))
    except Exception as e:  # not a weights file, pickled code (weights_only)
        raise cannot_load(model, path, e) from None
    # timm loads a file with strict=False once it drops the classifier: another network's weights would load in
    # part, silently, leaving the rest random. So every tensor but the classifier's must come from the file.
    if mismatch := mismatched(body or timm.create_model(model[len(TIMM):]), state):
        raise DatasetError(f"pretrained_path={path!r}: not weights of {model} (expected each of its tensors but the "
                           f"classifier's, shaped alike, and no others): {mismatch}")


STEP_COUNTER = ".num_batches_tracked"


def mismatched(body: nn.Module, state: dict) -> str:
    """What keeps `state` from holding every tensor of timm's network `body` but its classifier's, with its shape,
    and nothing else but the classifier's: counts and a few names; '' when nothing does."""
    classifier = body.pretrained_cfg.get("classifier") or ()
    head = {f"{layer}.{kind}" for layer in ((classifier,) if isinstance(classifier, str) else classifier)
            for kind in ("weight", "bias")}  # what timm's load_pretrained drops to make the classifier anew
    shapes = {key: value.shape for key, value in body.state_dict().items() if key not in head}
    missing = [key for key in shapes if key not in state]
    if all(key.endswith(STEP_COUNTER) for key in missing):
        missing = []  # older files lack batch norm's step counters, not a weight: torch's load fills them in
    # older files hold buffers the network computes (swin's relative_position_index): timm's filters drop them
    buffers = {key for key, _ in body.named_buffers()}
    unexpected = [key for key in state if key not in shapes and key not in head and key not in buffers]
    reshaped = [key for key in shapes if key in state and getattr(state[key], "shape", None) != shapes[key]]
    return "; ".join(f"{len(keys)} {what} ({', '.join(few(keys))}{', ...' if len(keys) > 3 else ''})"
                     for what, keys in ((f"of its {len(shapes)} missing", missing), ("unexpected", unexpected),
                                        ("of another shape", reshaped)) if keys)


def few(keys: list[str]) -> list[str]:
    """Three of `keys` to name, weights before step counters (a safetensors file lists int64 tensors first)."""
    return sorted(keys, key=lambda key: key.endswith(STEP_COUNTER))[:3]


def cannot_load(model: str, path: str, error: Exception) -> DatasetError:
    return DatasetError(f"pretrained_path={path!r}: not weights {model} can load ({type(error).__name__}: "
                        f"{first_line(error)})")


HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm loads a hub model's weights from


def in_hub_cache(name: str) -> bool:
    """Whether timm's pretrained weights of network `name` (timm's name) are in this box's hub cache."""
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    hub_id = getattr(get_pretrained_cfg(name), "hf_hub_id", None)
    return bool(hub_id) and any(isinstance(try_to_load_from_cache(hub_id, f), str) for f in HUB_FILES)


def from_hub(name: str, **options) -> nn.Module:
    """timm's network with its pretrained weights, through timm's own loader: read from the hub cache with no
    request at all when they are there (the hub client would ask the server first, and retry for a minute
    with no network), else downloaded once per box under box_lock, if the hub can be reached at all."""
    import socket
    import urllib.parse

    import timm
    from huggingface_hub import constants

    with box_lock(Path(constants.HF_HUB_CACHE), f"timm-{name}"):
        if in_hub_cache(name):
            offline, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True  # read at each call
            try:
                return timm.create_model(name, pretrained=True, **options)
            finally:
                constants.HF_HUB_OFFLINE = offline
        endpoint = urllib.parse.urlsplit(constants.ENDPOINT)
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=5).close()
        return timm.create_model(name, pretrained=True, **options)
