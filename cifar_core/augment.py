"""Training augmentations of whole batches on the device, no per-image Python, as gathers on uint8:
CIFAR's padded crop and flip, the speed record's translate and alternating flip, and a random-resized-crop
with flip for larger images. Their randomness is torch's generator of the batch's device, which
checkpoints save and restore."""

import math

import torch
from torch.nn import functional as F


def augment_batch(x: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, per image, as two gathers
    (rows, then columns; a flip is a reversed column index)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device)
    rows = (torch.arange(h, device=x.device) + dy).view(n, 1, h, 1).expand(n, c, h, w + 2 * pad)
    cols = torch.arange(w, device=x.device) + dx
    flip = torch.rand(n, 1, device=x.device) < 0.5
    cols = torch.where(flip, cols.flip(-1), cols).view(n, 1, 1, w).expand(n, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """Indices past either edge, mirrored back inside (the edge pixel itself not repeated)."""
    return (n - 1) - ((n - 1) - i.abs()).abs()


def translate_flip_batch(x: torch.Tensor, shift: int, flip: torch.Tensor | None) -> torch.Tensor:
    """Each image moved by up to `shift` pixels each way (reflect padding), then mirrored where `flip`
    (a bool per image) says: two gathers on uint8, as augment_batch, without a padded copy."""
    n, c, h, w = x.shape
    rows = torch.arange(h, device=x.device).expand(n, h)
    cols = torch.arange(w, device=x.device).expand(n, w)
    if shift:
        rows = _reflect(rows + torch.randint(-shift, shift + 1, (n, 1), device=x.device), h)
        cols = _reflect(cols + torch.randint(-shift, shift + 1, (n, 1), device=x.device), w)
    if flip is not None:
        cols = torch.where(flip.view(n, 1), cols.flip(-1), cols)
    return x.gather(2, rows.view(n, 1, h, 1).expand(n, c, h, w)).gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))


def resized_crop_flip_batch(x: torch.Tensor, size: int, min_area: float,
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """torchvision's RandomResizedCrop + RandomHorizontalFlip for a batch: per image, a crop of a random
    area fraction in [min_area, 1] and aspect ratio in `ratio` (log-uniform), at a random place, mirrored
    at random, resized to size x size. Resampled by nearest neighbour, on uint8 (uint8 out): the crops of a
    stored image scale by 0.6-1.7x, where bilinear sampling changes little, and it cost 4x as much on a CPU
    (a float copy of the batch, and grid_sample). Rows are picked by index_select (whole rows copied:
    3x faster than a gather), then columns by a gather."""
    n, c, h, w = x.shape
    area = torch.empty(n, device=x.device).uniform_(min_area, 1)
    aspect = torch.exp(torch.empty(n, device=x.device).uniform_(math.log(ratio[0]), math.log(ratio[1])))
    width, height = (area * aspect).sqrt().clamp(max=1), (area / aspect).sqrt().clamp(max=1)  # of the side
    # The crop's centre, so that the crop lies inside the image, in [-1, 1] coordinates.
    cx = (torch.rand(n, device=x.device) * 2 - 1) * (1 - width)
    cy = (torch.rand(n, device=x.device) * 2 - 1) * (1 - height)
    mirror = torch.where(torch.rand(n, device=x.device) < 0.5, -1.0, 1.0)
    centres = (torch.arange(size, device=x.device) * 2 + 1) / size - 1  # output pixel centres in [-1, 1]

    def pixels(centre: torch.Tensor, extent: torch.Tensor, length: int) -> torch.Tensor:
        position = ((centre[:, None] + extent[:, None] * centres + 1) * length - 1) / 2
        return position.round().clamp(0, length - 1).long()

    rows, cols = pixels(cy, height, h), pixels(cx, width * mirror, w)
    planes = torch.arange(n * c, device=x.device).view(n, c, 1) * h  # the first row of each image's channel
    x = x.reshape(n * c * h, w).index_select(0, (planes + rows[:, None, :]).view(-1)).view(n, c, size, w)
    return x.gather(3, cols.view(n, 1, 1, size).expand(n, c, size, size))


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The centre size x size of each image (a view)."""
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top:top + size, left:left + size]
