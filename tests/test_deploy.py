"""deploy/: the SLURM script runs the launcher as documented; the Kubernetes Job is well-formed."""

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO

SBATCH = REPO / "deploy" / "slurm.sbatch"
OFFLINE = REPO / "deploy" / "slurm-offline.sbatch"
K8S = REPO / "deploy" / "k8s-job.yaml"
SWEEP = "ent/proj/abc123"

# A `python` that records how it was called, instead of launching anything.
FAKE_PYTHON = """\
#!/bin/sh
printf '%s\\n' "$@" > "$RECORD/argv"
pwd -P > "$RECORD/cwd"
echo "$PPID" > "$RECORD/ppid"
printf '%s' "${WANDB_API_KEY-}" > "$RECORD/key"
printf '%s' "${PYTHONPATH-}" > "$RECORD/pythonpath"
printf '%s' "${AGENT_STORE-}" > "$RECORD/store"
"""


# --- SLURM ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", [SBATCH, OFFLINE])
def test_sbatch_parses(script):
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def sbatch_directives(script: Path) -> tuple[list[str], list[str]]:
    """The #SBATCH lines, and those that come after the first command (which sbatch ignores)."""
    lines = script.read_text().splitlines()
    assert lines[0] == "#!/bin/bash"
    directives, late, seen_command = [], [], False
    for line in lines[1:]:
        if line.startswith("#SBATCH"):
            (late if seen_command else directives).append(line)
        elif line.strip() and not line.startswith("#"):
            seen_command = True
    return directives, late


@pytest.mark.parametrize("script", [SBATCH, OFFLINE])
def test_sbatch_directives_are_well_formed_and_come_first(script):
    directives, late = sbatch_directives(script)
    assert late == []
    for line in directives:  # one option per line, no trailing text sbatch could misread
        assert re.fullmatch(r"#SBATCH --[a-z][a-z-]*(=\S+)?", line), line
    options = dict(line.removeprefix("#SBATCH --").partition("=")[::2] for line in directives)
    assert re.fullmatch(r"\d+-\d+", options["array"])
    assert options["nodes"] == "1"
    assert re.fullmatch(r"gpu:\d+", options["gres"])
    assert re.fullmatch(r"B:TERM@\d+", options["signal"])
    assert "requeue" in options


def test_sbatch_hard_codes_no_key():
    assert not re.search(r"WANDB_API_KEY=['\"]?[0-9a-f]{16,}", SBATCH.read_text())


@pytest.fixture
def slurm(tmp_path):
    """Runs the script with bash as SLURM would (no scheduler), `python` being the recorder."""
    bin_dir, record, home = tmp_path / "bin", tmp_path / "record", tmp_path / "home"
    for d in (bin_dir, record, home):
        d.mkdir()
    python = bin_dir / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    data = tmp_path / "datasets" / "cifar10"
    (data / "cifar-10-batches-py").mkdir(parents=True)
    base = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(home), "RECORD": str(record),
            "SLURM_SUBMIT_DIR": str(REPO), "SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "1",
            "DATA_DIR": str(data), "WORK_DIR": str(tmp_path / "work")}

    def run(*args: str, script: Path = SBATCH, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(script), *args], env={**base, **env}, cwd=tmp_path,
                              capture_output=True, text=True, timeout=30)

    run.record, run.data, run.work = record, data, tmp_path / "work"
    return run


def test_sbatch_execs_the_launcher_with_every_gpu(slurm):
    out = slurm(SWEEP_PATH=SWEEP, WANDB_API_KEY="k" * 40)
    assert out.returncode == 0, out.stderr
    assert (slurm.record / "argv").read_text().splitlines() == ["-m", "agent", "launch", SWEEP, "--gpus", "all"]
    # exec: the launcher replaced the batch shell (so the scheduler's SIGTERM reaches it)
    assert int((slurm.record / "ppid").read_text()) == os.getpid()
    assert (slurm.record / "key").read_text() == "k" * 40
    # runs start in WORK_DIR, whose ./data (the runs' default data_dir) is DATA_DIR
    assert Path((slurm.record / "cwd").read_text().strip()) == slurm.work.resolve()
    assert (slurm.work / "data").resolve() == slurm.data.resolve()
    assert (slurm.record / "pythonpath").read_text().split(":")[0] == str(REPO)
    assert out.stderr == ""


def test_sbatch_pins_the_gpus_slurm_allocated_and_passes_arguments_on(slurm):
    out = slurm("--agents-per-gpu", "2", SWEEP_PATH=SWEEP, WANDB_API_KEY="x", CUDA_VISIBLE_DEVICES="2,3")
    assert out.returncode == 0, out.stderr
    assert (slurm.record / "argv").read_text().splitlines() == [
        "-m", "agent", "launch", SWEEP, "--gpus", "2,3", "--agents-per-gpu", "2"]


