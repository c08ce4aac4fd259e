import pickle

import pytest
import torch

from cifar_core.data import CIFAR10DataModule, DatasetError, augment_batch
from tests.conftest import CLASS_NAMES, write_cifar


def setup_dm(data_dir, **kwargs) -> CIFAR10DataModule:
    dm = CIFAR10DataModule(data_dir=str(data_dir), **kwargs)
    dm.setup()
    return dm


def test_reads_python_batches_into_uint8_tensors_with_a_seeded_split(cifar_dir):
    dm = setup_dm(cifar_dir, val_fraction=0.1, batch_size=16)
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = dm.train_set, dm.val_set, dm.test_set
    assert x_train.shape == (180, 3, 32, 32) and x_val.shape == (20, 3, 32, 32) and x_test.shape == (50, 3, 32, 32)
    assert x_train.dtype == torch.uint8 and y_train.dtype == torch.int64 and len(y_val) == 20 and len(y_test) == 50
    assert dm.classes == tuple(CLASS_NAMES)
    assert torch.equal(setup_dm(cifar_dir, seed=0).val_set[0], x_val)
    assert not torch.equal(setup_dm(cifar_dir, seed=1).val_set[0], x_val)


def test_batches_are_normalised_after_transfer(cifar_dir):
    dm = setup_dm(cifar_dir, batch_size=16)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.uint8
    x, y = dm.on_after_batch_transfer((images, labels), 0)
    assert x.dtype == torch.float32 and torch.equal(y, labels)
    assert torch.allclose(x, images.float() / 127.5 - 1) and x.min() >= -1 and x.max() <= 1
    assert sum(len(b[1]) for b in dm.val_dataloader()) == 20


def test_augment_crops_and_flips_each_image():
    x = torch.randint(1, 256, (64, 3, 32, 32), dtype=torch.uint8)
    flipped_or_not = augment_batch(x, pad=0)
    same = (flipped_or_not == x).flatten(1).all(1)
    mirrored = (flipped_or_not == x.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all() and same.any() and mirrored.any()
    cropped = augment_batch(x, pad=4)
    assert cropped.shape == x.shape and (cropped == 0).any()  # zero padding shows in shifted crops


def test_synthetic_needs_no_files(tmp_path):
    dm = setup_dm(tmp_path / "nothing-here", dataset="synthetic")
    assert dm.train_set[0].shape == (4500, 3, 32, 32) and dm.test_set[0].dtype == torch.uint8
    assert not (tmp_path / "nothing-here").exists()


@pytest.mark.parametrize("damage, expected", [
    (lambda d: (d / "data_batch_3").unlink(), "data_batch_3: missing"),
    (lambda d: (d / "test_batch").write_bytes(b"not a pickle"), "test_batch: not a CIFAR-10 python-format batch"),
    (lambda d: (d / "data_batch_2").write_bytes(pickle.dumps({b"data": [1, 2], b"labels": [0]})),
     "data_batch_2: expected uint8 data of shape (N, 3072)"),
    (lambda d: (d / "data_batch_1").write_bytes(pickle.dumps([1, 2, 3])), "data_batch_1: expected a dict"),
    (lambda d: (d / "batches.meta").unlink(), "batches.meta: missing"),
])
def test_missing_or_malformed_files_name_the_file(tmp_path, damage, expected):
    root = write_cifar(tmp_path)
    damage(root / "cifar-10-batches-py")
    with pytest.raises(DatasetError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        setup_dm(root)


def test_downloads_only_when_the_batches_are_absent(tmp_path, cifar_dir, mocker):
    download = mocker.patch("torchvision.datasets.utils.download_and_extract_archive")
    CIFAR10DataModule(data_dir=str(cifar_dir)).prepare_data()
    download.assert_not_called()
    CIFAR10DataModule(data_dir=str(tmp_path)).prepare_data()
    download.assert_called_once()
    assert download.call_args.kwargs["md5"] == "c58f30108f718f92721af3b95e74349a"


def test_a_decoded_cache_beside_the_batches_loads_the_same_data_and_follows_changes(tmp_path):
    root = write_cifar(tmp_path)
    batches = root / "cifar-10-batches-py"
    first = setup_dm(root)
    assert (batches / "cifar10-uint8.npy").is_file()
    cached = setup_dm(root)
    for a, b in zip((*first.train_set, *first.test_set), (*cached.train_set, *cached.test_set)):
        assert torch.equal(a, b)
    write_cifar(tmp_path, seed=1)  # new batch files: the cache is stale and must be rebuilt
    import os
    stale = (batches / "cifar10-uint8.npy").stat().st_mtime - 10
    os.utime(batches / "cifar10-uint8.npy", (stale, stale))
    assert not torch.equal(setup_dm(root).test_set[0], first.test_set[0])


def test_shuffled_batches_cover_every_image_once_per_epoch(cifar_dir):
    dm = setup_dm(cifar_dir, batch_size=16)
    loader = dm.train_dataloader()
    labels = torch.cat([y for _, y in loader])
    assert len(loader) == 12 and len(labels) == 180
    assert torch.equal(labels.sort().values, dm.train_set[1].sort().values)
    assert not torch.equal(torch.cat([x for x, _ in loader]), torch.cat([x for x, _ in loader]))  # reshuffled
