"""The networks, as plain nn.Modules: logits out, no training logic."""

import torch
from torch import nn


class SeedCNN(nn.Module):
    """The seed tutorial's CNN: convs 32-32-64-64 (3x3, no padding), two max-pools, fc 512-128-10."""

    def __init__(self, num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3), nn.ReLU(),
            nn.Conv2d(32, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3), nn.ReLU(),
            nn.Conv2d(64, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        )
        # 32 -> 30 -> 28 -> pool 14 -> 12 -> 10 -> pool 5: 64 x 5 x 5 features
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout), nn.Linear(64 * 5 * 5, 512), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(512, 128), nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


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


MODELS = ("seed_cnn", "resnet9", "airnet")


def build_model(model: str, num_classes: int = 10, dropout: float = 0.0, width: int = 64, width_mult: int = 4,
                activation: str = "gelu", bn_momentum: float = 0.4) -> nn.Module:
    """The network named `model`; its arguments are what a checkpoint stores to rebuild it."""
    if model == "seed_cnn":
        return SeedCNN(num_classes, dropout)
    if model == "resnet9":
        return ResNet9(num_classes, width, dropout)
    if model == "airnet":
        return AirNet(num_classes, width, width_mult, activation, bn_momentum)
    raise ValueError(f"model: unknown {model!r}; allowed: {', '.join(MODELS)}")
