"""Stops and preemptions as W&B's own program-based agent delivers them to `python -m agent run`,
warm (through a warm worker, as `agent launch` sets up) and cold.

The agent is W&B's `wandb agent --forward-signals` with only its server calls replaced
(tests/programs/wandb_agent_offline.py): the test plays the server, handing out `run`, `stop`,
`resume` and `exit` commands. Each stop and notice lands while the run is held at one training batch
(tests.helpers.Hold), and the run says it has handled it before it is let go. What each run logged is read
back with W&B's own offline reader.
"""

import json
import signal
import sys

import pytest

from agent.controller.runlog import find_run_file
from tests.conftest import WARM
from tests.helpers import (
    AGENT,
    QUICK_VAL,
    model_artifacts,
    records_of,
    resume_artifact_names,
    run_dirs,
    run_record,
    start_wandb_agent,
    validated_epochs,
    wait_for,
)

pytestmark = pytest.mark.slow

BATCHES = 12  # a training epoch of ARGS
ARGS = {"dataset": {"value": "synthetic"}, "val_fraction": {"value": QUICK_VAL},
        "limit_train_batches": {"value": BATCHES}, "max_epochs": {"value": 4}, "early_stopping_patience": {"value": 10}}
PREEMPTED_EXIT = 128 + signal.SIGUSR1
IN_EPOCH_1 = BATCHES + 5  # the training batch each signal lands after: batch 5 of epoch 1


