"""`agent validate` in process: each wrong sweep YAML gets its line, each runnable form of ours its config checks."""


import pytest
import yaml

from agent.__main__ import main
from agent.errors import UsageError
from agent.program.run import make_config
from agent.program.validate import validate
from tests.conftest import write_image_folder
from tests.helpers import REPO

OURS = ["${env}", "${interpreter}", "-m", "agent", "run"]
FIX = ("use the command of sweeps/bayes.yaml, a block list: `command:` then the lines `- ${env}`, `- ${interpreter}`, "
       "`- -m`, `- agent`, `- run`, `- ${args}`")


def write_sweep(tmp_path, **changes):
    """sweeps/bayes.yaml with top-level keys replaced (None: removed)."""
    sweep = yaml.safe_load((REPO / "sweeps" / "bayes.yaml").read_text())
    sweep.update(changes)
    sweep = {key: value for key, value in sweep.items() if value is not None}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return str(path)


def problems(tmp_path, capsys, **changes) -> tuple[int, list[str]]:
    code = validate([write_sweep(tmp_path, **changes)])
    return code, [line.split(": ", 1)[1] for line in capsys.readouterr().out.splitlines()]


@pytest.mark.parametrize("changes, expected", [
    ({"parameters": {"learning_rate": {"values": [0.1]}}},
     "parameters.learning_rate: not a config key; did you mean 'lr'?"),
    ({"parameters": {"dropout": {"min": 0.0, "max": 1.0}}}, "parameters.dropout: dropout=1.0"),
    ({"parameters": {"optimizer": {"values": ["adam", "lion"]}}}, "parameters.optimizer: optimizer='lion'"),
    ({"parameters": {"model": {"values": ["seed_cnn", "timm/resnt18"]}}},
     "parameters.model: model='timm/resnt18': not a timm model; did you mean 'timm/resnet18'"),
    ({"parameters": {"image_size": {"values": [32, 64]}}},
     "parameters.image_size: image_size=64: cifar10 images are 32x32; other sizes need dataset=imagefolder"),
    ({"parameters": {"batch_size": {"distribution": "int_uniform", "min": 0, "max": 64}}}, "batch_size=0"),
    ({"parameters": {"lr": {"distribution": "uniform", "min": 0.0, "max": 0.1}}}, "parameters.lr: lr=0.0"),
    ({"parameters": {"lr": 0.1}}, "parameters.lr: expected a mapping, e.g. {value: 0.1}"),
    ({"parameters": ["lr"]}, "parameters: expected a mapping of names to specs, got list"),
    ({"metric": {"name": "val_loss", "goal": "minimize"}}, "must equal the runs' monitor ('val_acc')"),
    ({"metric": {"name": "val_acc", "goal": "minimize"}}, "metric.goal='minimize': val_acc must be maximized"),
    ({"metric": {"name": "accuracy", "goal": "maximize"}}, "not a key the program logs"),
    ({"metric": None}, "metric: method bayes and early_terminate need metric.name and metric.goal"),
    ({"metric": None, "early_terminate": None}, "metric: method bayes needs metric.name and metric.goal"),
    ({"metric": None, "method": "random"}, "metric: early_terminate needs metric.name and metric.goal"),
    ({"method": "bayesian"}, "method: 'bayesian' is not one of"),
    ({"run_cap": 0}, "run_cap: 0 is less than or equal to the minimum of 0"),
    ({"method": "grid", "early_terminate": None, "parameters": {"lr": {"distribution": "uniform", "min": 1e-4,
                                                                        "max": 0.1}}},
     "W&B's sweep engine refuses it: Parameter lr is a disallowed type with grid search"),
    ({"command": None}, f"command: missing, and no program for W&B's default `${{env}} ${{interpreter}} "
                        f"${{program}} ${{args}}`; to run ours, {FIX}"),
    ({"command": None, "program": "agent/program/run.py"},
     "program: 'agent/program/run.py': not how our program starts"),
    ({"command": None, "program": "-m agent run"}, "program: '-m agent run': not how our program starts"),
    ({"command": ["${interpreter} -m agent run ${args}"]}, "W&B replaces a macro only as a whole item"),
    ({"command": ["python", "-m agent run", "${args}"]}, "our program starts only as the items -m, agent, run"),
    ({"command": [*OURS, "${arg}"]}, "command: ${arg}: not a macro W&B's agent knows (it passes nothing); "
                                     "did you mean 'args'?"),
    ({"command": ["${env}", "${interpreter}", "${program}", "${args}"]},
     "command: ${program} is used but program: is not set"),
    *[({"command": [*OURS, f"${{{macro}}}"]}, f"command: ${{{macro}}}: `agent run` cannot parse the flags it gives")
      for macro in ("args_no_hyphens", "args_json", "args_json_file", "args_dict", "args_override_hydra")],
])
def test_validate_names_each_problem(tmp_path, capsys, changes, expected):
    code, lines = problems(tmp_path, capsys, **changes)
    assert code == 1 and any(expected in line for line in lines), lines


