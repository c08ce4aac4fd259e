"""The GPU paths: bf16, channels_last, torch.compile, the data on the device, the speed record's recipe, and
a warm worker's trial on the GPU. Run where CUDA exists (`python -m pytest -m gpu`); skipped elsewhere."""

import subprocess

import lightning.pytorch as pl
import pytest
import torch
import wandb

from cifar_core.checkpoints import load_network
from cifar_core.config import TrainConfig
from tests.conftest import write_image_folder
from tests.helpers import agent_command, fresh_env
from tests.helpers import logged_run as train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

RECIPE = dict(dataset="synthetic", model="airnet", width=32, width_mult=4, optimizer="sgd_scaled", lr=11.5,
              weight_decay=0.0153, momentum=0.85, label_smoothing=0.2, batch_size=512, max_epochs=3,
              schedule="triangle", lookahead=True, flip="alternating", translate=2, tta=2)


class OnTheDevice(pl.Callback):
    """Records where the data and the network are once training starts."""

    def on_train_start(self, trainer, pl_module):
        self.data = trainer.datamodule.train_set.images.device
        self.net = next(pl_module.net.parameters()).device


@pytest.fixture
def in_tmp(offline_env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    wandb.teardown()


@pytest.mark.parametrize("precision, channels_last", [("bf16-mixed", True), ("16-mixed", False), ("32", True)])
def test_the_recipe_trains_on_the_gpu_with_its_data_there(in_tmp, precision, channels_last):
    where = OnTheDevice()
    result = train(TrainConfig(**RECIPE, precision=precision, channels_last=channels_last), callbacks=[where])
    assert where.data.type == "cuda" and where.net.type == "cuda"
    assert result["test_acc"] > 0.5  # synthetic classes are easy: chance is 0.1


def test_an_image_folder_lives_on_the_gpu_and_a_timm_network_trains_there(in_tmp):
    where = OnTheDevice()
    root = write_image_folder(in_tmp / "pets", {"train": 8, "val": 2})
    result = train(TrainConfig(dataset="imagefolder", data_dir=str(root), image_size=32, cache_dir=str(in_tmp / "c"),
                               model="timm/test_resnet", augment=True, batch_size=8, max_epochs=2,
                               precision="bf16-mixed"), callbacks=[where])
    assert where.data.type == "cuda" and where.net.type == "cuda" and result["steps"] == 6


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_trial_on_two_gpus_trains_half_the_steps_a_rank_and_tests_on_rank_0(in_tmp):
    config = dict(RECIPE, max_epochs=2, val_fraction=0.02)
    one, two = (train(TrainConfig(**config, devices=n)) for n in (1, 2))
    assert two["steps"] == -(-one["steps"] // 2) and two["test_acc"] > 0.5


def test_a_compiled_net_saves_the_names_an_uncompiled_one_loads(in_tmp):
    result = train(TrainConfig(dataset="synthetic", model="resnet9", width=16, max_epochs=1, compile=True,
                               precision="bf16-mixed", channels_last=True))
    net, _, _ = load_network(result["best_checkpoint"])  # no _orig_mod. prefixes: the compile was in place
    assert net(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_a_warm_workers_trial_uses_the_gpu(warm_worker, tmp_path):
    env = fresh_env(tmp_path, AGENT_WARM_SOCKET=warm_worker.socket, CUDA_VISIBLE_DEVICES="0")
    out = subprocess.run(agent_command("run", *(f"--{k}={v}" for k, v in RECIPE.items()), "--precision=bf16-mixed"),
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "GPU available: True (cuda), used: True" in out.stderr  # CUDA worked in a child forked from the worker
