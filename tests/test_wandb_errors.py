"""W&B's answers as create, launch and report meet them: no key, a refused key, no network, no such sweep,
a refusal, an offline mode. Each is one line on stderr and exit 2, found before anything is created or any
agent started.

All of W&B's code runs, wandb-core included: only the server is ours (tests/fake_wandb.py); an unreachable
W&B is a closed localhost port.
"""

import os
import socket
import sys
from pathlib import Path

import pytest

import agent.online.launch as launch
from agent.__main__ import main
from tests.fake_wandb import BAYES, KEY, isolated

# wandb.sweep's own code reads a deprecated setting; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Read the `app_url` setting:DeprecationWarning")

SWEEP = "ent/proj/abc123"


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


COMMANDS = {"create": ["create", str(BAYES), "--project", "proj"], "launch": ["launch", SWEEP, "--gpus", "0", "--cold"],
            "report": ["report", SWEEP]}


def one_line(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured.err
    return captured.err


@pytest.mark.parametrize("command", ["create", "launch"])
def test_no_api_key_is_one_line_that_says_how_to_log_in(command, tmp_path, mocker, agent_starts, capsys):
    isolated(tmp_path, mocker)
    assert main(COMMANDS[command]) == 2
    err = one_line(capsys)
    assert err.startswith(f"agent {command}: no W&B API key") and "`wandb login`" in err and "WANDB_API_KEY" in err
    assert not agent_starts.exists()


@pytest.mark.parametrize("command", ["launch"])  # create and report take the same path (agent/online/api.py)
def test_unreachable_wandb_is_one_line_with_the_reason(command, tmp_path, mocker, agent_starts, capsys):
    url = f"http://127.0.0.1:{closed_port()}"
    isolated(tmp_path, mocker, WANDB_API_KEY=KEY, WANDB_BASE_URL=url)
    assert main(COMMANDS[command]) == 2
    # The reason is there only because wandb-core gave up within our shorter retries (about 4 s here);
    # left to itself it retries for minutes, and our wait ends first with "the service process is busy".
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
    assert main(["launch", SWEEP, "--gpus", "0,1", "--stagger", "0", "--cold"]) == 0
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
    isolated(tmp_path, mocker, WANDB_BASE_URL=f"http://127.0.0.1:{closed_port()}")
    assert main(["launch", SWEEP, "--gpus", "0", "--dry-run"]) == 0
    assert capsys.readouterr().out.endswith(f"agent --forward-signals {SWEEP}\n")