@pytest.mark.parametrize("changes", [
    {"command": ["python", "-m", "agent", "run", "${args}"]},
    {"command": [*OURS, "${args_no_equals}"]},
    {"command": [*OURS, "${args_no_boolean_flags}"]},
    {"command": OURS},  # the sweep's values reach the run through W&B's config
    {"command": [*OURS, "--data_dir=${envvar:CIFAR10_DATA_DIR}", "${args}"]},
    {"command": ["${env}", "${interpreter}", "-m", "${program}", "run", "${args}"], "program": "agent"},
    {"metric": None, "method": "random", "early_terminate": None},
    {"metric": {"name": "val_loss", "goal": "minimize"},
     "parameters": {"monitor": {"value": "val_loss"}, "lr": {"values": [0.1, 0.01]}}},  # bayes needs one to search
])
def test_runnable_forms_of_our_program_are_ok(tmp_path, capsys, changes):
    assert problems(tmp_path, capsys, **changes) == (0, ["ok"])


FORMS = {
    "python -m agent run": {"command": ["python", "-m", "agent", "run", "${args}"]},
    "args_no_equals": {"command": [*OURS, "${args_no_equals}"]},
    "-m ${program} run": {"command": ["${env}", "${interpreter}", "-m", "${program}", "run", "${args}"],
                          "program": "agent"},
    "program agent/program/run.py": {"command": None, "program": "agent/program/run.py"},
    "one item": {"command": ["${env} ${interpreter} -m agent run ${args}"]},
}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("changes, expected", [
    ({"metric": {"name": "accuracy", "goal": "maximize"}}, "metric.name='accuracy': not a key the program logs"),
    ({"parameters": {"lr_rate": {"value": 0.1}}}, "parameters.lr_rate: not a config key; did you mean 'lr'?"),
    ({"parameters": {"lr": {"value": -0.1}}}, "parameters.lr: lr=-0.1: Input should be greater than 0"),
])
def test_each_form_of_our_program_gets_the_config_checks(tmp_path, capsys, form, changes, expected):
    code, lines = problems(tmp_path, capsys, **FORMS[form], **changes)
    assert code == 1 and any(line.startswith(expected) for line in lines), lines


def test_foreign_program_gets_only_the_wandb_checks(tmp_path, capsys):
    path = tmp_path / "foreign.yaml"
    path.write_text(yaml.safe_dump({"program": "train.py", "method": "bayes",
                                    "metric": {"name": "loss", "goal": "minimize"},
                                    "parameters": {"x": {"min": 0.0, "max": 1.0}}}))
    assert validate([str(path)]) == 0, capsys.readouterr().out


