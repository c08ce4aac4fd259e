"""A stand-in for W&B's server: its GraphQL endpoint on a free localhost port, answering as W&B's schema
does, so that all of W&B's client code (wandb-core included) runs in the tests. The `fake_wandb` fixture
(tests/conftest.py) points W&B at one."""

import json
import os
import re
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.helpers import REPO

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


def isolated(tmp_path: Path, mocker, **env: str):
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
