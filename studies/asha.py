"""Optuna studies that sweeps/*-asha.yaml name as their scheduler (`scheduler: {engine: optuna, source:
studies/asha.py, optimizer: tpe_asha}`). W&B's scheduler, or `agent local` offline, calls `tpe_asha(sweep)` with the
sweep's SweepInfo and asks the study it returns for trials; the study's pruner stops the trials that trail.

Here, not in sweeps/: that folder holds YAML only, so that `import sweeps` stays W&B's sweep engine. The YAMLs
name this file relative to the repository's root, the folder their commands run in (W&B resolves a relative
`source` against the folder `wandb sweep-scheduler` runs in).
"""

import optuna


def tpe_asha(sweep):
    """TPE over the sweep's parameters, and asynchronous successive halving (ASHA) as the pruner.

    A trial's val_acc is compared at 2, 4 and 8 epochs (min_resource 2, reduction_factor 2: W&B's `_step` of our
    program's rows is the number of epochs trained) with every trial that got there before it; outside the best
    half, it is stopped, and its slot goes to a new trial. So most of the budget goes to the trials that lead at
    each rung, the last rung's trials train longest. TPE's constant liar keeps two trials in flight from being
    handed the same region; multivariate TPE models lr and weight decay together.
    """
    return optuna.create_study(
        direction=sweep.config["metric"]["goal"],
        sampler=optuna.samplers.TPESampler(multivariate=True, constant_liar=True, n_startup_trials=4),
        pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=2, reduction_factor=2))
