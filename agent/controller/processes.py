"""The processes a controller starts and must not leave behind, and the warm workers of its slots.

A warm worker (`python -m agent.program.warm SOCKET`, agent/program/warm.py) imports torch, Lightning and wandb
once and forks each trial of our program that its slot starts; `agent local` and `agent launch` start one per
slot and wait until it is ready (its socket appears). One that cannot start only means cold trials.
"""

import ctypes
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

READY_TIMEOUT = 300  # seconds a worker may take to import everything on a slow, busy box


def die_with_parent(signum: int) -> None:
    """In a child before it runs: `signum` reaches it when its parent dies (PR_SET_PDEATHSIG), so that a
    controller killed with SIGKILL leaves nothing running unseen."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signum)


class WarmWorker:
    """`python -m agent.program.warm` for one slot, its output in `log`. Socket paths are short (the kernel
    allows 108 bytes), so they live in a temporary folder, not in the sweep's."""

    def __init__(self, name: str, env: dict, log: Path):
        self.folder = tempfile.mkdtemp(prefix="agent-warm-")
        self.socket = os.path.join(self.folder, f"{name}.sock")
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "agent.program.warm", self.socket], env=env, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=lambda: die_with_parent(signal.SIGTERM))

    def ready(self) -> bool | None:
        """True once it listens, False if it exited (its trials run cold), None while it is starting."""
        if os.path.exists(self.socket):
            return True
        return False if self.proc.poll() is not None else None

    def stop(self) -> None:
        """Takes no new trial; returns once its running trials have ended and it has exited."""
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait()
        for leftover in Path(self.folder).iterdir():
            leftover.unlink()
        os.rmdir(self.folder)
