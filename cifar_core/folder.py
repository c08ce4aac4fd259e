"""Image folders in torchvision's ImageFolder layout, decoded once per box into a memory-mapped uint8 cache.

DATA_DIR/train/<class>/<image> and, optionally, val/ and test/ laid out the same way. The classes are
train/'s folder names, sorted; hidden folders are not classes. Any size and mode (RGB, L, RGBA, P: made
RGB as torchvision's loader does), in JPEG, PNG, WebP, BMP, GIF or TIFF, upper-case extensions too.

Each image is decoded once, at `stored_size(image_size)`: its shorter side resized to that (bilinear,
JPEGs decoded at the smallest DCT scale still large enough), then its centre square. Evaluation takes the
centre image_size crop of that (resize 73 + crop 64, as torchvision's 256 + 224); training's
random-resized-crop samples the whole stored square.

The cache, CACHE_DIR/imagefolder-<key>/: `images.u8` (rows of 3 x S x S bytes, train then val then test),
`index.json` (classes, each split's rows and labels, what was skipped). The key is a hash of every image
file's path, size and mtime, S and this format's version: a changed folder gets a new cache. The first
process builds it under box_lock(CACHE_DIR), in a temporary folder renamed into place; the others wait
for it, then map it.

Bad data, decided for the user who wants the run to mean something:
- refused, one line naming the folder: no train/, no class folders, one class folder in train/ (nothing
  to tell apart), a class folder with no images, val/ or test/ with other classes than train/, a class
  none of whose images decode;
- skipped and counted (the run's summary says how many, index.json names them): image files that do
  not decode (corrupt, truncated);
- ignored and counted: files that are not images (README, .DS_Store, Thumbs.db) and files outside a
  class folder.
"""

import hashlib
import json
import multiprocessing
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cifar_core.fetch import DatasetError, box_lock

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CROP = 0.875  # the centre crop of evaluation: image_size is this fraction of the stored size
FORMAT = 1
PARALLEL_FROM = 512  # images: below this, one process decodes faster than a pool starts


def stored_size(image_size: int) -> int:
    return round(image_size / CROP)


@dataclass
class FolderImages:
    """A decoded folder: `images` (uint8 N x 3 x S x S, memory-mapped), each split's (start, stop) rows and
    labels, the classes, and what was left out."""
    images: np.ndarray
    splits: dict[str, tuple[int, int]]
    labels: np.ndarray
    classes: tuple[str, ...]
    skipped: list[str] = field(default_factory=list)  # "path: why", for files that did not decode
    ignored: int = 0  # files that are not images, or not in a class folder


