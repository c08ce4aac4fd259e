"""Whether this Python can run trials: torch and torchvision that belong together, and trials that start
under this same Python. Standard library only: read from the packages' installed metadata, because a
mismatched pair fails on import, which is the thing to say before it happens.

pip can leave a pair that does not match and exit 0: a CPU torch beside a CUDA torchvision (when the CPU
wheel index could not be reached for one of them), or versions of two releases. The fix keeps a CPU box on
CPU wheels: it reinstalls only the torchvision of the installed torch, from the CPU index where that torch
is a CPU build (`pip install --upgrade torch torchvision` would pull about 6 GB of CUDA libraries instead).
"""

import functools
import os
import shutil
import sys
from importlib import metadata
from pathlib import Path

PYTORCH_INDEX = "https://download.pytorch.org/whl"  # +cpu wheels under /cpu, +cu126 under /cu126
VISION_MINOR_OFFSET = 15  # torch 2.N ships with torchvision 0.(N + 15): 2.14 with 0.29


@functools.cache  # read once a process: a warm worker reads it for every trial it forks
def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _is_cpu_build(version: str) -> bool:
    return version.partition("+")[2] == "cpu"


def pair_fix(torch_version: str) -> str:
    """The pip command that puts the torchvision of this torch beside it, leaving torch as it is: built for the
    same device (a local tag, +cpu or +cu126, comes from PyTorch's index of that name). A plain `==0.29.1`
    would accept the torchvision that is there, whatever it was built for: the tag is spelled out."""
    release, _, tag = torch_version.partition("+")
    minor, patch = (release.split(".") + ["0", "0"])[1:3]
    vision = f"0.{int(minor) + VISION_MINOR_OFFSET}.{patch}" + (f"+{tag}" if tag else "")
    index = f" --index-url {PYTORCH_INDEX}/{tag}" if tag else ""
    return f"pip install --force-reinstall --no-deps torchvision=={vision}{index}"


def matching_pair_command() -> str:
    """The pip command that installs the torchvision of the installed torch (both, if torch is missing)."""
    torch_version = _installed("torch")
    return pair_fix(torch_version) if torch_version else "pip install torch torchvision"


def pair_problem(torch_version: str | None = None, vision_version: str | None = None) -> str | None:
    """Why the installed torch and torchvision cannot work together, with the fix; None when they can (or when
    one is missing: the import error names it)."""
    torch_version = torch_version or _installed("torch")
    vision_version = vision_version or _installed("torchvision")
    if torch_version is None or vision_version is None:
        return None
    torch_minor = torch_version.partition("+")[0].split(".")[1:2]
    vision_minor = vision_version.partition("+")[0].split(".")[1:2]
    if _is_cpu_build(torch_version) != _is_cpu_build(vision_version):
        why = "one is a CPU build, the other a CUDA one"
    elif torch_minor and vision_minor and int(vision_minor[0]) != int(torch_minor[0]) + VISION_MINOR_OFFSET:
        why = "they are of different releases"
    else:
        return None
    return f"torch {torch_version} and torchvision {vision_version} do not match ({why}); fix: " \
           f"{pair_fix(torch_version)}"


def this_python_first(env: dict) -> dict:
    """`env` with this interpreter's folder first on PATH, as activating its environment would do, so that the
    `python` of a trial's command (W&B's ${interpreter}) is the Python running this command, with the packages
    installed for it, and not another one found first on PATH."""
    folder = Path(sys.executable).parent
    path = env.get("PATH", os.defpath)
    if not (folder / "python").exists() or _python_on(path) == folder / "python":  # nothing to change
        return env
    return {**env, "PATH": f"{folder}{os.pathsep}{path}"}


def _python_on(path: str) -> Path | None:
    # Not resolved: a virtual environment's python is a link to its base interpreter, and only where the link
    # lies (next to its pyvenv.cfg) says which packages it sees.
    found = shutil.which("python", path=path)
    return None if found is None else Path(os.path.abspath(found))


def interpreter_hint(env: dict) -> str:
    """For a trial that could not import a package: which `python` its command got, and which runs this one."""
    found = _python_on(env.get("PATH", os.defpath))
    if found == Path(sys.executable).parent / "python":
        return "fix: install what provides it (pip install -e . installs this project's dependencies)"
    return (f"the trial ran `python` = {found or 'none on PATH'}, this command runs {sys.executable}; fix: "
            "activate the environment that has the packages, or install them for that python")
