"""A trial on two devices (Lightning's DDP on the CPU, gloo: two processes), as W&B's real agent and `agent local`
start it: one W&B run, one config on both ranks, stops and preemptions that reach both, a rank that dies."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from agent.controller.store import open_store
from cifar_core.config import TrainConfig
from cifar_core.ddp import digest
from tests.conftest import WARM
from tests.helpers import (
    AGENT,
    QUICK_VAL,
    agent_command,
    dead,
    fresh_env,
    history,
    leet_records,
    leet_summary,
    model_artifacts,
    records_of,
    run_dirs,
    run_record,
    signalled,
    start_wandb_agent,
    validated_epochs,
    wait_for,
)

pytestmark = pytest.mark.slow

TWO = {"dataset": {"value": "synthetic"}, "val_fraction": {"value": QUICK_VAL}, "limit_train_batches": {"value": 5},
       "max_epochs": {"value": 4}, "early_stopping_patience": {"value": 10}, "devices": {"value": 2}}
PREEMPTED_EXIT = 128 + signal.SIGUSR1
IN_EPOCH_1 = 5 + 2  # rank 0's training batch the signals land after: batch 2 of epoch 1


def ranks_said(output: str) -> list[tuple[int, str]]:
    """The config digests the ranks printed, in order: `rank R of 2: config D...`."""
    return [(int(r), d) for r, d in re.findall(r"^rank (\d) of 2: config (\w+)", output, re.M)]


def logged_config(run_dir: Path) -> TrainConfig:
    config = leet_summary(run_dir)["config"]
    return TrainConfig(**{k: v for k, v in config.items() if k in TrainConfig.model_fields})


@WARM
def test_under_wandbs_agent_one_run_one_config_and_a_preemption_reaches_both_ranks(tmp_path, warm_worker,
                                                                                   hold_at):
    # Rank 0 alone holds (ranks 1..N-1 run no hook): rank 1 waits for it in the next collective.
    hold = hold_at("train_batch", IN_EPOCH_1)
    server, agent = start_wandb_agent(tmp_path, [*AGENT, "{control}", "--forward-signals", "ent/proj/sweep1"], TWO,
                                      AGENT_WARM_SOCKET=warm_worker.socket, **hold.env)  # rank 0 from it, rank 1 cold
    try:
        # A preemption notice, forwarded to rank 0 alone: the ranks agree at the next batch, the state is
        # saved once, and the same id resumes it.
        server.run("ddppre", lr={"value": 3e-3})
        hold.wait(proc=agent, timeout=180)
        hold.deliver(lambda: agent.send_signal(signal.SIGUSR1), signal.SIGUSR1, proc=agent)
        wait_for(lambda: not server.running("ddppre"), "the agent to reap ddppre", proc=agent)
        hold.end()  # the resume inherits the agent's environment
        server.run("ddppre", kind="resume")
        wait_for(lambda: len(run_dirs(tmp_path, "ddppre")) == 2 and server.running("ddppre"), "the resume",
                 proc=agent)
        wait_for(lambda: not server.running("ddppre"), "the resumed run to end", timeout=180, proc=agent)
        server.send({"type": "exit"})
        output = agent.communicate(timeout=60)[0]
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode == 0, output[-3000:]
    # W&B's agent counts every run that ended as finished, and the preempted one as failed too, as it must.
    assert json.loads((server.control / "agent.json").read_text()) == {"failed": 1, "finished": 2}
    first, resumed = run_dirs(tmp_path, "ddppre")  # one W&B run an attempt, on rank 0
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 2
    config = logged_config(first)
    assert config.lr == 3e-3 and config.devices == 2
    assert sorted(ranks_said(output)[:2]) == [(0, digest(config)), (1, digest(config))]  # the sweep's, on both
    assert f"agent run: preempted after batch 2 of epoch 1, step {IN_EPOCH_1}; state saved" in output.splitlines()
    records, code = run_record(tmp_path, "ddppre", attempt=0)
    assert code == PREEMPTED_EXIT and records_of(records, "preempting") and validated_epochs(records) == [0]
    records, code = run_record(tmp_path, "ddppre")
    assert code == 0 and validated_epochs(records) == [1, 2, 3]


def rank_1_of(run_id: str) -> int | None:
    """The pid of rank 1 of trial `run_id` (it has the trial's environment), if it runs."""
    for proc in Path("/proc").iterdir():
        try:
            if b"cifar_core.ddp" in (proc / "cmdline").read_bytes() and \
                    f"WANDB_RUN_ID={run_id}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                return int(proc.name)
        except (OSError, ValueError):
            continue
    return None


def test_under_agent_local_a_rank_that_dies_fails_its_trial_at_once_and_a_stop_to_rank_0_ends_both(tmp_path,
                                                                                                      hold_at):
    sweep = {"method": "grid", "metric": {"name": "val_acc", "goal": "maximize"},
             "parameters": {**TWO, "lr": {"values": [1e-3, 3e-3]}},
             "command": ["${env}", "${interpreter}", "-m", "agent", "run", "${args}"]}
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(sweep))
    # Each trial in turn holds there (both inherit the controller's environment).
    hold = hold_at("train_batch", IN_EPOCH_1)
    # --cold: the trial is rank 0 itself (its pid in the store), and rank 1 starts cold whatever rank 0 does
    controller = signalled(agent_command("local", "ddp.yaml", "--dir", "D", "--cold"), cwd=tmp_path,
                           env=fresh_env(tmp_path, **hold.env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    try:
        hold.wait(proc=controller, timeout=300)
        [first] = open_store(tmp_path / "D").trials()
        rank_1 = rank_1_of(first.id)
        os.kill(rank_1, signal.SIGKILL)
        killed = time.time()
        wait_for(lambda: dead(rank_1), f"{first.id}'s rank 1 to die", proc=controller)
        hold.release()  # rank 0's next collective finds rank 1 gone
        hold.wait(proc=controller, timeout=180)
        second = open_store(tmp_path / "D").trials()[1]
        assert second.id != first.id
        hold.deliver(lambda: os.kill(second.pid, signal.SIGTERM), signal.SIGTERM, proc=controller)  # as W&B's agent
        out = controller.communicate(timeout=300)[0]
    finally:
        if controller.poll() is None:
            controller.kill()
    assert controller.returncode == 0, out[-3000:]
    failed, stopped = open_store(tmp_path / "D").trials()
    assert (failed.state, failed.reason) == ("failed", "exit code 1: agent run: rank 1 of 2 died (killed by SIGKILL); "
                                                       "the trial ends")
    assert failed.ended - killed < 15  # within seconds, not a wait in an all-reduce
    assert (stopped.state, stopped.exit_code) == ("finished", 0) and len(stopped.history) == 1  # epoch 0's
    [run_dir] = run_dirs(tmp_path / "D", stopped.id)
    log = (tmp_path / "D" / "logs" / f"{stopped.id}.log").read_text()
    assert sorted(ranks_said(log)) == [(0, digest(logged_config(run_dir))), (1, digest(logged_config(run_dir)))]
    records = leet_records(run_dir)
    assert validated_epochs(records) == [0]
    assert [h["trainer/global_step"] for h in history(records) if "test_acc" in h] == [IN_EPOCH_1]
    models = model_artifacts(records)
    epochs = [json.loads(m["metadata"])["epoch"] for m in models]
    assert epochs == [0, 0] and "test_acc" in json.loads(models[-1]["metadata"])  # epoch 0's, then tested