def test_unreadable_files_are_one_line_each_not_raised(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("method: [unclosed")
    (tmp_path / "flow.yaml").write_text("method: grid\ncommand: [${env}, ${interpreter}, -m, agent, run, ${args}]\n")
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00")
    (tmp_path / "empty.yaml").write_text("# nothing but a comment\n")
    (tmp_path / "folder.yaml").mkdir()
    names = ["bad.yaml", "flow.yaml", "binary.yaml", "empty.yaml", "folder.yaml", "missing.yaml"]
    assert validate([str(tmp_path / name) for name in names]) == 1
    assert capsys.readouterr().out.splitlines() == [f"{tmp_path / name}: {problem}" for name, problem in zip(names, [
        "not valid YAML (while parsing a flow sequence)",
        "not valid YAML (while parsing a flow sequence, line 2: inside [...] a `{` starts a mapping, so ${...} "
        "macros there must be quoted (\"${env}\") or the list written as a block, one `- ${env}` per line, as "
        "sweeps/bayes.yaml does)",
        "not UTF-8 text; expected a sweep YAML file",
        "empty; expected sweep settings (method, metric, parameters, command)",
        "a directory; expected a sweep YAML file",
        "cannot read (No such file or directory)"])]


def test_a_misspelt_key_gets_the_close_one_else_every_key():
    with pytest.raises(UsageError, match=r"^unknown key 'batchsize'; did you mean 'batch_size'\?$"):
        make_config({"batchsize": "64"})
    with pytest.raises(UsageError, match=r"^unknown key 'colour'; allowed: data_dir, dataset, .*, project$"):
        make_config({"colour": "red"})


def folder_sweep(tmp_path, data_dir: str) -> str:
    return write_sweep(tmp_path, method="random", parameters={
        "dataset": {"value": "imagefolder"}, "data_dir": {"value": data_dir},
        "cache_dir": {"value": str(tmp_path / "cache")}, "lr": {"values": [0.1, 0.01]}})


def test_validate_and_create_scan_an_image_folder_on_this_box_relative_to_where_it_runs(tmp_path, capsys,
                                                                                       monkeypatch):
    write_image_folder(tmp_path / "pets", {"train": 1}, classes=("cat",))
    monkeypatch.chdir(tmp_path)
    expected = (f"parameters.data_dir: {tmp_path}/pets/train: one class folder (cat); a classifier needs 2 or more: "
                "expected train/<class>/<image>, a folder per class")
    assert validate([folder_sweep(tmp_path, "pets")]) == 1
    assert capsys.readouterr().out == f"{tmp_path}/sweep.yaml: {expected}\n"
    monkeypatch.setattr("agent.online.launch.create", lambda *args: pytest.fail("W&B was called"))
    assert main(["create", folder_sweep(tmp_path, "pets")]) == 2
    assert capsys.readouterr().err == f"agent create: {tmp_path}/sweep.yaml: {expected}\n"


def test_validate_only_scans_and_says_which_folder_it_could_not_check_on_this_box(tmp_path, capsys):
    root = write_image_folder(tmp_path / "pets", {"train": 1})
    for image in root.glob("train/*/*"):
        image.write_bytes(b"not an image")  # the trials would refuse it, once they decode it
    away = str(tmp_path / "on-the-gpu-boxes")
    for data_dir, said in ((str(root), ""), (away, f" (parameters.data_dir {away!r}: not on this box; checked where "
                                                      "it runs)")):
        assert validate([folder_sweep(tmp_path, data_dir)]) == 0
        assert capsys.readouterr().out.endswith(f"sweep.yaml: ok{said}\n")
    assert not (tmp_path / "cache").exists()  # nothing decoded


def test_validate_refuses_a_pretrained_path_on_this_box_that_holds_another_networks_weights(tmp_path, capsys):
    import timm
    from safetensors.torch import save_file

    save_file(timm.create_model("test_resnet").state_dict(), tmp_path / "resnet.safetensors")
    parameters = {"dataset": {"value": "synthetic"}, "model": {"values": ["timm/test_resnet", "timm/test_vit"]},
                  "pretrained_path": {"value": str(tmp_path / "resnet.safetensors")},
                  "drop_path_rate": {"value": 0.1}}  # timm's own fields beside a model of several timm networks
    assert validate([write_sweep(tmp_path, method="random", parameters=parameters)]) == 1
    [line] = capsys.readouterr().out.splitlines()  # the resnet's own weights pass; the vit is refused
    assert line.startswith(f"{tmp_path}/sweep.yaml: parameters.pretrained_path: "
                           f"'{tmp_path / 'resnet.safetensors'}': not weights of timm/test_vit")
