import pytest
import torch
from types import SimpleNamespace

from cifar_core.config import TrainConfig
from cifar_core.model import build_model
from cifar_core.train import build_system


@pytest.mark.parametrize("name, kwargs", [("seed_cnn", {}), ("resnet9", {"width": 8})])
def test_models_map_cifar_images_to_ten_logits(name, kwargs):
    net = build_model(name, dropout=0.1, **kwargs)
    assert net(torch.randn(4, 3, 32, 32)).shape == (4, 10)


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="allowed: seed_cnn, resnet9"):
        build_model("vit")


@pytest.mark.parametrize("schedule", ["onecycle", "warmup_cosine"])
def test_schedules_step_the_lr_over_the_run(schedule):
    system = build_system(TrainConfig(model="resnet9", width=4, optimizer="sgd", lr=0.1, schedule=schedule))
    system.trainer = SimpleNamespace(estimated_stepping_batches=40)  # what Lightning would report
    setup = system.configure_optimizers()
    optimizer, scheduler = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(40):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert max(lrs) == pytest.approx(0.1, rel=0.05) and lrs[-1] < 0.01 and lrs[0] < max(lrs)


def test_channels_last_and_label_smoothing_reach_the_system():
    system = build_system(TrainConfig(model="resnet9", width=4, channels_last=True, label_smoothing=0.2))
    conv = next(m for m in system.net.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert system(torch.randn(2, 3, 32, 32)).shape == (2, 10) and system.hparams.label_smoothing == 0.2
    assert TrainConfig(precision=32).precision == "32"
