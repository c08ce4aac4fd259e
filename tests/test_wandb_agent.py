"""Stops and preemptions as W&B's own program-based agent delivers them to `python -m agent run`,
warm (through a warm worker, as `agent launch` sets up) and cold.

The agent is W&B's `wandb agent --forward-signals` with only its server calls replaced
(tests/programs/wandb_agent_offline.py): the test plays the server, handing out `run`, `stop`,
`resume` and `exit` commands once the runs have said, in their own logs, that they got where
the test waits for. What each run logged is read back with W&B's own offline reader.
"""

import json
import signal
import subprocess
import sys

import pytest
import yaml

from agent.runlog import RunLogReader, find_run_file
from tests.conftest import WARM
from tests.helpers import PROGRAMS, QUICK_VAL, REPO, fresh_env, leet_records, records_of, run_dirs, wait_for

pytestmark = pytest.mark.slow

ARGS = {"dataset": {"value": "synthetic"}, "val_fraction": {"value": QUICK_VAL}, "limit_train_batches": {"value": 12},
        "max_epochs": {"value": 4}, "early_stopping_patience": {"value": 10}}
PREEMPTED_EXIT = 128 + signal.SIGUSR1


class Server:
    """The test's side of the fake W&B server: command files in, heartbeats out."""

    def __init__(self, control, root):
        self.control, self.root, self.sent = control, root, 0
        self.readers: dict[str, RunLogReader] = {}
        self.rows: dict[str, list[dict]] = {}

    def send(self, *commands: dict):
        (self.control / f"{self.sent:03d}.json").write_text(json.dumps(list(commands)))
        self.sent += 1

    def run(self, run_id: str, kind: str = "run", **args):
        self.send({"type": kind, "run_id": run_id, "program": "unused", "args": {**ARGS, **args}})

    def heartbeats(self) -> list[dict]:
        path = self.control / "heartbeats.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def running(self, run_id: str) -> bool:
        beats = self.heartbeats()
        return bool(beats) and run_id in beats[-1]

    def handed_out(self) -> bool:
        return not list(self.control.glob("*.json"))

    def val_epochs(self, run_id: str) -> list[int]:
        """The epochs whose validation the newest attempt of `run_id` has logged so far."""
        path = find_run_file(self.root, run_id)
        if path is None:
            return []
        if run_id not in self.readers or self.readers[run_id].path != path:
            self.readers[run_id], self.rows[run_id] = RunLogReader(path), []
        self.rows[run_id] += self.readers[run_id].poll()
        return [row["epoch"] for row in self.rows[run_id] if "val_acc" in row]


AGENT = [sys.executable, str(PROGRAMS / "wandb_agent_offline.py")]
# `agent launch` as its CLI runs it, with each of its agents W&B's agent driven by the test.
LAUNCHER = """\
import sys
import yaml
import agent.launch
agent.launch.agent_command = lambda sweep_path, count: {agent!r} + [{control!r}, "--forward-signals", sweep_path]
# No W&B server here to ask for the sweep (tests/test_wandb_errors.py checks that part).
agent.launch.Launcher.sweep_on_wandb = lambda self: ("RUNNING", yaml.safe_load(open({control!r} + "/sweep.yaml")))
from agent.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def start(tmp_path, command: list[str], **env: str) -> tuple[Server, subprocess.Popen]:
    control = tmp_path / "control"
    control.mkdir()
    sweep = yaml.safe_load((REPO / "sweeps" / "bayes.yaml").read_text())
    (control / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    env = fresh_env(tmp_path, WANDB_API_KEY="x" * 40, WANDB_BASE_URL="https://api.wandb.test", **env)
    command = [part.format(control=control) for part in command]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    return Server(control, tmp_path), proc


@pytest.fixture
def agent(tmp_path, warm_worker):
    """W&B's agent, its runs going through a warm worker (as `agent launch` sets up one per agent)."""
    server, proc = start(tmp_path, [*AGENT, "{control}", "--forward-signals", "ent/proj/sweep1"],
                         AGENT_WARM_SOCKET=warm_worker.socket)
    yield server, proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def run_record(root, run_id, attempt=-1):
    records = leet_records(run_dirs(root, run_id)[attempt])
    [exit_record] = records_of(records, "exit")
    return records, exit_record.get("exit_code", 0)


