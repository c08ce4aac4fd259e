"""`python -m agent best`: a real local sweep's best trial, its config line, checkpoint, test score, export."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import wandb

from agent.controller.store import Store, sqlite_url
from agent.errors import UsageError
from agent.program.flags import make_config, parse_flags
from agent.program.use import best
from cifar_core.checkpoints import load_network, save_network
from cifar_core.config import TrainConfig
from cifar_core.data import CIFAR10_CLASSES as CLASSES
from cifar_core.data import synthetic_images, synthetic_splits
from cifar_core.model import create_model
from cifar_core.system import ImageClassifier
from tests.conftest import HYPERBAND
from tests.helpers import agent_command, leet_summary, run_dirs

pytestmark = [pytest.mark.slow, HYPERBAND]  # the session's hyperband sweep: one xdist process runs them all

# Run in a process where neither this checkout nor any installed copy of the project can be imported.
CLEAN_CHECK = r"""
import json, sys
sys.modules.update(cifar_core=None, agent=None, timm=None)  # None in sys.modules: `import cifar_core` fails
import torch
extra = {"class_names.json": "", "input.json": ""}
model = torch.export.load(sys.argv[1], extra_files=extra).module()
x = torch.load(sys.argv[2])
try:
    model((x * 255).round().byte())
    uint8 = "accepted"
except RuntimeError as e:
    uint8 = str(e).strip().splitlines()[-1]
print(json.dumps({"floats": model(x).argmax(-1).tolist(), "0-255": model(x * 255).argmax(-1).tolist(), "uint8": uint8,
                  "class_names": json.loads(extra["class_names.json"]), "input": json.loads(extra["input.json"])}))
"""


@pytest.fixture(scope="module")
def sweep(hyperband_sweep):
    """The session's real local sweep of our program (conftest.HYPERBAND_SWEEP): its best trial and its run."""
    finished = [t for t in hyperband_sweep.trials if t.state in ("finished", "stopped") and t.metric is not None]
    assert len(finished) >= 2, [(t.id, t.state, t.reason) for t in hyperband_sweep.trials]
    top = max(t.metric for t in finished)
    winner = next(t for t in finished if t.metric == top)  # ties: the first, as `agent status` shows
    [run_dir] = run_dirs(hyperband_sweep.dir, winner.id)
    return SimpleNamespace(dir=hyperband_sweep.dir, env=hyperband_sweep.env, trial=winner, run_dir=run_dir,
                           logged=leet_summary(run_dir))


def report(capsys, target, evaluate=False, export=None) -> dict:
    assert best(str(target), evaluate, export) == 0
    out = capsys.readouterr().out
    lines = dict(line.split(": ", 1) for line in out.splitlines() if re.match(r"^(best|config|checkpoint|test_acc|"
                                                                              r"exported): ", line))
    return dict(lines, out=out)


