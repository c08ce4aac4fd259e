"""Optuna studies of sweeps that trade accuracy against what a model costs (`metrics:`, two or more objectives:
sweeps/pareto.yaml, sweeps/cpu-pareto.yaml), named as their scheduler (`optimizer: tpe_pareto`).

Multi-objective TPE: it models the configs that land near the Pareto front of the trials so far and draws more like
them; with a few dozen trials it reaches a front sooner than NSGA-II's generations. No pruner: Optuna's pruners rank
a single value, so W&B's optimizer prunes nothing in a study of several objectives (every trial trains to its end).
"""

import optuna


def tpe_pareto(sweep):
    # a sweep's `metric:` takes the same sampler (bench/pareto.py's single-objective twin)
    objectives = sweep.config.get("metrics") or [sweep.config["metric"]]
    return optuna.create_study(
        directions=[metric["goal"] for metric in objectives],
        sampler=optuna.samplers.TPESampler(multivariate=True, constant_liar=True, n_startup_trials=6),
        pruner=optuna.pruners.NopPruner())  # create_study's default, MedianPruner, would prune a `metric:` twin
