"""The speed record's techniques, each on its own, then all of them in one short trial."""

import json
from types import SimpleNamespace

import pytest
import torch
import wandb
from torch import nn

from cifar_core.augment import translate_flip_batch
from cifar_core.checkpoints import load_network
from cifar_core.config import TrainConfig
from cifar_core.data import ImageDataModule
from cifar_core.evaluate import TTA, evaluate, inference
from cifar_core.model import create_model
from cifar_core.networks import WHITENING_IMAGES, init_whitening
from cifar_core.system import Lookahead, triangle
from tests.helpers import leet_records, logged_run, model_artifacts, run_dir_of

AIRNET_8 = TrainConfig(model="airnet", width=8)

# The CPU preset's techniques on tiny synthetic data (bench/speed.py CPU_PRESET holds the real one).
RECIPE = dict(dataset="synthetic", model="airnet", width=8, width_mult=2, activation="relu", optimizer="sgd_scaled",
              lr=20.0, weight_decay=0.0153, momentum=0.85, label_smoothing=0.2, batch_size=128, max_epochs=2,
              limit_train_batches=6, schedule="triangle", lookahead=True, flip="alternating", translate=2, tta=2,
              channels_last=True)


def test_whitening_makes_the_patches_uncorrelated_with_unit_variance():
    torch.manual_seed(0)
    mixing = torch.randn(3, 3)  # correlated channels: whitening must undo the mixing
    images = torch.einsum("ij,njhw->nihw", mixing, torch.randn(400, 3, 16, 16))
    net = create_model(AIRNET_8, 10).body
    init_whitening(net.whiten, images, eps=0.0)
    with torch.no_grad():
        out = nn.functional.conv2d(images, net.whiten.weight[:12])  # the +V half; the other half is -V
    flat = out.permute(1, 0, 2, 3).reshape(12, -1)
    assert torch.allclose(flat @ flat.T / flat.shape[1], torch.eye(12), atol=1e-3)
    assert not net.whiten.weight.requires_grad and net.whiten.bias.requires_grad


def test_translate_and_flip_move_pixels_as_reflect_padding_and_mirroring_do():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.uint8).view(2, 3, 8, 8)
    flip = torch.tensor([True, False])
    assert torch.equal(translate_flip_batch(x, 0, flip), torch.stack([x[0].flip(-1), x[1]]))
    torch.manual_seed(3)
    moved = translate_flip_batch(x, 2, None)
    padded = nn.functional.pad(x.float(), [2, 2, 2, 2], mode="reflect")
    windows = [padded[i, :, dy:dy + 8, dx:dx + 8] for i in range(2) for dy in range(5) for dx in range(5)]
    for i in range(2):  # each image is one of the 25 reflect-padded windows of itself
        assert any(torch.equal(moved[i].float(), w) for w in windows[25 * i:25 * i + 25])


def test_alternating_flips_show_every_image_both_ways_in_two_epochs():
    dm = ImageDataModule(TrainConfig(dataset="synthetic", batch_size=64, flip="alternating"))
    dm.setup()
    images, labels, index = next(iter(dm.train_dataloader()))
    seen = []
    for epoch in (0, 1, 2):
        dm.trainer = SimpleNamespace(training=True, current_epoch=epoch)
        seen.append(dm.on_after_batch_transfer((images, labels, index), 0)[0])
    flipped = [(s == images.flip(-1)).flatten(1).all(1) for s in seen]
    assert torch.equal(flipped[0], ~flipped[1]) and torch.equal(flipped[0], flipped[2])
    assert 0 < flipped[0].sum() < len(index)


def test_lookahead_ends_on_the_average_and_the_schedule_is_the_records():
    net = nn.Linear(3, 2)
    lookahead = Lookahead()
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    lookahead.step(net, 5, 10)  # early: the average mostly follows the weights
    assert torch.allclose(net.weight, lookahead.average["weight"]) and not torch.allclose(net.weight, start)
    with torch.no_grad():
        net.weight.add_(1.0)
    lookahead.step(net, 10, 10)  # the last step: the weights become the average, whatever they were
    assert torch.equal(net.weight, lookahead.average["weight"])
    assert [round(triangle(s, 100), 3) for s in (0, 23, 100)] == [0.2, 1.0, 0.07]


def test_tta_exports_to_the_same_logits_and_level_1_is_the_mirror_mean():
    torch.manual_seed(0)
    net = create_model(AIRNET_8, 10).eval()
    x = torch.rand(4, 3, 32, 32)
    for level in (0, 1, 2):
        eager = TTA(net, level)(x)
        exported = torch.export.export(TTA(net, level).eval(), (x,)).module()
        assert torch.allclose(exported(x), eager, atol=1e-5)
    assert torch.allclose(TTA(net, 1)(x), 0.5 * (net(x) + net(x.flip(-1))))


@pytest.fixture
def recipe_run(offline_env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = TrainConfig(**RECIPE)
    result = logged_run(config)
    wandb.teardown()
    return config, result


@pytest.mark.slow
def test_the_recipe_trains_in_a_normal_trial_and_its_best_model_scores_as_logged(recipe_run):
    config, result = recipe_run
    net, saved_config, saved = load_network(result["best_checkpoint"])
    assert saved_config == config  # the checkpoint rebuilds its own network
    dm = ImageDataModule(config)
    dm.setup()
    rescored = evaluate(net, dm.test_set, dm.test_set.labels, **inference(config))  # its own test pass, TTA too
    assert rescored["test_acc"] == pytest.approx(result["test_acc"], abs=1e-6)
    assert saved["epoch"] == result["best_epoch"]
    whitening = create_model(config, 10)  # trained, the layer must still be what the data set it to
    init_whitening(whitening.body.whiten, whitening.normalize(dm.train_set[:WHITENING_IMAGES]))
    assert torch.equal(net.body.whiten.weight, whitening.body.whiten.weight)
    final = model_artifacts(leet_records(run_dir_of(result)))[-1]
    assert json.loads(final["metadata"])["config"]["tta"] == 2
