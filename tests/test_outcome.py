"""What a trial's end means (agent/controller/outcome.py): its state and the reason every view shows."""

import os
import shutil
import sys

import pytest

from agent.controller.outcome import environment_error, outcome, own_error
from agent.install import pair_problem, this_python_first

WANDB_TAIL = ("\x1b[1;34mwandb\x1b[0m: \n\x1b[1;34mwandb\x1b[0m: You can sync this run to the cloud by running:\n"
              "\x1b[1;34mwandb\x1b[0m: \x1b[1mwandb sync /tmp/D/wandb/offline-run-x\x1b[0m\n"
              "\x1b[1;34mwandb\x1b[0m: Find logs at: \x1b[1;35m/tmp/D/wandb/offline-run-x/logs\x1b[0m\n")
TRACEBACK = """Traceback (most recent call last):
  File "train.py", line 3, in <module>
    import torchvision
  File "/site/torchvision/__init__.py", line 9, in <module>
    from .extension import _HAS_OPS
RuntimeError: operator torchvision::nms does not exist
"""


@pytest.mark.parametrize("output, expected", [
    ("epoch 1\n" + TRACEBACK + WANDB_TAIL, "RuntimeError: operator torchvision::nms does not exist"),
    ("Traceback (most recent call last):\n  File \"a.py\", line 1\nKeyError: 'x'\n\nDuring handling of the above "
     "exception, another exception occurred:\n\n" + TRACEBACK,
     "RuntimeError: operator torchvision::nms does not exist"),
    ("agent run: lr='-1': Input should be greater than 0\n" + WANDB_TAIL,
     "agent run: lr='-1': Input should be greater than 0"),
    ("\x1b[31mCUDA out of memory\x1b[0m\n", "CUDA out of memory"),
    (WANDB_TAIL, "no output"),
    ("", "no output"),
])
def test_a_trials_reason_is_its_own_error_without_colour_codes(output, expected):
    assert own_error(output) == expected


def test_errors_every_trial_would_hit_come_with_their_fix(mocker):
    mocker.patch("agent.install._installed", {"torch": "2.14.1+cpu", "torchvision": "0.29.1"}.get)
    env = this_python_first(dict(os.environ))
    assert environment_error("RuntimeError: operator torchvision::nms does not exist", env).endswith(
        "(torch and torchvision do not match; fix: pip install --force-reinstall --no-deps torchvision==0.29.1+cpu "
        "--index-url https://download.pytorch.org/whl/cpu)")  # a CPU torch stays on CPU wheels
    assert "fix: install what provides it" in environment_error("ModuleNotFoundError: No module named 'timm'", env)
    assert environment_error("ValueError: x=0.7 is above FAIL_ABOVE", env) is None


def test_a_trial_that_ran_another_python_is_told_which_and_why(tmp_path):
    # The first `python` on a PATH where this environment is not active: another environment's, a link to the
    # same base interpreter as this one's (as virtual environments are), seeing other packages all the same.
    other = tmp_path / "python"
    other.symlink_to(os.path.realpath(sys.executable))
    reason = environment_error("ModuleNotFoundError: No module named 'wandb'", {"PATH": str(tmp_path)})
    assert f"the trial ran `python` = {other}, this command runs {sys.executable}; fix: activate the environment" \
        in reason
    assert shutil.which("python", path=this_python_first({"PATH": str(tmp_path)})["PATH"]) != str(other)


@pytest.mark.parametrize("torch, vision, expected", [
    ("2.14.1+cpu", "0.29.1", "one is a CPU build, the other a CUDA one); fix: pip install --force-reinstall "
                             "--no-deps torchvision==0.29.1+cpu --index-url https://download.pytorch.org/whl/cpu"),
    ("2.14.1", "0.29.1+cpu", "one is a CPU build, the other a CUDA one); fix: pip install --force-reinstall "
                             "--no-deps torchvision==0.29.1"),
    ("2.14.1+cu126", "0.28.0+cu126", "they are of different releases); fix: pip install --force-reinstall "
                                     "--no-deps torchvision==0.29.1+cu126 --index-url https://download.pytorch.org/whl/cu126"),
    ("2.14.1+cpu", "0.29.1+cpu", None), ("2.14.1", "0.29.1", None),
])
def test_a_torch_and_torchvision_of_two_builds_or_releases_are_named_with_the_fix(torch, vision, expected):
    problem = pair_problem(torch, vision)
    assert problem == expected or problem.endswith(expected)


def ended(code=0, stop=False, paused=False, summary=None, value=0.5, history=(0.5,), output=""):
    return outcome(code, stop, paused, summary or {}, "val_acc", value, list(history), output)


def test_a_trial_is_stopped_only_if_the_stop_cut_its_training_short():
    assert ended(stop=True, summary={"ended_by": "stop"}) == ("stopped", None)
    assert ended(stop=True) == ("stopped", None)  # a program that does not say
    assert ended(code=-15, stop=True) == ("stopped", None)  # killed by the stop
    assert ended(stop=True, summary={"ended_by": "completed"}) == ("finished", None)  # its last epoch was done


def test_a_diverged_trial_is_finished_with_the_step_it_diverged_at():
    assert ended(summary={"ended_by": "diverged", "diverged_at_step": 3}, value=None, history=()) == \
        ("finished", "diverged at step 3")
    assert ended(value=None, history=()) == ("failed", "no val_acc logged")
    assert ended(value=None, history=(float("nan"),)) == ("failed", "val_acc is NaN or infinite")


def test_a_paused_trial_is_paused_unless_it_says_it_completed():
    paused = ("paused", None)  # the controller says why and how to resume
    assert ended(code=138, paused=True, summary={"ended_by": "completed"}) == paused  # preempted, state saved
    assert ended(code=-9, paused=True) == paused
    assert ended(paused=True) == paused  # a program that exits 0 on its stop, saying nothing
    assert ended(paused=True, summary={"ended_by": "completed"}) == ("finished", None)
    assert ended(code=1, output=TRACEBACK) == ("failed", "exit code 1: RuntimeError: operator torchvision::nms "
                                                         "does not exist")