# `agent launch` as its CLI runs it, with each of its agents W&B's agent driven by the test.
LAUNCHER = """\
import sys
import yaml
import agent.online.launch
agent.online.launch.agent_command = lambda sweep_path, count: {agent!r} + [{control!r}, "--forward-signals", sweep_path]
# No W&B server here to ask for the sweep (tests/test_wandb_errors.py checks that part).
agent.online.launch.Launcher.sweep_on_wandb = lambda self: (
    "RUNNING", yaml.safe_load(open({control!r} + "/sweep.yaml")))
from agent.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def agent(tmp_path, warm_worker, hold_at):
    """W&B's agent, its runs going through a warm worker (as `agent launch` sets up one per agent), and the hold
    every run it starts inherits."""
    hold = hold_at("train_batch", IN_EPOCH_1)
    server, proc = start_wandb_agent(tmp_path, [*AGENT, "{control}", "--forward-signals", "ent/proj/sweep1"], ARGS,
                                     AGENT_WARM_SOCKET=warm_worker.socket, **hold.env)
    yield server, proc, hold
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@WARM
def test_stops_finish_runs_with_their_best_model_and_preemption_requeues_them(agent, tmp_path):
    server, proc, hold = agent

    # A stop in epoch 1: the run ends after that batch, finished, with its best model.
    server.run("stopped1")
    hold.wait(proc=proc)
    hold.deliver(lambda: server.send({"type": "stop", "run_id": "stopped1"}), signal.SIGTERM, proc=proc)
    wait_for(lambda: server.handed_out() and not server.running("stopped1"), "the agent to reap stopped1", proc=proc)
    records, code = run_record(tmp_path, "stopped1")
    assert code == 0
    assert not records_of(records, "preempting")
    assert validated_epochs(records) == [0]  # not the 4 it was given
    models = model_artifacts(records)
    assert models[-1]["name"] == "model-stopped1" and set(models[-1]["aliases"]) == {"best", "latest"}
    assert "test_acc" in json.loads(models[-1]["metadata"])  # the last one logged is the tested best

    # A preemption notice to the agent (forwarded): state saved, marked preempting, non-zero exit;
    # W&B's `resume` command for the same id continues from the saved batch.
    server.run("preempted1")
    hold.wait(proc=proc)
    hold.deliver(lambda: proc.send_signal(signal.SIGUSR1), signal.SIGUSR1, proc=proc)
    wait_for(lambda: not server.running("preempted1"), "the agent to reap preempted1", proc=proc)
    records, code = run_record(tmp_path, "preempted1")
    assert code == PREEMPTED_EXIT
    assert records_of(records, "preempting")
    assert resume_artifact_names(records) == ["resume-preempted1"]
    assert validated_epochs(records) == [0]
    hold.end()  # the resume, and the runs after it, inherit the agent's environment
    server.run("preempted1", kind="resume")
    wait_for(lambda: len(run_dirs(tmp_path, "preempted1")) == 2 and server.running("preempted1"),
             "the resumed run", proc=proc)
    wait_for(lambda: not server.running("preempted1"), "the resumed run to end", timeout=180, proc=proc)
    records, code = run_record(tmp_path, "preempted1")
    assert code == 0
    assert validated_epochs(records) == [1, 2, 3]  # the rest of epoch 1, then the others

    # A burst of stops, each right after its run started (as hyperband gives): every run finishes
    # and the agent, which quits after 3 failures in its first minute, stays up for the next.
    for run_id in ("burst1", "burst2"):
        server.run(run_id)
        wait_for(lambda run_id=run_id: find_run_file(tmp_path, run_id), f"{run_id}'s wandb.init", proc=proc)
        server.send({"type": "stop", "run_id": run_id})
        wait_for(lambda run_id=run_id: server.handed_out() and not server.running(run_id),
                 f"the agent to reap {run_id}", proc=proc)
        assert run_record(tmp_path, run_id)[1] == 0
    beats = len(server.heartbeats())
    wait_for(lambda: len(server.heartbeats()) > beats + 1, "the agent's next heartbeats", proc=proc)
    server.send({"type": "exit"})
    assert proc.wait(timeout=60) == 0
    counts = json.loads((server.control / "agent.json").read_text())
    assert counts == {"failed": 1, "finished": 5}  # the one failure is the preemption, as W&B needs it


def test_a_stop_through_the_agent_finishes_a_cold_run_too(tmp_path, hold_at):
    hold = hold_at("train_batch", IN_EPOCH_1)
    server, proc = start_wandb_agent(tmp_path, [*AGENT, "{control}", "--forward-signals", "ent/proj/sweep1"], ARGS,
                                     **hold.env)
    try:
        server.run("cold1")
        hold.wait(proc=proc)
        hold.deliver(lambda: server.send({"type": "stop", "run_id": "cold1"}), signal.SIGTERM, proc=proc)
        wait_for(lambda: server.handed_out() and not server.running("cold1"), "the agent to reap cold1", proc=proc)
        server.send({"type": "exit"})
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    records, code = run_record(tmp_path, "cold1")
    assert code == 0 and not records_of(records, "preempting")
    assert validated_epochs(records) == [0]
    assert json.loads((server.control / "agent.json").read_text()) == {"failed": 0, "finished": 1}


def test_launch_on_sigterm_preempts_its_runs_so_that_wandb_requeues_them(tmp_path, hold_at):
    wrapper = tmp_path / "launcher.py"
    wrapper.write_text(LAUNCHER.format(agent=AGENT, control=str(tmp_path / "control")))
    hold = hold_at("train_batch", IN_EPOCH_1)
    server, launcher = start_wandb_agent(tmp_path, [sys.executable, str(wrapper), "launch", "ent/proj/sweep1",
                                                    "--gpus", "0", "--stagger", "0"], ARGS, **hold.env)
    try:
        server.run("boxgone1")
        hold.wait(proc=launcher)
        # SLURM's --signal, a pod's deletion: the launcher sends its agents a notice, which they forward
        hold.deliver(lambda: launcher.send_signal(signal.SIGTERM), signal.SIGUSR1, proc=launcher)
        output = launcher.communicate(timeout=120)[0]
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 128 + signal.SIGTERM, output[-3000:]
    records, code = run_record(tmp_path, "boxgone1")
    assert code == PREEMPTED_EXIT and records_of(records, "preempting") and validated_epochs(records) == [0]
    assert resume_artifact_names(records) == ["resume-boxgone1"]