def checkpoint_predictions(path: Path, images: torch.Tensor) -> list[int]:
    """Independently of agent best: the network as training built it, from the checkpoint."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    network = checkpoint["network"]
    net = create_model(TrainConfig(**network["config"]), network["num_classes"], pretrained=False)
    net.load_state_dict(checkpoint["state_dict"])
    with torch.inference_mode():
        return net.eval()(images).argmax(-1).tolist()


def run_clean(model: Path, images: torch.Tensor, tmp_path: Path) -> dict:
    torch.save(images.float() / 255, tmp_path / "x.pt")  # as torchvision's ToTensor gives them
    out = subprocess.run([sys.executable, "-I", "-c", CLEAN_CHECK, str(model), str(tmp_path / "x.pt")], cwd=tmp_path,
                         env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_prints_best_trial_a_run_line_that_parses_back_and_its_checkpoint(sweep, capsys):
    out = report(capsys, sweep.dir)
    assert out["best"].startswith(f"trial {sweep.trial.id} of sweep ") and "finished" in out["best"]
    assert f"val_acc={sweep.trial.metric:.6g} (maximize)" in out["best"]
    prefix = "python -m agent run "
    assert out["config"].startswith(prefix)
    config = make_config(parse_flags(shlex.split(out["config"].removeprefix(prefix))))
    assert config == make_config({k: v for k, v in sweep.logged["config"].items() if not k.startswith("_")})
    for key, value in sweep.trial.config.items():
        assert getattr(config, key) == value, key
    assert Path(out["checkpoint"]) == sweep.run_dir / "checkpoints" / "best.ckpt"


def test_cli_prints_the_same(sweep, tmp_path):
    out = subprocess.run(agent_command("best", str(sweep.dir)), cwd=tmp_path, env=sweep.env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"trial {sweep.trial.id} " in out.stdout and "python -m agent run --" in out.stdout


def test_evaluate_reproduces_the_logged_test_accuracy_with_a_per_class_table(sweep, capsys):
    out = report(capsys, sweep.dir, evaluate=True)
    logged = f"{sweep.logged['summary']['test_acc']:.4f}"
    assert out["test_acc"].startswith(f"{logged} (logged by the trial: {logged}) on 1000 images")
    rows = [line.split() for line in out["out"].splitlines() if line.split()[:1] and line.split()[0] in CLASSES]
    assert [r[0] for r in rows] == list(CLASSES) and all(0 <= float(r[1]) <= 1 for r in rows)
    assert sum(int(r[2]) for r in rows) == 1000


def test_export_runs_without_the_project_and_predicts_as_the_checkpoint(sweep, capsys, tmp_path):
    model = tmp_path / "best.pt2"
    out = report(capsys, sweep.dir, export=str(model))
    assert out["exported"].startswith(str(model))
    _, (images, _) = synthetic_splits(sweep.trial.config.get("seed", 0))
    got = run_clean(model, images[:100], tmp_path)
    expected = checkpoint_predictions(Path(out["checkpoint"]), images[:100])
    assert got["floats"] == got["0-255"] == expected  # floats in 0-255 are scaled, not scored as [0, 1]
    assert got["uint8"] == "Tensor dtype mismatch! Expected: Float, Got: unsigned char"  # refused, not misread
    assert got["class_names"] == list(CLASSES) and got["input"]["shape"] == ["N", 3, 32, 32]


@pytest.fixture(autouse=True)
def wandb_key(monkeypatch):
    """A key of the right form: `best` checks that there is one before it asks W&B (wandb.Api is mocked)."""
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)


def wandb_api(mocker, run_id: str, config: dict, folder: Path):
    api = mocker.patch("wandb.Api").return_value
    sweep = api.sweep.return_value
    sweep.config = {"metric": {"name": "val_acc", "goal": "maximize"}}
    sweep.best_run.return_value = SimpleNamespace(id=run_id, state="finished", config=config,
                                                  summary={"val_acc": 0.75, "test_acc": 0.5})
    api.artifact.return_value.download.return_value = str(folder)
    return api


def test_wandb_sweep_best_run_and_its_best_model_artifact(sweep, mocker, capsys, tmp_path):
    folder = tmp_path / "artifacts" / "model-abc:v3"
    folder.mkdir(parents=True)
    shutil.copy(sweep.run_dir / "checkpoints" / Path(report(capsys, sweep.dir)["checkpoint"]).name,
                folder / "model.ckpt")
    api = wandb_api(mocker, "abc", {"_wandb": {}, **sweep.logged["config"]}, folder)
    out = report(capsys, "ent/proj/swp", evaluate=True)
    api.sweep.assert_called_once_with("ent/proj/swp")
    api.artifact.assert_called_once_with("ent/proj/model-abc:best")
    assert out["best"] == "run abc of sweep ent/proj/swp, finished, val_acc=0.75 (maximize)"
    assert out["checkpoint"] == str(folder / "model.ckpt")
    logged = f"{sweep.logged['summary']['test_acc']:.4f}"
    assert out["test_acc"].startswith(f"{logged} (logged by the trial: 0.5000)")


def test_a_compiled_resnet9_checkpoint_exports(mocker, capsys, tmp_path):
    torch.manual_seed(0)
    config = TrainConfig(dataset="synthetic", model="resnet9", width=8, compile=True)
    system = ImageClassifier(config, 10).eval()  # compiled in place: the saved names are the plain ones
    folder = tmp_path / "artifact"
    folder.mkdir()
    save_network(folder / "model.ckpt", config, 10, system.net.state_dict())
    wandb_api(mocker, "r9", {"dataset": "synthetic", "model": "resnet9", "width": 8, "compile": True}, folder)
    out = report(capsys, "ent/proj/swp", export=str(tmp_path / "r9.pt2"))
    assert "--model=resnet9" in out["config"] and "--compile=true" in out["config"]
    images, _ = synthetic_images(40, 7)
    got = run_clean(tmp_path / "r9.pt2", images, tmp_path)
    assert got["floats"] == checkpoint_predictions(folder / "model.ckpt", images)


def test_cifar10_trials_evaluate_on_their_data_dir_and_missing_data_is_named(mocker, capsys, tmp_path, sweep,
                                                                              cifar_dir):
    def trained_on(data_dir: Path):  # the sweep's best network, as if trained on CIFAR-10 in data_dir
        net, config, _ = load_network(sweep.run_dir / "checkpoints" / "best.ckpt")
        cifar = config.model_copy(update={"dataset": "cifar10", "data_dir": str(data_dir)})
        save_network(tmp_path / "model.ckpt", cifar, 10, net.state_dict())

    trained_on(cifar_dir)
    wandb_api(mocker, "abc", {}, tmp_path)
    out = report(capsys, "ent/proj/swp", evaluate=True)
    assert re.fullmatch(rf"0\.\d{{4}} \(logged by the trial: 0\.5000\) on 50 images, cifar10 test split of "
                        rf"{cifar_dir}", out["test_acc"])
    assert sum(line.split()[:1] == [name] for line in out["out"].splitlines() for name in CLASSES) == 10
    trained_on(tmp_path / "nodata")
    with pytest.raises(UsageError, match=r"nodata/cifar-10-batches-py/batches.meta: missing"):
        best("ent/proj/swp", True, None)


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_user_mistakes_are_one_line_naming_the_thing(tmp_path, sweep, mocker):
    with pytest.raises(UsageError) as e:
        best(str(tmp_path / "nowhere"), False, None)
    assert "nowhere: neither a local sweep folder (no sweep.db in it) nor ENTITY/PROJECT/SWEEP_ID" in one_line(e)
    with pytest.raises(UsageError) as e:
        best(str(tmp_path), False, None)
    assert f"{tmp_path}: no local sweep here" in one_line(e)

    no_runs = tmp_path / "copy"  # the sweep's state without its runs: no checkpoint anywhere
    no_runs.mkdir()
    shutil.copy(sweep.dir / "sweep.db", no_runs / "sweep.db")
    with pytest.raises(UsageError) as e:
        best(str(no_runs), False, None)
    assert f"trial {sweep.trial.id}: no best model" in one_line(e)

    store = Store(sqlite_url(tmp_path))
    store.join("s1", {"method": "grid", "metric": {"name": "val_acc", "goal": "maximize"}})
    store.add_trial("t1", {"lr": {"value": 0.1}}, "c")
    store.update("t1", state="failed")
    with pytest.raises(UsageError) as e:
        best(str(tmp_path), False, None)
    assert "no finished or stopped trial has a value of val_acc" in one_line(e)

    # How W&B's public API says "no such sweep" (or none this key may see)
    api = mocker.patch("wandb.Api").return_value
    api.sweep.side_effect = wandb.errors.CommError("Could not find sweep swp", ValueError("not found"))
    api.settings = {"base_url": "https://api.wandb.ai"}
    with pytest.raises(UsageError) as e:
        best("ent/proj/swp", False, None)
    assert one_line(e) == "ent/proj/swp: no such sweep on W&B at https://api.wandb.ai, or this API key cannot see it"
