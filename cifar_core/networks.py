"""Our networks, as plain nn.Modules (images in, logits out), and the registry that builds each from the
config: `BUILT_IN[name] = (build(config, num_classes), the config fields it reads)`. model.create_model
puts them, and timm's, behind one entry point.

A network may also have `prepare(training_images)` (before fit: set layers from the data), `at_epoch(epoch)`
(what learns in this epoch) and `freezes_parameters`; model.Network passes them on.
"""

from collections.abc import Callable

import torch
from torch import nn

WHITENING_IMAGES = 5000  # training images whose patch statistics set AirNet's first layer (0.1 s on a CPU)
SEED_MEAN, SEED_STD = (0.5,) * 3, (0.5,) * 3  # the seed's Normalize((0.5,)*3, (0.5,)*3), for each of ours
BUILT_IN: dict[str, tuple[Callable, tuple[str, ...]]] = {}


def built_in(name: str, fields: tuple[str, ...]):
    """Registers a builder of network `name`, which reads `fields` of the config (network_fields)."""
    def register(build: Callable) -> Callable:
        BUILT_IN[name] = (build, fields)
        return build
    return register


class SeedCNN(nn.Module):
    """The seed tutorial's CNN: convs 32-32-64-64 (3x3, no padding), two max-pools, fc 512-128-10."""

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

    def __init__(self, num_classes: int = 10, width: int = 64, width_mult: int = 4, activation: str = "gelu",
                 bn_momentum: float = 0.4, whiten: bool = True, whiten_bias_epochs: float = 3.0):
        super().__init__()
        act = {"gelu": nn.GELU, "relu": nn.ReLU}[activation]
        self.whiten = nn.Conv2d(3, 24, 2, bias=True)  # the 12 eigenvectors of 2x2x3 patches, and their negatives
        nn.init.zeros_(self.whiten.bias)
        self.sets_whitening, self.whiten_bias_epochs = whiten, whiten_bias_epochs
        # Trained for the first epochs only. Frozen from the start when never trained: a parameter that
        # requires a gradient it never gets would need DDP's search for unused ones at every step.
        self.whiten.bias.requires_grad_(whiten_bias_epochs > 0)
        self.act = act()
        widths = (width, width * width_mult, width * width_mult)
        self.groups = nn.Sequential(*(ConvGroup(c_in, c_out, act, bn_momentum)
                                      for c_in, c_out in zip((24, *widths[:-1]), widths)))
        self.head = nn.Linear(widths[-1], num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.groups(self.act(self.whiten(x)))
        return self.head(torch.amax(x, dim=(2, 3))) / 9

    def prepare(self, training_images) -> None:
        """Before fit (before a resumed run's checkpoint restores the layer it saved): the whitening layer
        from WHITENING_IMAGES training images, normalised; `training_images(n)` gives them."""
        if self.sets_whitening:
            init_whitening(self.whiten, training_images(WHITENING_IMAGES))

    def at_epoch(self, epoch: int) -> None:
        self.whiten.bias.requires_grad_(epoch < self.whiten_bias_epochs)

    @property
    def freezes_parameters(self) -> bool:
        """Whether a parameter stops learning during fit (DDP must then look for unused ones)."""
        return self.whiten_bias_epochs > 0


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


@built_in("seed_cnn", fields=("dropout",))
def seed_cnn(config, num_classes: int) -> nn.Module:
    return SeedCNN(num_classes, config.dropout, config.resolution)


@built_in("resnet9", fields=("width", "dropout"))
def resnet9(config, num_classes: int) -> nn.Module:
    return ResNet9(num_classes, config.width, config.dropout)


@built_in("airnet", fields=("width", "width_mult", "activation", "bn_momentum", "whiten", "whiten_bias_epochs"))
def airnet(config, num_classes: int) -> nn.Module:
    return AirNet(num_classes, config.width, config.width_mult, config.activation, config.bn_momentum, config.whiten,
                  config.whiten_bias_epochs)