def scan(root: Path) -> tuple[dict[str, list[tuple[str, int, str]]], tuple[str, ...], int]:
    """{split: [(image path relative to root, class index, "size mtime")]} of the splits present, the classes,
    and the count of ignored files. A trial scans its folder at every start (a changed folder means a new
    cache): one stat per file, and strings, not Paths (which cost 4x the stats on 10,000 files)."""
    if not (root / "train").is_dir():
        raise DatasetError(f"{root / 'train'}: missing; expected train/<class>/<image> (torchvision's "
                           "ImageFolder layout), and optionally val/ and test/ alike")
    found, classes, ignored = {}, None, 0
    for split in SPLITS:
        folder = root / split
        if not folder.is_dir():
            continue
        with os.scandir(folder) as entries:
            entries = sorted(entries, key=lambda e: e.name)
        ignored += sum(not e.is_dir() for e in entries)
        names = tuple(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
        if not names:
            raise DatasetError(f"{folder}: no class folders; expected {split}/<class>/<image>")
        if classes is None and len(names) < 2:
            raise DatasetError(f"{folder}: one class folder ({names[0]}); a classifier needs 2 or more: expected "
                               f"{split}/<class>/<image>, a folder per class")
        if classes is None:
            classes = names
        elif names != classes:
            missing, extra = sorted(set(classes) - set(names)), sorted(set(names) - set(classes))
            raise DatasetError(f"{folder}: its classes differ from train/'s (" + "; ".join(
                f"{what}: {', '.join(c)}" for what, c in (("missing", missing), ("extra", extra)) if c) + ")")
        found[split] = []
        for label, name in enumerate(names):
            images = []
            for directory, _, files in sorted(os.walk(folder / name)):
                relative = os.path.relpath(directory, root)
                for file in sorted(files):
                    if file.lower().endswith(IMAGE_SUFFIXES) and not file.startswith("."):
                        stat = os.stat(os.path.join(directory, file))
                        images.append((os.path.join(relative, file), label, f"{stat.st_size} {stat.st_mtime_ns}"))
                    else:
                        ignored += 1
            if not images:
                raise DatasetError(f"{folder / name}: no images; expected files ending in "
                                   f"{', '.join(IMAGE_SUFFIXES)} (any case)")
            found[split] += images
    return found, classes, ignored


def cache_key(found: dict[str, list[tuple[str, int, str]]], size: int) -> str:
    digest = hashlib.sha256(f"{FORMAT} {size}\n".encode())
    for split, files in found.items():
        for path, label, stat in files:
            digest.update(f"{split} {label} {path} {stat}\n".encode())
    return digest.hexdigest()[:20]


def decode(path: Path, size: int) -> bytes | str:
    """The image as S x S x 3 -> 3 x S x S bytes (its shorter side resized to S, the centre square), or why not."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.draft("RGB", (size, size))  # a JPEG decodes at 1/2, 1/4, 1/8 scale where that is still >= S
            image = image.convert("RGB")
            scale = size / min(image.size)
            width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
            image = image.resize((width, height), Image.BILINEAR)
            left, top = (width - size) // 2, (height - size) // 2
            return np.asarray(image.crop((left, top, left + size, top + size))).transpose(2, 0, 1).tobytes()
    except Exception as e:  # corrupt, truncated, not really an image: the file is skipped, and named
        return f"{type(e).__name__}: {e}"


def _decode_row(job: tuple[str, int]) -> bytes | str:
    return decode(Path(job[0]), job[1])


def load_folder(data_dir: str | os.PathLike, image_size: int, cache_dir: str | os.PathLike,
                processes: int | None = None) -> FolderImages:
    """The folder at DATA_DIR decoded for `image_size`: read from its cache, or built into it first."""
    root = Path(data_dir).absolute()
    found, classes, ignored = scan(root)
    size = stored_size(image_size)
    cache = Path(cache_dir).expanduser().absolute() / f"imagefolder-{cache_key(found, size)}"
    if not (cache / "index.json").is_file():
        try:
            with box_lock(cache.parent, cache.name):
                if not (cache / "index.json").is_file():
                    _build(cache, root, found, classes, ignored, size, processes)
        except OSError as e:
            raise DatasetError(f"{cache.parent}: cannot write the decoded images there ({e.strerror}); "
                               f"fix: set cache_dir to a writable folder") from None
    return _open(cache)


def _build(cache: Path, root: Path, found: dict, classes: tuple[str, ...], ignored: int, size: int,
           processes: int | None) -> None:
    jobs = [(os.path.join(root, path), size) for files in found.values() for path, _, _ in files]
    work = cache.with_name(cache.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)  # a killed build's leftovers: holding the lock, no one else is in it
    work.mkdir(parents=True)
    processes = processes if processes is not None else (os.cpu_count() or 1) if len(jobs) >= PARALLEL_FROM else 1
    try:
        _decode_into(work, root, found, classes, ignored, size, jobs, processes)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    shutil.rmtree(cache, ignore_errors=True)
    work.rename(cache)


def _decode_into(work: Path, root: Path, found: dict, classes: tuple[str, ...], ignored: int, size: int,
                 jobs: list, processes: int) -> None:
    kept, skipped, splits, labels = 0, [], {}, []
    with (work / "images.u8").open("wb") as out:
        # spawn: the pool's processes import only this module (a fork of a process running torch can hang)
        pool = multiprocessing.get_context("spawn").Pool(processes) if processes > 1 else None
        try:
            rows = pool.imap(_decode_row, jobs, chunksize=32) if pool else map(_decode_row, jobs)
            for split, files in found.items():
                start, counts = kept, [0] * len(classes)
                for (path, label, _), row in zip(files, rows):
                    if isinstance(row, str):
                        skipped.append(f"{path}: {row}")
                        continue
                    out.write(row)
                    labels.append(label)
                    counts[label] += 1
                    kept += 1
                if empty := [classes[c] for c, n in enumerate(counts) if n == 0]:
                    first = next(s for s in skipped if s.startswith(f"{split}/{empty[0]}/"))
                    raise DatasetError(f"{root / split / empty[0]}: none of its images could be read (first: {first})")
                splits[split] = (start, kept)
        finally:
            if pool:
                pool.terminate()
    np.save(work / "labels.npy", np.asarray(labels, dtype=np.int64))
    index = {"format": FORMAT, "size": size, "source": str(root), "classes": list(classes), "splits": splits,
             "skipped": skipped, "ignored": ignored}
    (work / "index.json").write_text(json.dumps(index, indent=1))


def _open(cache: Path) -> FolderImages:
    index = json.loads((cache / "index.json").read_text())
    size, labels = index["size"], np.load(cache / "labels.npy")
    # copy-on-write: the file is never written, and torch gets a writable array over it
    images = np.memmap(cache / "images.u8", np.uint8, "c", shape=(len(labels), 3, size, size)) if len(labels) \
        else np.zeros((0, 3, size, size), np.uint8)
    return FolderImages(images, {k: tuple(v) for k, v in index["splits"].items()}, labels, tuple(index["classes"]),
                        index["skipped"], index["ignored"])
