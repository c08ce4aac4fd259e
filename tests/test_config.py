import pytest
from pydantic import ValidationError

from cifar_core.config import TrainConfig


def test_defaults_are_the_seed_tutorials():
    c = TrainConfig()
    assert (c.optimizer, c.lr, c.batch_size, c.max_epochs) == ("adam", 2e-4, 32, 2)
    assert (c.model, c.dataset, c.monitor, c.monitor_mode) == ("seed_cnn", "cifar10", "val_acc", "max")
    assert round(50_000 * c.val_fraction) == 5_000


@pytest.mark.parametrize("bad", [
    {"lr": 0}, {"lr": -1}, {"batch_size": 0}, {"dropout": 1.0}, {"dropout": -0.1},
    {"optimizer": "lion"}, {"dataset": "mnist"}, {"monitor": "test_acc"}, {"max_epochs": 0},
    {"val_fraction": 1.0}, {"limit_train_batches": 0}, {"no_such_key": 1},
])
def test_rejects_out_of_range_and_unknown_keys(bad):
    with pytest.raises(ValidationError) as e:
        TrainConfig(**bad)
    assert e.value.errors()[0]["loc"] == (next(iter(bad)),)


def test_flag_strings_coerce_like_the_cli_passes_them():
    c = TrainConfig(lr="1e-05", batch_size="64", nesterov="True", limit_train_batches="30")
    assert (c.lr, c.batch_size, c.nesterov, c.train_batches) == (1e-5, 64, True, 30)
    assert TrainConfig(limit_train_batches="0.25").train_batches == 0.25


def test_limit_train_batches_one_means_the_whole_epoch_as_int_or_float():
    # W&B's config round trip turns 1.0 into 1: both must mean the full epoch, not one batch.
    assert TrainConfig(limit_train_batches=1).train_batches == TrainConfig().train_batches == 1.0
    with pytest.raises(ValidationError, match="whole number of batches"):
        TrainConfig(limit_train_batches=2.5)
    assert TrainConfig(monitor="val_loss").monitor_mode == "min"
