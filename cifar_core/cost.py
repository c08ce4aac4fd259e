"""What a trained network costs to serve, measured as `best --export` serves it: in eval mode, float images of the
config's resolution, averaged over its test-time augmentation (evaluate.TTA), on the device it trained on.

  params            the network's parameters
  flops             floating-point operations per image, torch's own counter (FlopCounterMode: a multiply-add is 2)
  latency_ms        milliseconds per image at batch 1
  latency_ms_batch  milliseconds per image at the config's latency_batch
A latency is the median of timed calls after warm-up calls, as many as fit in BUDGET_S (at least MIN_CALLS), each
waited for on an accelerator: on a CPU, with the threads the trial was given.
"""

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cifar_core.config import TrainConfig
from cifar_core.evaluate import TTA

WARM_UP, MIN_CALLS, MAX_CALLS, BUDGET_S = 2, 3, 20, 0.5


@dataclass
class Cost:
    params: int
    flops: int
    latency_ms: float
    latency_ms_batch: float
    seconds: float  # what measuring took


def timed(model: nn.Module, images: torch.Tensor) -> float:
    """Seconds a call of `model` on `images` takes: the median of repeated calls after warm-up."""
    def call() -> float:
        began = time.perf_counter()
        model(images)
        if images.is_cuda:
            torch.cuda.synchronize(images.device)
        return time.perf_counter() - began

    for _ in range(WARM_UP):
        call()
    calls, deadline = [], time.perf_counter() + BUDGET_S
    while len(calls) < MIN_CALLS or (len(calls) < MAX_CALLS and time.perf_counter() < deadline):
        calls.append(call())
    return statistics.median(calls)


@torch.inference_mode()
def measure(net: nn.Module, config: TrainConfig) -> Cost:
    began = time.perf_counter()
    device = next(net.parameters()).device
    was_training = net.training
    model = TTA(net.eval(), config.tta)
    one = torch.rand(1, 3, config.resolution, config.resolution, device=device)
    with FlopCounterMode(display=False) as counter:
        model(one)
    batch = torch.rand(config.latency_batch, 3, config.resolution, config.resolution, device=device)
    cost = Cost(params=sum(p.numel() for p in net.parameters()), flops=counter.get_total_flops(),
                latency_ms=timed(model, one) * 1000, latency_ms_batch=timed(model, batch) * 1000 / len(batch),
                seconds=0.0)
    net.train(was_training)
    cost.seconds = time.perf_counter() - began
    return cost
