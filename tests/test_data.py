import os
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch

from cifar_core.augment import augment_batch, resized_crop_flip_batch
from cifar_core.cifar import read_batch
from cifar_core.config import TrainConfig
from cifar_core.data import ImageDataModule, TensorBatches
from cifar_core.fetch import ARCHIVES, DatasetError
from tests.conftest import CLASS_NAMES, write_cifar


def setup_dm(data_dir, **kwargs) -> ImageDataModule:
    dm = ImageDataModule(TrainConfig(data_dir=str(data_dir), **kwargs))
    dm.setup()
    return dm


def test_reads_python_batches_into_uint8_tensors_with_a_seeded_split(cifar_dir):
    dm = setup_dm(cifar_dir, val_fraction=0.1, batch_size=16)
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = ((s.images, s.labels) for s in
                                                            (dm.train_set, dm.val_set, dm.test_set))
    assert x_train.shape == (180, 3, 32, 32) and x_val.shape == (20, 3, 32, 32) and x_test.shape == (50, 3, 32, 32)
    assert x_train.dtype == torch.uint8 and y_train.dtype == torch.int64 and len(y_val) == 20 and len(y_test) == 50
    assert dm.classes == tuple(CLASS_NAMES)
    assert torch.equal(setup_dm(cifar_dir, seed=0).val_set.images, x_val)
    assert not torch.equal(setup_dm(cifar_dir, seed=1).val_set.images, x_val)


def test_batches_stay_uint8_with_their_places_in_the_split(cifar_dir):
    dm = setup_dm(cifar_dir, batch_size=16)
    images, labels, index = next(iter(dm.train_dataloader()))
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(dm.train_set[index], images) and torch.equal(dm.train_set.labels[index], labels)
    x, y = dm.on_after_batch_transfer((images, labels, index), 0)
    assert torch.equal(x, images) and torch.equal(y, labels)  # no augmentation asked; the network normalises
    assert sum(len(b[1]) for b in dm.val_dataloader()) == 20


def test_augment_crops_and_flips_each_image():
    x = torch.randint(1, 256, (64, 3, 32, 32), dtype=torch.uint8)
    flipped_or_not = augment_batch(x, pad=0)
    same = (flipped_or_not == x).flatten(1).all(1)
    mirrored = (flipped_or_not == x.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all() and same.any() and mirrored.any()
    cropped = augment_batch(x, pad=4)
    assert cropped.shape == x.shape and (cropped == 0).any()  # zero padding shows in shifted crops


def test_random_resized_crops_take_windows_of_each_image_resized_and_sometimes_mirrored():
    index = torch.arange(40, dtype=torch.uint8)  # channel 0 holds each pixel's row, channel 1 its column
    x = torch.stack([index[:, None].expand(40, 40), index[None, :].expand(40, 40), torch.zeros(40, 40).byte()])
    x = x.expand(64, 3, 40, 40).contiguous()
    whole = resized_crop_flip_batch(x, 40, 1.0, ratio=(1, 1))  # the whole image, at its own size
    same, mirrored = ((whole == x).flatten(1).all(1), (whole == x.flip(-1)).flatten(1).all(1))
    assert (same | mirrored).all() and same.any() and mirrored.any()
    crops = resized_crop_flip_batch(x, 16, 0.2)
    rows, cols = crops[:, 0].long(), crops[:, 1].long()
    assert crops.shape == (64, 3, 16, 16) and crops.dtype == torch.uint8
    assert (rows == rows[:, :, :1]).all() and (cols == cols[:, :1, :]).all()  # a window: rows by columns
    assert (rows.diff(dim=1) >= 0).all()
    steps = cols.diff(dim=2)
    assert ((steps >= 0).all(2).all(1) | (steps <= 0).all(2).all(1)).all()  # left to right, or mirrored
    area = (rows[:, -1, 0] - rows[:, 0, 0] + 1) * ((cols[:, 0, -1] - cols[:, 0, 0]).abs() + 1)
    assert (area >= 0.2 * 40 * 40 * 0.8).all() and (area < 40 * 40).any()  # about min_area or more, and cut


def test_synthetic_needs_no_files(tmp_path):
    dm = setup_dm(tmp_path / "nothing-here", dataset="synthetic")
    assert dm.train_set.images.shape == (4500, 3, 32, 32) and dm.test_set.images.dtype == torch.uint8
    assert not (tmp_path / "nothing-here").exists()


@pytest.mark.parametrize("damage, expected", [
    (lambda d: (d / "data_batch_3").unlink(), "data_batch_3: missing"),
    (lambda d: (d / "test_batch").write_bytes(b"not a pickle"), "test_batch: not a CIFAR-10 python-format batch"),
    (lambda d: (d / "data_batch_2").write_bytes(pickle.dumps({b"data": [1, 2], b"labels": [0]})),
     "data_batch_2: expected uint8 data of shape (N, 3072)"),
    (lambda d: (d / "data_batch_1").write_bytes(pickle.dumps([1, 2, 3])), "data_batch_1: expected a dict"),
    (lambda d: (d / "batches.meta").unlink(), "batches.meta: missing"),
    (lambda d: (d / "data_batch_4").write_bytes((d / "data_batch_4").read_bytes()[:5000]),
     "data_batch_4: not a CIFAR-10 python-format batch (UnpicklingError: pickle data was truncated)"),
    (lambda d: (d / "data_batch_5").write_bytes((d / "data_batch_5").read_bytes()[:-1]),
     "data_batch_5: not a CIFAR-10 python-format batch"),
])
def test_missing_or_malformed_files_name_the_file(tmp_path, damage, expected):
    root = write_cifar(tmp_path)
    damage(root / "cifar-10-batches-py")
    with pytest.raises(DatasetError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        setup_dm(root)


def test_prepare_data_fetches_only_when_the_batches_are_absent(tmp_path, cifar_dir, monkeypatch):
    # Unreachable, as on a box without network: any download attempt fails.
    unreachable = (tmp_path / "unreachable.tar.gz").as_uri()
    monkeypatch.setitem(ARCHIVES, "cifar10", replace(ARCHIVES["cifar10"], url=unreachable))
    ImageDataModule(TrainConfig(data_dir=str(cifar_dir))).prepare_data()
    ImageDataModule(TrainConfig(data_dir=str(tmp_path / "none"), dataset="synthetic")).prepare_data()
    assert not (tmp_path / "none").exists()
    with pytest.raises(DatasetError) as e:
        ImageDataModule(TrainConfig(data_dir=str(tmp_path / "empty"))).prepare_data()
    line = str(e.value)
    assert "\n" not in line and line.startswith(f"{tmp_path / 'empty' / 'cifar-10-batches-py'}: no CIFAR-10 data")
    assert "download failed: URLError" in line and "--dataset=synthetic" in line


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_batch_pickle_that_would_run_code_is_refused_with_one_line(tmp_path):
    root = write_cifar(tmp_path / "data")
    batch = root / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(pickle.dumps({b"labels": [0], b"data": RunsCode(tmp_path / "PWNED")}))
    with pytest.raises(DatasetError) as e:
        setup_dm(root)
    assert str(e.value) == (f"{batch}: refused to load: the pickle wants to run posix.system, and a CIFAR-10 "
                            f"batch holds only dicts, lists, bytes, str, ints and numpy arrays")
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_batches_written_at_any_pickle_protocol_load(tmp_path, protocol):
    # Protocols 0-2 (the official files' Python 2 era) name bytes and numpy through globals of their own.
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    batch = {b"batch_label": b"", b"labels": [3, np.int64(7)], b"data": data, b"filenames": [b"a.png", "b.png"]}
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=protocol))
    images, labels = read_batch(tmp_path / "data_batch_1")
    assert torch.equal(images, torch.from_numpy(data).reshape(2, 3, 32, 32)) and labels.tolist() == [3, 7]


