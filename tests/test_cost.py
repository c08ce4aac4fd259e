"""What a trial measures of its best model (cifar_core/cost.py): parameters, FLOPs per image, latency."""

import pytest
import torch

from cifar_core.config import TrainConfig
from cifar_core.cost import measure
from cifar_core.model import create_model


@pytest.mark.parametrize("model", ["resnet9", "timm/test_resnet"])
def test_costs_count_the_networks_parameters_and_flops_grow_with_the_image_area(model):
    sizes = {size: TrainConfig(model=model, dataset="imagefolder", image_size=size, width=8, latency_batch=4)
             for size in (32, 64)}
    torch.manual_seed(0)
    net = create_model(sizes[32], 3)
    small, large = (measure(net, config) for config in sizes.values())
    assert small.params == large.params == sum(p.numel() for p in net.parameters())
    assert large.flops / small.flops == pytest.approx(4, rel=0.15)  # a convolution's work scales with the pixels
    assert 0 < small.latency_ms and 0 < small.latency_ms_batch


def test_test_time_augmentation_is_part_of_what_is_served():
    config = TrainConfig(model="resnet9", width=8, latency_batch=2)
    net = create_model(config, 10)
    plain, mirrored, shifted = (measure(net, config.model_copy(update={"tta": level})).flops for level in (0, 1, 2))
    assert (mirrored / plain, shifted / plain) == (pytest.approx(2, rel=0.01), pytest.approx(6, rel=0.01))