@WARM
def test_stops_finish_runs_with_their_best_model_and_preemption_requeues_them(agent, tmp_path):
    server, proc = agent

    # A stop after the first validation: the run ends early, finished, with its best model.
    server.run("stopped1")
    wait_for(lambda: server.val_epochs("stopped1"), "stopped1's first validation", proc=proc)
    server.send({"type": "stop", "run_id": "stopped1"})
    wait_for(lambda: server.handed_out() and not server.running("stopped1"), "the agent to reap stopped1", proc=proc)
    records, code = run_record(tmp_path, "stopped1")
    assert code == 0
    assert not records_of(records, "preempting")
    assert len(set(server.val_epochs("stopped1"))) < 4  # it did end early
    models = [a for a in records_of(records, "artifact") if a["type"] == "model"]
    assert models and models[-1]["name"] == "model-stopped1" and set(models[-1]["aliases"]) == {"best", "latest"}
    assert "test_acc" in json.loads(models[-1]["metadata"])  # the last one logged is the tested best

    # A preemption notice to the agent (forwarded): state saved, marked preempting, non-zero exit;
    # W&B's `resume` command for the same id continues from the saved epoch.
    server.run("preempted1")
    wait_for(lambda: 1 in server.val_epochs("preempted1"), "preempted1's second validation", proc=proc)
    proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: not server.running("preempted1"), "the agent to reap preempted1", proc=proc)
    records, code = run_record(tmp_path, "preempted1")
    assert code == PREEMPTED_EXIT
    assert records_of(records, "preempting")
    assert [a["name"] for a in records_of(records, "artifact") if a["type"] == "checkpoint"] == ["resume-preempted1"]
    saved_epoch = max(server.val_epochs("preempted1")) + 1  # the epoch it was in
    server.run("preempted1", kind="resume")
    wait_for(lambda: len(run_dirs(tmp_path, "preempted1")) == 2 and server.running("preempted1"),
             "the resumed run", proc=proc)
    wait_for(lambda: not server.running("preempted1"), "the resumed run to end", timeout=180, proc=proc)
    records, code = run_record(tmp_path, "preempted1")
    assert code == 0
    resumed = [h["item"]["epoch"] for h in records_of(records, "history") if "val_acc" in h["item"]]
    assert resumed == list(range(saved_epoch, 4))  # continued, not from epoch 0

    # A burst of stops, each right after its run started (as hyperband gives): every run finishes
    # and the agent, which quits after 3 failures in its first minute, stays up for the next.
    for run_id in ("burst1", "burst2"):
        server.run(run_id)
        wait_for(lambda: find_run_file(tmp_path, run_id), f"{run_id}'s wandb.init", proc=proc)
        server.send({"type": "stop", "run_id": run_id})
        wait_for(lambda: server.handed_out() and not server.running(run_id), f"the agent to reap {run_id}", proc=proc)
        assert run_record(tmp_path, run_id)[1] == 0
    beats = len(server.heartbeats())
    wait_for(lambda: len(server.heartbeats()) > beats + 1, "the agent's next heartbeats", proc=proc)
    server.send({"type": "exit"})
    assert proc.wait(timeout=60) == 0
    counts = json.loads((server.control / "agent.json").read_text())
    assert counts == {"failed": 1, "finished": 5}  # the one failure is the preemption, as W&B needs it


def test_a_stop_through_the_agent_finishes_a_cold_run_too(tmp_path):
    server, proc = start(tmp_path, [*AGENT, "{control}", "--forward-signals", "ent/proj/sweep1"])
    try:
        server.run("cold1")
        wait_for(lambda: server.val_epochs("cold1"), "cold1's first validation", proc=proc)
        server.send({"type": "stop", "run_id": "cold1"})
        wait_for(lambda: server.handed_out() and not server.running("cold1"), "the agent to reap cold1", proc=proc)
        server.send({"type": "exit"})
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    records, code = run_record(tmp_path, "cold1")
    assert code == 0 and not records_of(records, "preempting")
    assert json.loads((server.control / "agent.json").read_text()) == {"failed": 0, "finished": 1}


def test_launch_on_sigterm_preempts_its_runs_so_that_wandb_requeues_them(tmp_path):
    wrapper = tmp_path / "launcher.py"
    wrapper.write_text(LAUNCHER.format(agent=AGENT, control=str(tmp_path / "control")))
    server, launcher = start(tmp_path, [sys.executable, str(wrapper), "launch", "ent/proj/sweep1", "--gpus", "0",
                                        "--stagger", "0"])
    try:
        server.run("boxgone1")
        wait_for(lambda: server.val_epochs("boxgone1"), "boxgone1's first validation", proc=launcher)
        launcher.send_signal(signal.SIGTERM)  # SLURM's --signal, a pod's deletion
        output = launcher.communicate(timeout=120)[0]
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 128 + signal.SIGTERM, output[-3000:]
    records, code = run_record(tmp_path, "boxgone1")
    assert code == PREEMPTED_EXIT and records_of(records, "preempting")
    assert [a["name"] for a in records_of(records, "artifact") if a["type"] == "checkpoint"] == ["resume-boxgone1"]
