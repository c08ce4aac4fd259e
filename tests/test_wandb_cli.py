"""Our sweep YAMLs work with W&B's real CLI and agent code, offline.

Only the network is faked: every request wandb makes to its backend goes through
``ServiceApi.send_api_request`` (auth checks and GraphQL alike), which is patched
with a tiny fake server.  The fake checks sweep configs with the same ``sweeps``
JSON schema the W&B server uses.  The agent test also replaces the ``subprocess.Popen``
that wandb's AgentProcess calls, so no training run starts.  It proves that:

1. ``wandb sweep sweeps/<name>.yaml`` parses each YAML, has the server accept it
   with no schema warnings, and prints the new sweep id.
2. ``wandb.agent(sweep_id)`` (the program-based agent) turns the ``command:`` in
   sweeps/bayes.yaml into ``/usr/bin/env python -m agent run --k=v ...`` and sets
   WANDB_SWEEP_ID and WANDB_RUN_ID for the child process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import wandb
import yaml
from click.testing import CliRunner
from wandb import wandb_agent
from wandb.apis.public.service_api import ServiceApi
from wandb.cli import cli
from wandb.proto.wandb_api_pb2 import ApiResponse, GraphQLResponse

with warnings.catch_warnings():  # `sweeps` (W&B's schema package) warns about pydantic v1 style
    warnings.simplefilter("ignore")
    import sweeps as sweeps_schema

# wandb's own `wandb sweep` code warns (a deprecation, an unclosed YAML file); not ours to fix.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Read the `app_url` setting:DeprecationWarning"),
    pytest.mark.filterwarnings(
        r"ignore:Exception ignored in.*\.yaml:pytest.PytestUnraisableExceptionWarning"),
]

SWEEPS_DIR = Path(__file__).resolve().parents[1] / "sweeps"
SWEEP_ID = "sw33p1d"
RUN_ARGS = {"lr": {"value": 0.001}, "optimizer": {"value": "sgd"}, "batch_size": {"value": 64}}


class FakeServer:
    """Answers the requests that wandb-core would send to the W&B backend."""

    def __init__(self, sweep_yaml: str = ""):
        self.sweep_yaml = sweep_yaml  # what the sweep lookup returns
        self.calls: list[tuple[str, dict]] = []  # (operation name, variables)
        self.heartbeats = 0

    def __call__(self, service_api, request, timeout=None):
        if request.HasField("auth_request"):  # API-key check: accept the key
            self.calls.append(("auth", {}))
            return ApiResponse()
        assert request.HasField("graphql_request"), f"unexpected request: {request}"
        gql = request.graphql_request
        op = re.search(r"(?:query|mutation)\s+(\w+)", gql.query).group(1)
        variables = json.loads(gql.variables_json)
        self.calls.append((op, variables))
        data = getattr(self, op)(variables)
        return ApiResponse(graphql_response=GraphQLResponse(data_json=json.dumps(data)))

    def UpsertSweep(self, v):
        # Like the server, validate the config against the sweeps JSON schema.
        violations = sweeps_schema.schema_violations_from_proposed_config(yaml.safe_load(v["config"]))
        project = {"id": "P1", "name": v["projectName"], "entity": {"id": "E1", "name": v["entityName"]}}
        sweep = {"name": SWEEP_ID, "project": project}
        return {"upsertSweep": {"sweep": sweep, "configValidationWarnings": violations}}

    def SweepWithRuns(self, v):
        sweep = {"id": "U1", "name": v["sweep"], "state": "RUNNING", "config": self.sweep_yaml,
                 "runs": {"edges": []}}
        return {"project": {"sweep": sweep}}

    def CreateAgent(self, v):
        return {"createAgent": {"agent": {"id": "agent-1"}}}

    def Heartbeat(self, v):
        self.heartbeats += 1
        run = {"type": "run", "run_id": "abc123", "program": "unused.py", "args": RUN_ARGS}
        commands = [run] if self.heartbeats == 1 else [{"type": "exit"}]
        return {"agentHeartbeat": {"agent": {"id": v["id"]}, "commands": json.dumps(commands)}}


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch, mocker):
    """Isolate wandb in tmp_path with a dummy key; restore os.environ afterwards."""
    mocker.patch.dict(os.environ, {
        "WANDB_API_KEY": "x" * 40,
        "WANDB_BASE_URL": "https://api.wandb.test",
        "WANDB_DIR": str(tmp_path),
        "WANDB_CONFIG_DIR": str(tmp_path / "config"),
        "WANDB_CACHE_DIR": str(tmp_path / "cache"),
    })
    for var in ("WANDB_ENTITY", "WANDB_PROJECT", "WANDB_MODE", "WANDB_SWEEP_ID", "WANDB_RUN_ID"):
        os.environ.pop(var, None)  # patch.dict restores these on exit
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "_wandb_log_path", str(tmp_path / "debug-cli.log"))
    wandb.teardown()  # fresh settings singleton that reads the env above
    server = FakeServer()
    mocker.patch.object(ServiceApi, "send_api_request", autospec=True, side_effect=server)
    yield server
    wandb.teardown()


@pytest.mark.parametrize("name", ["bayes", "random", "grid"])
def test_wandb_sweep_accepts_yaml(offline_wandb, name):
    path = SWEEPS_DIR / f"{name}.yaml"
    expected = yaml.safe_load(path.read_text())

    result = CliRunner().invoke(cli.cli, ["sweep", "--project", "p", "--entity", "e", str(path)])

    assert result.exit_code == 0, result.output
    upserts = [v for op, v in offline_wandb.calls if op == "UpsertSweep"]
    assert len(upserts) == 1
    sent = yaml.safe_load(upserts[0]["config"])
    assert (upserts[0]["entityName"], upserts[0]["projectName"]) == ("e", "p")
    assert sent == expected
    assert sent["method"] == name
    assert sent["metric"] == {"name": "val_acc", "goal": "maximize"}
    assert {"lr", "optimizer"} <= set(sent["parameters"])
    assert sent["command"] == ["${env}", "${interpreter}", "-m", "agent", "run", "${args}"]
    assert sweeps_schema.schema_violations_from_proposed_config(sent) == []
    assert f"Creating sweep with ID: {SWEEP_ID}" in result.output
    assert f"wandb agent e/p/{SWEEP_ID}" in result.output


def test_wandb_agent_launches_command_from_yaml(offline_wandb, mocker):
    offline_wandb.sweep_yaml = (SWEEPS_DIR / "bayes.yaml").read_text()
    mocker.patch.object(wandb_agent.Agent, "POLL_INTERVAL", 0.01)  # don't wait 5 s per loop
    child = mocker.MagicMock(name="child")
    child.poll.return_value = 0  # the run has already exited cleanly
    child.wait.return_value = 0
    popen = mocker.Mock(name="Popen", return_value=child)
    # Swap only wandb_agent's view of `subprocess` (AgentProcess's Popen); wandb's
    # other subprocess calls (e.g. `git rev-parse`) stay real.
    fake_subprocess = SimpleNamespace(
        Popen=popen, PIPE=subprocess.PIPE, TimeoutExpired=subprocess.TimeoutExpired)
    mocker.patch.object(wandb_agent, "subprocess", fake_subprocess)

    wandb.agent(f"e/p/{SWEEP_ID}")

    popen.assert_called_once()
    argv = popen.call_args.args[0]
    assert argv == ["/usr/bin/env", "python", "-m", "agent", "run",
                    "--lr=0.001", "--optimizer=sgd", "--batch_size=64"]
    env = popen.call_args.kwargs["env"]
    assert env["WANDB_SWEEP_ID"] == SWEEP_ID
    assert env["WANDB_RUN_ID"] == "abc123"
    ops = [op for op, _ in offline_wandb.calls if op != "auth"]
    assert ops == ["SweepWithRuns", "CreateAgent", "Heartbeat", "Heartbeat"]
    lookup = next(v for op, v in offline_wandb.calls if op == "SweepWithRuns")
    assert (lookup["entity"], lookup["project"], lookup["sweep"]) == ("e", "p", SWEEP_ID)
