import subprocess

import pytest
import yaml

from agent.run import parse_flags
from agent.validate import validate
from tests.helpers import REPO, agent_command


def test_parse_flags_takes_every_form_wandb_args_macros_produce():
    assert parse_flags(["--lr=0.001", "--optimizer", "sgd", "--nesterov", "--batch-size=64"]) == {
        "lr": "0.001", "optimizer": "sgd", "nesterov": "true", "batch_size": "64"}


@pytest.mark.parametrize("flag, key", [("--lr=-1", "lr"), ("--no_such_key=1", "no_such_key"),
                                       ("--batch_size=zero", "batch_size"), ("--optimizer=lion", "optimizer")])
def test_bad_input_exits_2_with_one_line_naming_the_key(flag, key, offline_env, tmp_path):
    out = subprocess.run(agent_command("run", flag), capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and key in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "wandb").exists()  # refused before any run was started


def test_shipped_sweeps_validate(capsys):
    files = sorted(str(p) for p in (REPO / "sweeps").glob("*.yaml"))
    assert len(files) >= 3 and validate(files) == 0
    assert capsys.readouterr().out.count(": ok") == len(files)


def write_sweep(tmp_path, **changes):
    sweep = yaml.safe_load((REPO / "sweeps" / "bayes.yaml").read_text())
    for key, value in changes.items():
        sweep[key] = value if value is not None else sweep.pop(key)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return str(path)


@pytest.mark.parametrize("changes, expected", [
    ({"parameters": {"learning_rate": {"values": [0.1]}}}, "parameters.learning_rate: not a config key"),
    ({"parameters": {"dropout": {"min": 0.0, "max": 1.0}}}, "parameters.dropout: dropout=1.0"),
    ({"parameters": {"optimizer": {"values": ["adam", "lion"]}}}, "parameters.optimizer: optimizer='lion'"),
    ({"parameters": {"batch_size": {"distribution": "int_uniform", "min": 0, "max": 64}}}, "batch_size=0"),
    ({"parameters": {"lr": {"distribution": "uniform", "min": 0.0, "max": 0.1}}}, "parameters.lr: lr=0.0"),
    ({"metric": {"name": "val_loss", "goal": "minimize"}}, "must equal the runs' monitor ('val_acc')"),
    ({"metric": {"name": "val_acc", "goal": "minimize"}}, "metric.goal='minimize': val_acc must be maximized"),
    ({"metric": {"name": "accuracy", "goal": "maximize"}}, "not a key the program logs"),
    ({"method": "bayesian"}, "bayesian"),
])
def test_validate_names_each_problem(tmp_path, capsys, changes, expected):
    code = validate([write_sweep(tmp_path, **changes)])
    out = capsys.readouterr().out
    assert code == 1 and expected in out, out


def test_monitor_and_metric_move_together(tmp_path, capsys):
    path = write_sweep(tmp_path, metric={"name": "val_loss", "goal": "minimize"},
                       parameters={"monitor": {"value": "val_loss"}})
    assert validate([path]) == 0, capsys.readouterr().out


def test_foreign_program_gets_only_the_wandb_schema_check(tmp_path, capsys):
    path = tmp_path / "foreign.yaml"
    path.write_text(yaml.safe_dump({"program": "train.py", "method": "random",
                                    "metric": {"name": "loss", "goal": "minimize"},
                                    "parameters": {"x": {"min": 0.0, "max": 1.0}}}))
    assert validate([str(path)]) == 0, capsys.readouterr().out


def test_unreadable_files_are_reported_not_raised(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [unclosed")
    assert validate([str(bad), str(tmp_path / "missing.yaml")]) == 1
    out = capsys.readouterr().out
    assert "bad.yaml: not valid YAML" in out and "missing.yaml: cannot read" in out
