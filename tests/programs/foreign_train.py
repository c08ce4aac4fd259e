"""A plain W&B sweep program that is not ours: reads wandb.config.x, logs `loss`.

With FAIL_ABOVE set, raises ValueError when x exceeds it; with SLEEP set, pauses per step.
"""

import os
import time

import wandb

print("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES"))
run = wandb.init()
x = wandb.config.x
for step in range(3):
    time.sleep(float(os.environ.get("SLEEP", "0")))
    wandb.log({"loss": (x - 0.3) ** 2 + 1.0 / (step + 1)})
if "FAIL_ABOVE" in os.environ and x > float(os.environ["FAIL_ABOVE"]):
    raise ValueError(f"x={x:.3f} is above FAIL_ABOVE")
run.finish()
