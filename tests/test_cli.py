import subprocess
import sys

import pytest

from agent.__main__ import main
from agent.program.run import parse_flags
from agent.program.validate import validate
from tests.conftest import WARM, write_cifar
from tests.helpers import REPO, agent_command, exit_codes, fresh_env, leet_records


def test_parse_flags_takes_every_form_wandb_args_macros_produce():
    assert parse_flags(["--lr=0.001", "--optimizer", "sgd", "--nesterov", "--batch-size=64"]) == {
        "lr": "0.001", "optimizer": "sgd", "nesterov": "true", "batch_size": "64"}


@pytest.mark.parametrize("flag, expected", [("--lr=-1", "lr"), ("--no_such_key=1", "allowed: data_dir"),
                                            ("--batch_size=zero", "batch_size"), ("--optimizer=lion", "optimizer"),
                                            ("--lr_rate=0.1", "unknown key 'lr_rate'; did you mean 'lr'?")])
def test_bad_input_exits_2_with_one_line_naming_the_key(flag, expected, offline_env, tmp_path):
    out = subprocess.run(agent_command("run", flag), capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and expected in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "wandb").exists()  # refused before any run was started


def test_a_mismatched_torch_pair_is_said_by_the_first_command_with_a_fix_that_keeps_a_cpu_box_on_cpu(mocker, capsys):
    mocker.patch("agent.install._installed", {"torch": "2.14.1+cpu", "torchvision": "0.29.1"}.get)
    assert main(["run", "--dataset=synthetic"]) == 2  # it would load torchvision: refused before it fails on import
    [line] = capsys.readouterr().err.splitlines()
    assert line == ("agent run: torch 2.14.1+cpu and torchvision 0.29.1 do not match (one is a CPU build, the other a "
                    "CUDA one); fix: pip install --force-reinstall --no-deps torchvision==0.29.1+cpu --index-url "
                    "https://download.pytorch.org/whl/cpu")
    assert main(["validate", str(REPO / "sweeps" / "bayes.yaml")]) == 0  # needs no torch: said, not refused
    assert capsys.readouterr().err.startswith("agent validate: warning: torch 2.14.1+cpu and torchvision 0.29.1")


def test_shipped_sweeps_validate(capsys):
    files = sorted(str(p) for p in (REPO / "sweeps").glob("*.yaml"))
    assert len(files) >= 3 and validate(files) == 0
    assert capsys.readouterr().out.count(": ok") == len(files)


def test_run_help_lists_what_each_key_accepts_without_importing_torch():
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "agent", "run", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    lines = {line.split()[0]: line for line in out.stdout.splitlines() if line.startswith("  --")}
    assert "(adam | adamw | sgd | sgd_scaled)" in lines["--optimizer=adam"]
    assert "(true | false)" in lines["--augment=false"]
    assert "(float, lr > 0)" in lines["--lr=0.0002"]
    assert "(float, 0 <= dropout < 1)" in lines["--dropout=0.0"]
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines()}
    assert "typing" in imported and not {"torch", "lightning", "wandb"} & imported  # -X importtime answered


@pytest.mark.slow
@WARM
def test_corrupt_data_file_exits_2_naming_it_and_finishes_the_run(tmp_path, warm_worker):
    batch = write_cifar(tmp_path / "data") / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(batch.read_bytes()[:100])
    # Through a warm worker, as under `agent local` and `agent launch`: the client relays the trial's
    # stderr and exit code (a cold `agent run` reaches the same code in agent/program/run.py).
    out = subprocess.run(agent_command("run", f"--data_dir={tmp_path / 'data'}", "--max_epochs=1"),
                         capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         env=fresh_env(tmp_path, AGENT_WARM_SOCKET=warm_worker.socket))
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    # Lightning's Trainer prints its device lines first; ours is the one and last `agent run:` line.
    ours = [line for line in out.stderr.splitlines() if line.startswith("agent run:")]
    assert ours == [out.stderr.splitlines()[-1]] and ours[0].startswith(f"agent run: {batch}: "), out.stderr
    [run_dir] = (tmp_path / "wandb").glob("offline-run-*")
    assert exit_codes(leet_records(run_dir)) == [2]
