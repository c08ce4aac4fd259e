"""W&B's answers as create, launch and report meet them: no key, a refused key, no network, no such sweep,
a refusal, an offline mode. Each is one line on stderr and exit 2, found before anything is created or any
agent started.

All of W&B's code runs, wandb-core included: only the server is ours, `FakeWandb`, a GraphQL endpoint on
a localhost port that answers as W&B's schema does; an unreachable W&B is a closed localhost port.
"""

import json
import os
import re
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import agent.launch as launch
from agent.__main__ import main
from tests.helpers import REPO

# wandb.sweep's own code reads a deprecated setting; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Read the `app_url` setting:DeprecationWarning")

SWEEP = "ent/proj/abc123"
BAYES = REPO / "sweeps" / "bayes.yaml"
KEY = "k" * 40


class FakeWandb(ThreadingHTTPServer):
    """W&B's GraphQL endpoint on a free localhost port. `sweep_state` None: no such sweep; `status` 401:
    every key refused; `errors`: operation -> the GraphQL error W&B returns for it."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.status, self.sweep_state, self.errors = 200, "RUNNING", {}
        self.sweep_config = BAYES.read_text()
        self.runs: list[dict] = []  # as W&B lists them: name, state, config and summaryMetrics (JSON)
        self.calls: list[tuple[str, dict]] = []  # (GraphQL operation, variables), in order

    def answer(self, op: str, variables: dict) -> dict:
        viewer = {"id": "VXNlcjox", "entity": "ent", "username": "me", "email": "me@example.com", "flags": "{}",
                  "teams": {"edges": []}}
        sweep = None if self.sweep_state is None else {
            "__typename": "Sweep", "id": "U3dlZXA6MQ==", "name": variables.get("name"), "displayName": None,
            "method": "bayes", "state": self.sweep_state, "description": None, "bestLoss": None,
            "config": self.sweep_config, "createdAt": "2025-01-01T00:00:00", "updatedAt": None,
            "runCount": len(self.runs), "runCountExpected": None}
        project = {"id": "UHJvamVjdDox", "name": variables.get("projectName"),
                   "entity": {"id": "RW50aXR5OjE=", "name": variables.get("entityName") or "ent"}}
        runs = {"internalId": "UHJvamVjdDox", "runCount": len(self.runs), "readOnly": False, "runs": {
            "edges": [{"node": {"id": f"UnVuOj{i}", "projectId": 1, **run}, "cursor": str(i)}
                      for i, run in enumerate(self.runs)],
            "pageInfo": {"endCursor": None, "hasNextPage": False}}}
        found = {"project": sweep and {"sweep": sweep}}  # W&B: no project for a sweep it does not show this key
        return {"Viewer": {"viewer": viewer}, "GetDefaultEntity": {"viewer": {"id": viewer["id"], "entity": "ent"}},
                "GetSweep": found, "GetSweepLegacy": found,
                "UpsertSweep": {"upsertSweep": {"sweep": {"name": "new123", "project": project},
                                                "configValidationWarnings": []}},
                "Runs": {"project": runs}}.get(op, {})

    def ops(self) -> list[str]:
        return [op for op, _ in self.calls]


class _Handler(BaseHTTPRequestHandler):
    server: FakeWandb

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        status, payload = 200, {}  # for wandb-core's own telemetry
        if self.path == "/graphql":
            request = json.loads(body)
            op = re.search(r"(?:query|mutation)\s+(\w+)", request["query"]).group(1)
            variables = request.get("variables") or {}
            self.server.calls.append((op, variables))
            status, error = self.server.status, self.server.errors.get(op)
            if status != 200:
                payload = {"errors": [{"message": "invalid API key"}]}
            elif error:
                payload = {"errors": [{"message": error}], "data": None}
            else:
                payload = {"data": self.server.answer(op, variables)}
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _isolated(tmp_path: Path, mocker, **env: str):
    """os.environ with no W&B variables of the caller's, no ~/.netrc, W&B's files under tmp_path, and
    `env` on top; restored afterwards (wandb.sweep writes WANDB_ENTITY and WANDB_PROJECT into it)."""
    import wandb

    mocker.patch.dict(os.environ)
    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        del os.environ[key]
    os.environ.update({"NETRC": str(tmp_path / "netrc"), "WANDB_CONFIG_DIR": str(tmp_path / "config"),
                       "WANDB_DIR": str(tmp_path), "WANDB_CACHE_DIR": str(tmp_path / "cache"),
                       "WANDB_DATA_DIR": str(tmp_path / "data"), "WANDB_SILENT": "true", **env})
    wandb.teardown()  # a fresh W&B that reads the environment above


@pytest.fixture
def fake_wandb(tmp_path, mocker):
    """A FakeWandb holding RUNNING sweep ent/proj/* (sweeps/bayes.yaml); W&B pointed at it with a key."""
    server = FakeWandb()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _isolated(tmp_path, mocker, WANDB_API_KEY=KEY, WANDB_BASE_URL=server.url)
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def agent_starts(monkeypatch, tmp_path) -> Path:
    """Makes each agent the launcher starts a script that records its start (and WANDB_SERVICE) in the
    returned file and exits 0."""
    starts = tmp_path / "starts"
    script = tmp_path / "agent.py"
    script.write_text(f"import os\nwith open({str(starts)!r}, 'a') as f:\n"
                      "    f.write(os.environ.get('WANDB_SERVICE', 'no service') + '\\n')\n")
    monkeypatch.setattr(launch, "agent_command", lambda sweep_path, count: [sys.executable, str(script)])
    return starts


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


COMMANDS = {"create": ["create", str(BAYES), "--project", "proj"], "launch": ["launch", SWEEP, "--gpus", "0"],
            "report": ["report", SWEEP]}


def one_line(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured.err
    return captured.err


@pytest.mark.parametrize("command", ["create", "launch"])
def test_no_api_key_is_one_line_that_says_how_to_log_in(command, tmp_path, mocker, agent_starts, capsys):
    _isolated(tmp_path, mocker)
    assert main(COMMANDS[command]) == 2
    err = one_line(capsys)
    assert err.startswith(f"agent {command}: no W&B API key") and "`wandb login`" in err and "WANDB_API_KEY" in err
    assert not agent_starts.exists()


@pytest.mark.parametrize("command", ["create", "launch", "report"])
def test_unreachable_wandb_is_one_line_within_seconds(command, tmp_path, mocker, agent_starts, capsys):
    url = f"http://127.0.0.1:{closed_port()}"
    _isolated(tmp_path, mocker, WANDB_API_KEY=KEY, WANDB_BASE_URL=url)
    start = time.monotonic()
    assert main(COMMANDS[command]) == 2
    assert time.monotonic() - start < 15  # wandb left to itself: 19 s, and no reason given; ours: about 4 s
    err = one_line(capsys)
    assert f"cannot reach W&B at {url} (" in err and "connection refused" in err and "WANDB_BASE_URL" in err
    assert not agent_starts.exists()


def test_refused_key_says_to_log_in_again(fake_wandb, agent_starts, capsys):
    fake_wandb.status = 401
    assert main(COMMANDS["launch"]) == 2
    err = one_line(capsys)
    assert f"W&B at {fake_wandb.url} refused the API key (invalid API key)" in err and "--relogin" in err
    assert fake_wandb.ops() == ["Viewer"] and not agent_starts.exists()


@pytest.mark.parametrize("command", ["launch", "report"])
def test_missing_sweep_is_one_line_and_no_agent(command, fake_wandb, agent_starts, capsys):
    fake_wandb.sweep_state = None
    assert main(COMMANDS[command]) == 2
    assert one_line(capsys) == (f"agent {command}: {SWEEP}: no such sweep on W&B at {fake_wandb.url}, or this API "
                                "key cannot see it\n")
    assert fake_wandb.ops()[:2] == ["Viewer", "GetSweep"] and not agent_starts.exists()


def test_launch_checks_once_and_its_agents_do_not_share_wandbs_service(fake_wandb, agent_starts, capsys):
    assert main(["launch", SWEEP, "--gpus", "0,1", "--stagger", "0"]) == 0
    assert fake_wandb.ops() == ["Viewer", "GetSweep"]  # once, for both agents
    # the check's wandb-core is gone before the agents start: each starts its own, as by hand
    assert agent_starts.read_text().split("\n")[:-1] == ["no service", "no service"]
    assert "WANDB_SERVICE" not in os.environ


def test_launch_of_a_finished_sweep_starts_nothing_and_succeeds(fake_wandb, agent_starts, capsys):
    fake_wandb.sweep_state = "FINISHED"
    assert main(COMMANDS["launch"]) == 0  # a box that joins late is not a failed job
    assert one_line(capsys) == f"launch: sweep {SWEEP} is finished on W&B; no agent started\n"
    assert not agent_starts.exists()


def test_create_refused_by_wandb_is_one_line(fake_wandb, capsys):
    fake_wandb.errors["UpsertSweep"] = "permission denied"
    assert main(COMMANDS["create"]) == 2
    err = one_line(capsys)  # W&B's own words, after ours
    assert err.startswith(f"agent create: {BAYES}: W&B did not create the sweep: ") and "permission denied" in err


@pytest.mark.parametrize("mode", ["offline", "disabled"])
@pytest.mark.parametrize("command", ["create", "launch"])
def test_offline_mode_is_refused_before_any_request(command, mode, fake_wandb, agent_starts, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", mode)
    assert main(COMMANDS[command]) == 2
    err = one_line(capsys)
    assert f"W&B is in {mode} mode" in err and "python -m agent local" in err
    assert fake_wandb.calls == [] and not agent_starts.exists()


def test_bad_wandb_setting_is_one_line(fake_wandb, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "ofline")
    assert main(COMMANDS["launch"]) == 2
    assert "mode='ofline': Input should be 'online'" in one_line(capsys)


def test_dry_run_needs_no_credentials(tmp_path, mocker, capsys):
    _isolated(tmp_path, mocker, WANDB_BASE_URL=f"http://127.0.0.1:{closed_port()}")
    assert main(["launch", SWEEP, "--gpus", "0", "--dry-run"]) == 0
    assert capsys.readouterr().out.endswith(f"agent --forward-signals {SWEEP}\n")
