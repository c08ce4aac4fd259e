"""W&B's own `wandb agent` command with only its server calls replaced, driven through files.

    python wandb_agent_offline.py CONTROL_DIR [wandb agent options] ENTITY/PROJECT/SWEEP_ID

Replaced: the login check, the sweep lookup (answers CONTROL_DIR/sweep.yaml), the agent's
registration and its heartbeat. Each heartbeat appends the run states the agent reported to
CONTROL_DIR/heartbeats.jsonl and hands out the commands of the first CONTROL_DIR/NNN.json (a JSON
list, renamed to NNN.sent once handed out), so a test hands out `run`, `stop`, `resume` and
`exit` commands when its runs have reached the point it waits for. When the agent returns, its
own failure and finish counts go to CONTROL_DIR/agent.json. Everything else is wandb's code.
"""

import json
import sys
from pathlib import Path

from wandb import wandb_agent
from wandb.apis.public import sweeps
from wandb.cli import cli
from wandb.sdk import wandb_login

control = Path(sys.argv[1])


def heartbeat(api, agent_id, metrics, run_states):
    with (control / "heartbeats.jsonl").open("a") as f:
        f.write(json.dumps(run_states) + "\n")
    pending = sorted(control.glob("*.json"))
    if not pending:
        return []
    commands = json.loads(pending[0].read_text())
    pending[0].rename(pending[0].with_suffix(".sent"))
    return commands


sweeps._sweep_with_runs = lambda api, sweep, specs, **kw: {"config": (control / "sweep.yaml").read_text()}
sweeps._register_agent = lambda api, host, **kw: {"id": "agent-1"}
sweeps._agent_heartbeat = heartbeat
wandb_login._verify_login = lambda *args, **kwargs: None
wandb_agent.Agent.POLL_INTERVAL = 0.2  # the heartbeat period: seconds here, not the default 5

original_run = wandb_agent.Agent.run


def run_and_report(self):
    try:
        original_run(self)
    finally:
        (control / "agent.json").write_text(json.dumps({"failed": self._failed, "finished": self._finished}))


wandb_agent.Agent.run = run_and_report
sys.exit(cli.cli(["agent", *sys.argv[2:]], standalone_mode=False) or 0)
