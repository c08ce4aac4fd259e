"""`python -m agent create` and `python -m agent launch`, without a W&B server or GPUs.

The launcher's agents are real processes: `agent.online.launch.agent_command` is swapped
for a small Python script that behaves like `wandb agent` as far as the launcher
can tell (prints `Agent Starting Run: ...`, exits, crashes, traps signals).
W&B's own code answers create's and launch's checks, talking to a local stand-in for
W&B's server (FakeWandb, tests/fake_wandb.py; W&B's errors are tested in tests/test_wandb_errors.py);
the invalid-YAML path must fail before W&B is even imported.
"""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

import agent.online.launch as launch
from agent.__main__ import main
from tests.helpers import REPO, signalled, wait_for

# wandb.sweep's own code reads a deprecated setting; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Read the `app_url` setting:DeprecationWarning")

SWEEP = "ent/proj/abc123"

# What every fake agent starts with: its GPU (or "none") and the folder it may leave marker files in.
PRELUDE = """\
import os, signal, sys, time
from pathlib import Path
gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "none")
here = Path(__file__).parent
"""

# A successful agent: one run, then the sweep is over.
ONE_RUN = """\
print(f"Agent Starting Run: r{gpu} with config:", flush=True)
"""


@pytest.fixture(autouse=True)
def no_inherited_gpus(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


@pytest.fixture(autouse=True)
def wandb_server(fake_wandb):
    """W&B, with a key, at a local server that holds every sweep asked for, RUNNING."""
    return fake_wandb


def fake_agent(monkeypatch, tmp_path: Path, body: str) -> Path:
    """Makes every agent the launcher starts `python tmp_path/fake_agent.py`."""
    script = tmp_path / "fake_agent.py"
    script.write_text(PRELUDE + textwrap.dedent(body))
    monkeypatch.setattr(launch, "agent_command", lambda sweep_path, count: [sys.executable, str(script)])
    return script


def launch_args(*extra: str) -> list[str]:
    """--cold: these agents are fakes that run nothing, so no warm worker is needed (test_warm.py has one)."""
    return ["launch", SWEEP, "--stagger", "0", "--cold", *extra]


# --- GPU slots -----------------------------------------------------------------------------------

def test_dry_run_gpus_all_gives_one_agent_per_visible_gpu(mocker, capsys):
    mocker.patch("agent.online.launch.visible_gpus", return_value=["0", "1", "2", "3"])
    assert main(launch_args("--gpus", "all", "--dry-run")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    for gpu, line in enumerate(lines):
        assert line.startswith(f"CUDA_VISIBLE_DEVICES={gpu} ")
        assert line.endswith(f" -m wandb agent --forward-signals {SWEEP}")


def test_run_gpus_all_pins_one_real_agent_per_gpu(mocker, monkeypatch, tmp_path, capsys):
    mocker.patch("agent.online.launch.visible_gpus", return_value=["0", "1", "2", "3"])
    fake_agent(monkeypatch, tmp_path, ONE_RUN)
    assert main(launch_args("--gpus", "all")) == 0
    out = capsys.readouterr().out
    for gpu in "0123":
        # the run name comes from the agent's own CUDA_VISIBLE_DEVICES: each was pinned to its GPU
        assert f"[gpu{gpu}.0] Agent Starting Run: r{gpu} with config:" in out
        assert f"  gpu{gpu}.0: 1 runs, 0 agent failures, done" in out
    assert "gpu4" not in out


def test_agents_per_gpu_and_count(mocker, capsys):
    mocker.patch("agent.online.launch.visible_gpus", return_value=["0", "1"])
    assert main(launch_args("--agents-per-gpu", "2", "--count", "5", "--dry-run")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["CUDA_VISIBLE_DEVICES=0"] * 2 + ["CUDA_VISIBLE_DEVICES=1"] * 2
    assert all(line.endswith(f"agent --forward-signals --count 5 {SWEEP}") for line in lines)


def test_no_gpu_means_one_cpu_agent_without_cuda_visible_devices(mocker, monkeypatch, tmp_path, capsys):
    mocker.patch("agent.online.launch.visible_gpus", return_value=[])
    assert main(launch_args("--gpus", "all", "--dry-run")) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [f"{sys.executable} -m wandb agent --forward-signals {SWEEP}"]
    assert "no GPU visible" in captured.err and "one CPU agent" in captured.err

    fake_agent(monkeypatch, tmp_path, ONE_RUN)
    assert main(launch_args("--gpus", "all")) == 0
    captured = capsys.readouterr()
    assert "[cpu.0] Agent Starting Run: rnone with config:" in captured.out  # no CUDA_VISIBLE_DEVICES
    assert "  cpu.0: 1 runs, 0 agent failures, done" in captured.out
    assert "one CPU agent" in captured.err


def test_cli_dry_run_with_gpu_list_works_without_gpus():
    """The real CLI from the repo root, on this GPU-less machine: the list is taken as given."""
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    out = subprocess.run([sys.executable, "-m", "agent", "launch", SWEEP, "--gpus", "0,1,2,3", "--dry-run"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 4
    for gpu, line in enumerate(lines):
        assert line == f"CUDA_VISIBLE_DEVICES={gpu} {sys.executable} -m wandb agent --forward-signals {SWEEP}"


@pytest.mark.parametrize("args, message", [
    (["launch", "proj/abc123"], "expected ENTITY/PROJECT/SWEEP_ID"),
    (["launch", SWEEP, "--gpus", "0,x"], "--gpus='0,x'"),
    (["launch", SWEEP, "--gpus", ","], "--gpus=','"),
])
def test_bad_launch_arguments_exit_2_with_one_line(args, message, capsys):
    assert main([*args, "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and message in captured.err


# --- restarts ------------------------------------------------------------------------------------

CRASH_ONCE = """\
with open(here / "starts", "a") as f:
    f.write(f"start {time.monotonic()}\\n")
marker = here / f"crashed-{gpu}"
if not marker.exists():
    marker.touch()
    print("agent: something broke", flush=True)
    sys.exit(1)
""" + ONE_RUN

ALWAYS_CRASH = """\
with open(here / "starts", "a") as f:
    f.write("start\\n")
print("agent: something broke", flush=True)
sys.exit(1)
"""


def test_agent_that_crashes_once_is_restarted_after_backoff(monkeypatch, tmp_path, capsys):
    fake_agent(monkeypatch, tmp_path, CRASH_ONCE)
    monkeypatch.setattr("agent.online.launch.BACKOFF_BASE", 1.5)
    assert main(launch_args("--gpus", "0", "--max-restarts", "1")) == 0
    captured = capsys.readouterr()
    starts = [float(line.split()[1]) for line in (tmp_path / "starts").read_text().splitlines()]
    assert len(starts) == 2
    assert starts[1] - starts[0] >= 1.5  # the backoff was waited: BACKOFF_BASE ** 1 s (a lower bound only)
    assert "launch: gpu0.0 agent exited 1; restarting in 2s" in captured.err  # 1.5 s, rounded
    assert "  gpu0.0: 1 runs, 1 agent failures, done" in captured.out


def test_agent_that_always_crashes_is_given_up_after_max_restarts(monkeypatch, tmp_path, capsys):
    fake_agent(monkeypatch, tmp_path, ALWAYS_CRASH)
    monkeypatch.setattr("agent.online.launch.BACKOFF_BASE", 1.5)
    assert main(launch_args("--gpus", "0", "--max-restarts", "1")) == 1
    captured = capsys.readouterr()
    assert (tmp_path / "starts").read_text().count("start") == 2  # the first start and one restart
    assert "restarting in 2s" in captured.err  # 1.5 s, rounded
    assert "launch: gpu0.0 agent exited 1 2 times; giving up on it" in captured.err
    assert "  gpu0.0: 0 runs, 2 agent failures, gave up" in captured.out


def test_max_restarts_zero_gives_up_at_once(monkeypatch, tmp_path, capsys):
    fake_agent(monkeypatch, tmp_path, ALWAYS_CRASH)
    assert main(launch_args("--gpus", "0,1", "--max-restarts", "0")) == 1
    captured = capsys.readouterr()
    assert (tmp_path / "starts").read_text().count("start") == 2  # one per GPU, no restart
    assert "restarting" not in captured.err
    assert "  gpu0.0: 0 runs, 1 agent failures, gave up" in captured.out
    assert "  gpu1.0: 0 runs, 1 agent failures, gave up" in captured.out


# --- signals -------------------------------------------------------------------------------------

# An agent that reports itself up, then waits to be stopped; it records the signals it got, in order.
# Like `wandb agent --forward-signals` it survives SIGUSR1 (it would pass it to its run). It takes them
# one at a time with sigwait: a Python handler can run inside another's first line, and a SIGTERM arriving
# just after a SIGUSR1 then exited before the SIGUSR1 was written down (seen once in 6 suite runs).
TRAPPING_AGENT = PRELUDE + """\
waited = {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1}
signal.pthread_sigmask(signal.SIG_BLOCK, waited)
(here / f"started-{gpu}").touch()
signal.alarm(60)  # a safety net: never outlive the test for long
while True:
    signum = signal.sigwait(waited)
    with open(here / f"signals-{gpu}", "a") as f:
        f.write(signal.Signals(signum).name + "\\n")
    if signum != signal.SIGUSR1:
        sys.exit(0)
"""

# The real CLI, with agent_command pointed at the trapping agent.
LAUNCHER = """\
import sys
sys.path.insert(0, {repo!r})
import agent.online.launch
agent.online.launch.agent_command = lambda sweep_path, count: [sys.executable, {agent!r}]
from agent.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("signum, received", [(signal.SIGTERM, "SIGUSR1 SIGTERM"), (signal.SIGINT, "SIGINT")],
                         ids=["SIGTERM", "SIGINT"])
def test_signal_to_launcher_reaches_every_agent(signum, received, tmp_path):
    agent_script = tmp_path / "trapping_agent.py"
    agent_script.write_text(TRAPPING_AGENT)
    wrapper = tmp_path / "launcher.py"
    wrapper.write_text(LAUNCHER.format(repo=str(REPO), agent=str(agent_script)))
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        proc = signalled([sys.executable, str(wrapper), "launch", "e/p/abc123", "--gpus", "0,1", "--stagger", "0",
                          "--cold"], cwd=tmp_path, env=env, stdout=out, stderr=err)
        try:
            wait_for(lambda: (tmp_path / "started-0").exists() and (tmp_path / "started-1").exists(),
                     "both agents to start", timeout=30, proc=proc)
            proc.send_signal(signum)
            assert proc.wait(timeout=10) == 128 + signum  # a scheduler sees a stopped job
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    # SIGTERM (the box going away): a preemption notice for the runs first, then the stop
    for gpu in "01":
        assert (tmp_path / f"signals-{gpu}").read_text().split() == received.split()
    summary = (tmp_path / "out").read_text()
    assert "launch: summary" in summary
    assert "  gpu0.0: 0 runs, 0 agent failures, done" in summary
    assert "  gpu1.0: 0 runs, 0 agent failures, done" in summary


# --- create --------------------------------------------------------------------------------------

BAYES = REPO / "sweeps" / "bayes.yaml"


def test_create_sends_the_validated_sweep_and_prints_the_launch_command(wandb_server, capsys):
    assert main(["create", str(BAYES), "--project", "proj"]) == 0
    [(entity, project, config)] = [(v["entityName"], v["projectName"], yaml.safe_load(v["config"]))
                                   for op, v in wandb_server.calls if op == "UpsertSweep"]
    expected = yaml.safe_load(BAYES.read_text())
    assert (entity, project) == (None, "proj")  # W&B puts it in the key's default entity
    assert {k: v for k, v in config.items() if k != "parameters"} == {k: v for k, v in expected.items()
                                                                      if k != "parameters"}
    assert config["parameters"].keys() == expected["parameters"].keys()  # W&B adds a distribution to each
    assert config["parameters"]["lr"]["min"] == expected["parameters"]["lr"]["min"]
    out = capsys.readouterr().out
    assert "created sweep ent/proj/new123" in out
    assert "python -m agent launch ent/proj/new123 --gpus all" in out


def test_create_defaults_project_and_uses_a_given_entity(wandb_server, capsys):
    assert main(["create", str(BAYES), "--entity", "team"]) == 0
    upsert = next(v for op, v in wandb_server.calls if op == "UpsertSweep")
    assert (upsert["entityName"], upsert["projectName"]) == ("team", "cifar10-sweeps")
    assert "GetDefaultEntity" not in wandb_server.ops()  # the entity was given: no need to ask W&B for one
    assert "python -m agent launch team/cifar10-sweeps/new123 --gpus all" in capsys.readouterr().out


@pytest.fixture
def typo_sweep(tmp_path) -> Path:
    """bayes.yaml with `lr` misspelt `learnin_rate`."""
    sweep = yaml.safe_load(BAYES.read_text())
    sweep["parameters"] = {("learnin_rate" if k == "lr" else k): v for k, v in sweep["parameters"].items()}
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def test_create_refuses_an_invalid_sweep_before_calling_wandb(wandb_server, typo_sweep, capsys):
    assert main(["create", str(typo_sweep)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "learnin_rate" in captured.err and "Traceback" not in captured.err
    assert wandb_server.calls == []


def test_cli_create_refuses_an_invalid_sweep_offline(typo_sweep, tmp_path):
    """The real CLI, WANDB_MODE unset and no network: exits 2 at once, W&B never even imported
    (a `wandb` package ahead on the path records any import and fails it)."""
    poison = tmp_path / "poison" / "wandb"
    poison.mkdir(parents=True)
    (poison / "__init__.py").write_text(f"open({str(tmp_path / 'wandb-imported')!r}, 'w').close()\n"
                                        "raise ImportError('wandb imported')\n")
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    env["PYTHONPATH"] = str(poison.parent)
    out = subprocess.run([sys.executable, "-m", "agent", "create", str(typo_sweep)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 2, out.stderr
    assert out.stdout == ""
    assert out.stderr.count("\n") == 1 and "learnin_rate" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "wandb-imported").exists()


def test_all_means_the_gpus_this_job_was_given(monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    assert main(launch_args("--gpus", "all", "--dry-run")) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == [
        "CUDA_VISIBLE_DEVICES=2", "CUDA_VISIBLE_DEVICES=3"]