def test_a_decoded_cache_beside_the_batches_loads_the_same_data_and_follows_changes(tmp_path):
    root = write_cifar(tmp_path)
    batches = root / "cifar-10-batches-py"
    first = setup_dm(root)
    assert (batches / "cifar10-uint8.npy").is_file()
    cached = setup_dm(root)
    for a, b in zip((first.train_set, first.test_set), (cached.train_set, cached.test_set)):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    write_cifar(tmp_path, seed=1)  # new batch files: the cache is stale and must be rebuilt
    stale = (batches / "cifar10-uint8.npy").stat().st_mtime - 10
    os.utime(batches / "cifar10-uint8.npy", (stale, stale))
    assert not torch.equal(setup_dm(root).test_set.images, first.test_set.images)


def test_each_epoch_shuffles_anew_and_a_resumed_epoch_continues_its_order(cifar_dir):
    dm = setup_dm(cifar_dir, batch_size=16)
    epoch = [0]
    loader = TensorBatches(dm.train_set, 16, shuffle=True, seed=dm.config.seed, position=lambda: (epoch[0], 0))
    first = [i for _, _, i in loader]
    assert len(loader) == len(first) == 12
    assert torch.equal(torch.cat(first).sort().values, torch.arange(180))  # every image once
    assert all(torch.equal(a, b) for a, b in zip(first, (i for _, _, i in loader)))  # an epoch's order is its own
    epoch[0] = 1
    assert not torch.equal(torch.cat(first), torch.cat([i for _, _, i in loader]))  # reshuffled
    resumed = TensorBatches(dm.train_set, 16, shuffle=True, seed=dm.config.seed, position=lambda: (0, 5))
    assert all(torch.equal(a, b) for a, b in zip([i for _, _, i in resumed], first[5:], strict=True))


def test_a_cache_cut_short_is_rebuilt_from_the_batches(tmp_path):
    root = write_cifar(tmp_path)
    cache = root / "cifar-10-batches-py" / "cifar10-uint8.npy"
    first, whole = setup_dm(root), cache.read_bytes()
    cache.write_bytes(whole[:-3073])  # newer than the batches, so it is taken as fresh
    again = setup_dm(root)
    assert torch.equal(again.test_set.images, first.test_set.images)
    assert torch.equal(again.train_set.labels, first.train_set.labels)
    assert cache.read_bytes() == whole


def test_worker_loaders_give_the_batches_the_in_process_ones_give(cifar_dir):
    in_process, workers = setup_dm(cifar_dir, batch_size=16), setup_dm(cifar_dir, batch_size=16, num_workers=1)
    for made in ("train_dataloader", "val_dataloader"):
        for a, b in zip(getattr(in_process, made)(), getattr(workers, made)(), strict=True):
            assert all(torch.equal(u, v) for u, v in zip(a, b))
    x, y, index = next(iter(workers.test_dataloader()))
    assert x.dtype == torch.uint8 and x.shape == (16, 3, 32, 32) and len(y) == 16
