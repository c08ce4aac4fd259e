import os
import socket
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
import yaml
from huggingface_hub import constants as hub_constants
from safetensors.torch import save_file

from cifar_core.config import TrainConfig
from cifar_core.fetch import DatasetError
from cifar_core.model import NETWORK_FIELDS, SCRATCH, create_model, network_fields
from cifar_core.system import ImageClassifier
from tests.helpers import agent_command, fresh_env


def make(model: str, num_classes: int = 10, **fields):
    """create_model of a config of `model` and `fields`."""
    return create_model(TrainConfig(model=model, **fields), num_classes)


FOLDER_64 = {"dataset": "imagefolder", "image_size": 64}


@pytest.mark.parametrize("name, kwargs", [("seed_cnn", {}), ("resnet9", {"width": 8}), ("seed_cnn", FOLDER_64),
                                          ("timm/test_resnet", {}), ("timm/test_vit", FOLDER_64)])
def test_models_map_uint8_or_float_images_to_logits_alike(name, kwargs):
    net = make(name, dropout=0.1, **kwargs).eval()
    size = kwargs.get("image_size", 32)
    images = torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8)
    assert torch.allclose(net(images), net(images.float() / 255), atol=1e-5) and net(images).shape == (4, 10)


def test_unknown_models_are_refused_with_the_close_ones():
    with pytest.raises(ValueError, match="unknown model 'vit'; expected one of seed_cnn, resnet9, airnet, or timm/"):
        make("vit")
    with pytest.raises(ValueError, match="not a timm model; did you mean 'timm/resnet18'"):
        make("timm/resnt18")