def test_sbatch_reads_the_key_from_a_file(slurm, tmp_path):
    key_file = tmp_path / "wandb-key"
    key_file.write_text("secret-from-file\n")
    out = slurm(SWEEP_PATH=SWEEP, WANDB_API_KEY_FILE=str(key_file))
    assert out.returncode == 0, out.stderr
    assert (slurm.record / "key").read_text() == "secret-from-file"


def test_sbatch_without_sweep_path_fails_clearly(slurm):
    out = slurm(WANDB_API_KEY="x")
    assert out.returncode != 0
    assert "SWEEP_PATH" in out.stderr and "ENTITY/PROJECT/SWEEP_ID" in out.stderr
    assert not (slurm.record / "argv").exists()


def test_sbatch_without_any_key_fails_clearly(slurm):
    out = slurm(SWEEP_PATH=SWEEP)
    assert out.returncode != 0 and "WANDB_API_KEY" in out.stderr
    assert not (slurm.record / "argv").exists()


def test_sbatch_warns_when_the_data_is_missing(slurm, tmp_path):
    out = slurm(SWEEP_PATH=SWEEP, WANDB_API_KEY="x", DATA_DIR=str(tmp_path / "nothing"))
    assert out.returncode == 0 and "cifar-10-batches-py" in out.stderr


def test_the_offline_sbatch_execs_one_controller_a_node_on_the_shared_store(slurm, tmp_path):
    shared = tmp_path / "shared" / "bayes1"
    store = "postgresql://sweeps@login1/sweeps"
    common = dict(SWEEP_YAML="sweeps/bayes.yaml", SWEEP_ID="bayes1", AGENT_STORE=store, SWEEP_DIR=str(shared))
    out = slurm("--gpus-per-trial", "2", script=OFFLINE, CUDA_VISIBLE_DEVICES="0,1,2,3", **common)
    assert out.returncode == 0, out.stderr
    assert (slurm.record / "argv").read_text().splitlines() == [
        "-m", "agent", "local", str(REPO / "sweeps" / "bayes.yaml"), "--sweep-id", "bayes1", "--dir", str(shared),
        "--gpus", "0,1,2,3", "--gpus-per-trial", "2"]
    assert int((slurm.record / "ppid").read_text()) == os.getpid()  # exec: the scheduler's SIGTERM reaches it
    assert (slurm.record / "store").read_text() == store
    assert Path((slurm.record / "cwd").read_text().strip()) == shared.resolve()
    for missing in common:
        out = slurm(script=OFFLINE, **{k: v for k, v in common.items() if k != missing})
        assert out.returncode != 0 and missing in out.stderr


# --- Kubernetes ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def job() -> dict:
    docs = [d for d in yaml.safe_load_all(K8S.read_text()) if d is not None]
    jobs = [d for d in docs if d.get("kind") == "Job"]
    assert len(jobs) == 1
    return jobs[0]


def test_k8s_job_shape(job):
    assert job["apiVersion"] == "batch/v1" and job["metadata"]["name"]
    spec = job["spec"]
    assert spec["parallelism"] == spec["completions"] >= 1  # one pod per node
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    assert pod["terminationGracePeriodSeconds"] >= 60  # time for the runs to checkpoint
    (container,) = pod["containers"]
    assert container["image"]


def test_k8s_runs_the_launcher_on_the_sweep_from_the_env(job):
    (container,) = job["spec"]["template"]["spec"]["containers"]
    command = container.get("command", []) + container.get("args", [])
    assert command == ["python", "-m", "agent", "launch", "$(SWEEP_PATH)", "--gpus", "all"]
    env = {e["name"]: e for e in container["env"]}
    assert env["SWEEP_PATH"]["value"]  # a container env var: Kubernetes expands $(SWEEP_PATH) in args


def test_k8s_key_comes_from_a_secret(job):
    (container,) = job["spec"]["template"]["spec"]["containers"]
    key = next(e for e in container["env"] if e["name"] == "WANDB_API_KEY")
    assert "value" not in key
    ref = key["valueFrom"]["secretKeyRef"]
    assert ref["name"] and ref["key"]


def test_k8s_requests_gpus_and_mounts_the_data(job):
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert all(name in volumes for name in mounts.values())
    data = mounts["/data"]
    assert volumes[data]["persistentVolumeClaim"]["claimName"]
    # the runs' default data_dir, ./data from the container's working directory, is that volume too
    assert mounts[container["workingDir"].rstrip("/") + "/data"] == data
