import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
from huggingface_hub import constants as hub_constants
from safetensors.torch import save_file

from cifar_core.config import TrainConfig
from cifar_core.fetch import DatasetError
from cifar_core.model import create_model
from cifar_core.train import build_system


@pytest.mark.parametrize("name, kwargs", [("seed_cnn", {}), ("resnet9", {"width": 8}), ("seed_cnn", {"image_size": 64}),
                                          ("timm/test_resnet", {}), ("timm/test_vit", {"image_size": 64})])
def test_models_map_uint8_or_float_images_to_logits_alike(name, kwargs):
    net = create_model(name, dropout=0.1, **kwargs).eval()
    size = kwargs.get("image_size", 32)
    images = torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8)
    assert torch.allclose(net(images), net(images.float() / 255), atol=1e-5) and net(images).shape == (4, 10)


def test_unknown_models_are_refused_with_the_close_ones():
    with pytest.raises(ValueError, match="unknown model 'vit'; expected one of seed_cnn, resnet9, airnet, or timm/"):
        create_model("vit")
    with pytest.raises(ValueError, match="not a timm model; did you mean 'timm/resnet18'"):
        create_model("timm/resnt18")


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


def pretrained_weights(path: Path, classes: int = 1000) -> dict:
    """Writes the weights of a test-sized timm network (as a hub download holds them) to `path`."""
    torch.manual_seed(0)
    weights = timm.create_model("test_efficientnet", num_classes=classes).state_dict()
    if path.suffix == ".safetensors":
        save_file(weights, path)
    else:
        torch.save(weights, path)
    return weights


@pytest.mark.parametrize("name", ["weights.safetensors", "weights.pth"])
def test_pretrained_path_loads_the_backbone_and_makes_a_new_head_for_the_data(tmp_path, name):
    weights = pretrained_weights(tmp_path / name)
    net = create_model("timm/test_efficientnet", num_classes=3, pretrained_path=str(tmp_path / name))
    state = net.body.state_dict()
    backbone = [k for k in weights if not k.startswith("classifier.")]
    assert backbone and all(torch.equal(state[k], weights[k]) for k in backbone)
    assert net.head.out_features == 3 and state["classifier.weight"].shape == (3, weights["classifier.weight"].shape[1])
    assert net.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])  # the weights' own normalisation


def test_a_pretrained_file_that_is_not_weights_is_one_line(tmp_path):
    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'PWNED'}",)

    torch.save({"conv_stem.weight": RunsCode()}, tmp_path / "evil.pth")
    with pytest.raises(DatasetError) as e:
        create_model("timm/test_efficientnet", num_classes=3, pretrained_path=str(tmp_path / "evil.pth"))
    assert str(e.value).startswith(f"pretrained_path='{tmp_path / 'evil.pth'}': not weights timm/test_efficientnet "
                                   "can load (") and "\n" not in str(e.value)
    assert not (tmp_path / "PWNED").exists()  # loaded weights-only: no pickled code ran


def test_backbone_lr_scale_and_a_frozen_backbone_reach_the_optimiser(tmp_path):
    system = build_system(TrainConfig(model="timm/test_resnet", optimizer="adamw", lr=1e-3, backbone_lr_scale=0.1,
                                      freeze_backbone_epochs=1), num_classes=3)
    system.trainer = SimpleNamespace(estimated_stepping_batches=10, current_epoch=0)
    backbone, head = system.configure_optimizers().param_groups
    assert (backbone["lr"], head["lr"]) == (pytest.approx(1e-4), 1e-3)
    assert [p.shape for p in head["params"]] == [p.shape for p in system.net.head.parameters()]
    for epoch, trains in ((0, False), (1, True)):
        system.trainer.current_epoch = epoch
        system.on_train_epoch_start()
        assert all(p.requires_grad == trains for p in backbone["params"])
        assert all(p.requires_grad for p in head["params"])


def test_pretrained_weights_come_from_the_hub_cache_with_no_network_and_its_absence_is_one_line(tmp_path,
                                                                                                 monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def no_network(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(DatasetError) as e:
        create_model("timm/test_efficientnet", num_classes=3, pretrained=True)
    assert str(e.value).startswith("model='timm/test_efficientnet' with pretrained=true: no weights in the hub cache")
    assert str(e.value).endswith("fix: --pretrained_path=FILE (weights downloaded where there is network), or run it "
                                 "once on a box with network")
    repo = tmp_path / "hub" / "models--timm--test_efficientnet.r160_in1k"  # as a download elsewhere leaves it
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    weights = pretrained_weights(repo / "snapshots" / ("0" * 40) / "model.safetensors")
    net = create_model("timm/test_efficientnet", num_classes=3, pretrained=True)
    assert torch.equal(net.body.state_dict()["conv_stem.weight"], weights["conv_stem.weight"])