@pytest.mark.parametrize("schedule", ["onecycle", "warmup_cosine"])
def test_schedules_step_the_lr_over_the_run(schedule):
    system = ImageClassifier(TrainConfig(model="resnet9", width=4, optimizer="sgd", lr=0.1, schedule=schedule), 10)
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
    system = ImageClassifier(TrainConfig(model="resnet9", width=4, channels_last=True, label_smoothing=0.2), 10)
    conv = next(m for m in system.net.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert system(torch.randn(2, 3, 32, 32)).shape == (2, 10) and system.config.label_smoothing == 0.2
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
    net = make("timm/test_efficientnet", 3, pretrained_path=str(tmp_path / name))
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
        make("timm/test_efficientnet", 3, pretrained_path=str(tmp_path / "evil.pth"))
    assert str(e.value).startswith(f"pretrained_path='{tmp_path / 'evil.pth'}': not weights timm/test_efficientnet "
                                   "can load (") and "\n" not in str(e.value)
    assert not (tmp_path / "PWNED").exists()  # loaded weights-only: no pickled code ran


def test_backbone_lr_scale_and_a_frozen_backbone_reach_the_optimiser(tmp_path):
    system = ImageClassifier(TrainConfig(model="timm/test_resnet", optimizer="adamw", lr=1e-3, backbone_lr_scale=0.1,
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
        make("timm/test_efficientnet", 3, pretrained=True)
    assert str(e.value).startswith("model='timm/test_efficientnet' with pretrained=true: no weights in the hub cache")
    assert str(e.value).endswith("fix: --pretrained_path=FILE (weights downloaded where there is network), "
                                 "--pretrained=false (train from scratch), or run it once on a box with network")
    assert "`pretrained: {value: false}` in the sweep's parameters (train from scratch)" in e.value.in_sweep()
    repo = tmp_path / "hub" / "models--timm--test_efficientnet.r160_in1k"  # as a download elsewhere leaves it
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    weights = pretrained_weights(repo / "snapshots" / ("0" * 40) / "model.safetensors")
    net = make("timm/test_efficientnet", 3, pretrained=True)
    assert torch.equal(net.body.state_dict()["conv_stem.weight"], weights["conv_stem.weight"])
    assert net.weights == "hub timm/test_efficientnet.r160_in1k"


def test_a_network_records_the_weights_it_started_from_outside_its_state_dict(tmp_path):
    for net in make("resnet9", width=4), make("timm/test_resnet"):
        assert net.weights == SCRATCH == "none (trained from scratch)"
    pretrained_weights(tmp_path / "w.pth")
    net = make("timm/test_efficientnet", 3, pretrained_path=str(tmp_path / "w.pth"))
    assert net.weights == f"file {tmp_path / 'w.pth'}" and "weights" not in net.state_dict()


@pytest.mark.parametrize("network, stem, older", [
    ("test_efficientnet", "conv_stem.weight",  # no batch norm step counters: torch's load fills them in
     lambda net: {k: v for k, v in net.state_dict().items() if not k.endswith(".num_batches_tracked")}),
    ("test_coatnet", "stem.conv1.weight",  # buffers the network computes itself: timm's filters drop them
     lambda net: {**net.state_dict(), **dict(net.named_buffers())}),
])
def test_a_networks_own_weights_load_from_the_files_of_older_versions_too(tmp_path, network, stem, older):
    torch.manual_seed(0)
    weights = older(timm.create_model(network))
    save_file(weights, tmp_path / "w.safetensors")
    net = make(f"timm/{network}", 3, pretrained_path=str(tmp_path / "w.safetensors"))
    assert torch.equal(net.body.state_dict()[stem], weights[stem])


def save_weights(path: Path, network: str, leave_out: tuple[str, ...] = ()) -> Path:
    torch.manual_seed(0)
    save_file({k: v for k, v in timm.create_model(network).state_dict().items() if not k.startswith(leave_out)}, path)
    return path


@pytest.mark.parametrize("model, network, leave_out, expected", [
    ("timm/test_resnet", "test_resnet", ("layer4.",),
     "18 of its 90 missing (layer4.0.conv1.weight, layer4.0.bn1.weight, layer4.0.bn1.bias, ...)"),
    ("timm/test_vit", "test_vit2", (), "3 of its 78 missing (cls_token, norm.weight, norm.bias); 43 unexpected "
                                       "(blocks.0.ls1.gamma, blocks.0.ls2.gamma, blocks.1.ls1.gamma, ...)"),
    ("timm/test_convnext3", "test_convnext2", (),
     "3 of another shape (stages.1.blocks.0.conv_dw.weight, stages.2.blocks.0.conv_dw.weight, "
     "stages.3.blocks.0.conv_dw.weight)"),
])
def test_weights_of_another_network_are_refused_saying_what_differs(tmp_path, model, network, leave_out, expected):
    # timm alone loads the first two in part (strict=False once it drops the classifier), the rest left random
    path = save_weights(tmp_path / "w.safetensors", network, leave_out)
    with pytest.raises(DatasetError) as e:
        make(model, 3, pretrained_path=str(path))
    assert str(e.value) == (f"pretrained_path='{path}': not weights of {model} (expected each of its tensors but the "
                            f"classifier's, shaped alike, and no others): {expected}")


def test_agent_local_refuses_weights_of_another_network_before_any_trial(tmp_path):
    save_weights(tmp_path / "vit2.safetensors", "test_vit2")
    sweep = {"method": "grid", "command": ["${env}", "${interpreter}", "-m", "agent", "run", "${args}"],
             "parameters": {"dataset": {"value": "synthetic"}, "model": {"value": "timm/test_vit"},
                            "pretrained_path": {"value": "vit2.safetensors"}, "lr": {"values": [0.1, 0.01]}}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    out = subprocess.run(agent_command("local", "sweep.yaml"), cwd=tmp_path, env=fresh_env(tmp_path),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == "", out.stdout + out.stderr
    assert out.stderr.startswith("agent local: sweep.yaml: parameters.pretrained_path: 'vit2.safetensors': "
                                 "not weights of timm/test_vit (")
    assert out.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.yaml", "vit2.safetensors"]  # no sweep, no trial


def test_network_fields_name_what_each_network_reads():
    assert network_fields("seed_cnn") == {"dropout"} and network_fields("resnet9") == {"width", "dropout"}
    assert network_fields("airnet") == {"width", "width_mult", "activation", "bn_momentum", "whiten",
                                        "whiten_bias_epochs"}
    assert network_fields("timm/resnet18") == {"pretrained", "pretrained_path", "drop_path_rate", "dropout"}
    assert NETWORK_FIELDS <= set(TrainConfig.model_fields) and NETWORK_FIELDS - network_fields("resnet9") == {
        "width_mult", "activation", "bn_momentum", "whiten", "whiten_bias_epochs", "pretrained", "pretrained_path",
        "drop_path_rate"}
