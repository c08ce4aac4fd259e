"""The networks, as plain nn.Modules: images in, logits out, no training logic.

`create_model(name)` is the one entry point: our three (seed_cnn, resnet9, airnet) or any of timm's
(`timm/<name>`), wrapped in a Network that knows its input: uint8 images or floats in [0, 1],
normalised with the mean and std its weights expect (timm's pretrained config; the seed's 0.5 for ours).
So training, the test pass and an exported model feed it the same thing.
"""

import difflib
from pathlib import Path

import torch
from torch import nn

from cifar_core.fetch import DatasetError, box_lock


class SeedCNN(nn.Module):
    """The seed tutorial's CNN: convs 32-32-64-64 (3x3, no padding), two max-pools, fc 512-128-10."""

    FIELDS = ("dropout",)  # the TrainConfig fields it reads (network_fields)

    def __init__(self, num_classes: int = 10, dropout: float = 0.0, image_size: int = 32):
        super().__init__()
        side = ((image_size - 4) // 2 - 4) // 2
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3), nn.ReLU(),
            nn.Conv2d(32, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3), nn.ReLU(),
            nn.Conv2d(64, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        )
        # 32 -> 30 -> 28 -> pool 14 -> 12 -> 10 -> pool 5: 64 x 5 x 5 features
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout), nn.Linear(64 * side * side, 512), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(512, 128), nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    @property
    def head(self) -> nn.Module:
        return self.classifier[-1]


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class Residual(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


class ResNet9(nn.Module):
    """The DAWNBench ResNet-9 (Page, 2018) behind cifar10-airbench: prep, three pooled stages
    (two with a residual pair), max-pool, a linear head scaled by 1/8. `width` 64 is the
    original (GPU); narrower trades accuracy per epoch for speed on a CPU."""

    FIELDS = ("width", "dropout")

    def __init__(self, num_classes: int = 10, width: int = 64, dropout: float = 0.0):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            conv_bn(3, w),
            conv_bn(w, 2 * w), nn.MaxPool2d(2), Residual(conv_bn(2 * w, 2 * w), conv_bn(2 * w, 2 * w)),
            conv_bn(2 * w, 4 * w), nn.MaxPool2d(2),
            conv_bn(4 * w, 8 * w), nn.MaxPool2d(2), Residual(conv_bn(8 * w, 8 * w), conv_bn(8 * w, 8 * w)),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(8 * w, num_classes, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The 1/8 output scale keeps early logits small, which lets one-cycle use a high peak lr.
        return self.head(self.features(x)) * 0.125


class FrozenScaleNorm(nn.BatchNorm2d):
    """Batch norm whose scale stays 1: only its bias (shift) is trained, with its own learning rate."""

    def __init__(self, channels: int, momentum: float):
        super().__init__(channels, eps=1e-12, momentum=momentum)
        self.weight.requires_grad = False


class ConvGroup(nn.Module):
    """conv 3x3 -> max-pool -> norm -> act -> conv 3x3 -> norm -> act; convs start as the identity on
    the channels they share with their input (so a deep net starts close to a shallow one)."""

    def __init__(self, c_in: int, c_out: int, activation: type[nn.Module], bn_momentum: float):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), \
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        for conv in (self.conv1, self.conv2):
            nn.init.dirac_(conv.weight.data[:conv.in_channels])
        self.pool, self.act = nn.MaxPool2d(2), activation()
        self.norm1, self.norm2 = FrozenScaleNorm(c_out, bn_momentum), FrozenScaleNorm(c_out, bn_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


class AirNet(nn.Module):
    """The network of the CIFAR-10 speed record (Jordan, "94% on CIFAR-10 in 3.29 Seconds on a Single
    GPU", 2024), written from the paper: a 2x2 whitening conv (its weights set from the training
    data's patch statistics by `init_whitening`, then frozen), three ConvGroups of widths
    (width, width * width_mult, width * width_mult), a global max-pool and a linear head scaled by
    1/9. The record's: width 64, width_mult 4, GELU; a CPU wants width 16 and ReLU."""

    # whiten and whiten_bias_epochs: read by system.py, which sets and trains the whitening layer
    FIELDS = ("width", "width_mult", "activation", "bn_momentum", "whiten", "whiten_bias_epochs")

    def __init__(self, num_classes: int = 10, width: int = 64, width_mult: int = 4, activation: str = "gelu",
                 bn_momentum: float = 0.4):
        super().__init__()
        act = {"gelu": nn.GELU, "relu": nn.ReLU}[activation]
        self.whiten = nn.Conv2d(3, 24, 2, bias=True)  # the 12 eigenvectors of 2x2x3 patches, and their negatives
        nn.init.zeros_(self.whiten.bias)
        self.act = act()
        widths = (width, width * width_mult, width * width_mult)
        self.groups = nn.Sequential(*(ConvGroup(c_in, c_out, act, bn_momentum)
                                      for c_in, c_out in zip((24, *widths[:-1]), widths)))
        self.head = nn.Linear(widths[-1], num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.groups(self.act(self.whiten(x)))
        return self.head(torch.amax(x, dim=(2, 3))) / 9


@torch.no_grad()
def init_whitening(conv: nn.Conv2d, images: torch.Tensor, eps: float = 5e-4) -> None:
    """Sets `conv` (3 -> 2k channels, kernel h x w) to whiten the patches of `images` (normalised
    float N x 3 x H x W): its filters are the eigenvectors V of the patches' (uncentred) covariance,
    scaled by 1/sqrt(eigenvalue + eps), and -V; then freezes them. A few thousand images suffice."""
    kh, kw = conv.kernel_size
    n, c, h, w = images.shape
    covariance = torch.zeros(c * kh * kw, c * kh * kw, dtype=torch.float64, device=images.device)
    for start in range(0, n, 100):  # chunks small enough for a CPU's cache
        x = images[start:start + 100].float()
        patches = torch.stack([x[:, :, dy:h - kh + 1 + dy, dx:w - kw + 1 + dx]
                               for dy in range(kh) for dx in range(kw)], 2)  # N x C x (dy dx) x H' x W'
        patches = patches.permute(1, 2, 0, 3, 4).reshape(c * kh * kw, -1)  # rows in the weight's (c, dy, dx) order
        covariance += (patches @ patches.T).double()
    values, vectors = torch.linalg.eigh(covariance / (n * (h - kh + 1) * (w - kw + 1)))
    filters = (vectors.T.flip(0) / torch.sqrt(values.flip(0) + eps)[:, None]).reshape(-1, c, kh, kw)
    conv.weight.copy_(torch.cat([filters, -filters]).to(conv.weight.dtype))
    conv.weight.requires_grad = False


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


OURS = {"seed_cnn": SeedCNN, "resnet9": ResNet9, "airnet": AirNet}
MODELS = tuple(OURS)
TIMM = "timm/"
TIMM_FIELDS = ("pretrained", "pretrained_path", "drop_path_rate", "dropout")  # dropout: timm's drop_rate
NETWORK_FIELDS = frozenset(TIMM_FIELDS).union(*(network.FIELDS for network in OURS.values()))
SEED_MEAN, SEED_STD = (0.5,) * 3, (0.5,) * 3  # the seed's Normalize((0.5,)*3, (0.5,)*3)


def network_fields(model: str) -> set[str]:
    """The TrainConfig fields network `model` reads: those of NETWORK_FIELDS it lacks do not apply to it."""
    return set(TIMM_FIELDS if model.startswith(TIMM) else OURS[model].FIELDS)


def timm_models() -> list[str]:
    import timm

    return timm.list_models()


def unknown_model(name: str) -> str | None:
    """Why `name` names no network, with the close ones; None when it names one."""
    if name in MODELS:
        return None
    if not name.startswith(TIMM):
        return f"unknown model {name!r}; expected one of {', '.join(MODELS)}, or timm/<name> (any of timm's)"
    known = timm_models()
    if name[len(TIMM):] in known:
        return None
    close = difflib.get_close_matches(name[len(TIMM):], known, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(TIMM + c) for c in close)}?" if close else \
        "`python -c \"import timm; print(timm.list_models('*resnet*'))\"` lists them"
    return f"not a timm model; {hint}"


def create_model(model: str, num_classes: int = 10, dropout: float = 0.0, width: int = 64, width_mult: int = 4,
                 activation: str = "gelu", bn_momentum: float = 0.4, image_size: int = 32,
                 drop_path_rate: float = 0.0, pretrained: bool = False, pretrained_path: str | None = None
                 ) -> Network:
    """The network named `model`. Its arguments but `pretrained*` are what a checkpoint stores to rebuild it
    (its weights then come from the checkpoint). timm's: pretrained weights from timm's hub cache, or from
    `pretrained_path` (a safetensors or state-dict file, loaded by timm with weights_only; refused unless it
    holds the network's weights, all but the classifier's), with the classifier made anew for `num_classes`;
    normalised with the weights' own mean and std."""
    if model == "seed_cnn":
        return Network(SeedCNN(num_classes, dropout, image_size), SEED_MEAN, SEED_STD)
    if model == "resnet9":
        return Network(ResNet9(num_classes, width, dropout), SEED_MEAN, SEED_STD)
    if model == "airnet":
        return Network(AirNet(num_classes, width, width_mult, activation, bn_momentum), SEED_MEAN, SEED_STD)
    if problem := unknown_model(model):
        raise ValueError(f"model={model!r}: {problem}")
    import timm

    name, options = model[len(TIMM):], {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
    if not (pretrained or pretrained_path):
        body, weights = timm.create_model(name, num_classes=num_classes, drop_rate=dropout, **options), SCRATCH
    elif pretrained_path:
        file = Path(pretrained_path).expanduser().absolute()
        try:
            body = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(file)},
                                     num_classes=num_classes, drop_rate=dropout, **options)
        except Exception as e:  # not a weights file, pickled code (weights_only), tensors of another shape
            check_pretrained(model, pretrained_path)  # names the tensors of another shape, where that is why
            raise cannot_load(model, pretrained_path, e) from None
        check_pretrained(model, pretrained_path, body)
        weights = f"file {file}"
    else:
        from huggingface_hub import constants

        try:
            body = from_hub(name, num_classes=num_classes, drop_rate=dropout, **options)
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


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]
