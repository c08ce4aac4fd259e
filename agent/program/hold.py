"""A test hook: the trial waits at a named phase until the test lets it go, so that a signal the test sends
meanwhile lands exactly there, not wherever the trial happens to be when it arrives.

contract.HOLD_ENV = "PHASE:N FIFO": at the N-th time the trial reaches PHASE it creates FIFO.held, then reads the
named pipe FIFO (made by the test), which blocks until the test writes to it. A signal that comes meanwhile is
handled as it would be at that point (the read resumes after the handler). Phases: `train_batch` (the end of a
training batch, before fit checks for requests), `validation` (the end of an epoch's validation), `setup`,
`test` (before the test pass), `logging` (before the prediction images), `artifact` (each best model, before
it is logged). Unset, the hook does nothing.
"""

import os
from collections import Counter
from pathlib import Path

from agent import contract


class Hold:
    def __init__(self, phase: str | None = None, occurrence: int = 1, fifo: Path | None = None):
        self.phase, self.occurrence, self.fifo = phase, occurrence, fifo
        self.seen: Counter = Counter()

    @classmethod
    def from_env(cls) -> "Hold":
        spec = os.environ.get(contract.HOLD_ENV)
        if not spec:
            return cls()
        where, fifo = spec.split(" ", 1)
        phase, _, occurrence = where.partition(":")
        return cls(phase, int(occurrence or 1), Path(fifo))

    def at(self, phase: str) -> None:
        self.seen[phase] += 1
        if phase == self.phase and self.seen[phase] == self.occurrence:
            Path(f"{self.fifo}.held").touch()
            with open(self.fifo) as fifo:  # blocks until the test writes
                fifo.read()

    def callback(self):
        """The Lightning callback that holds at fit's phases (Lightning is imported here: not before a trial
        listens for signals)."""
        import lightning.pytorch as pl

        hold = self

        class HoldInFit(pl.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                hold.at("train_batch")

            def on_validation_end(self, trainer, pl_module):
                hold.at("validation")

        return HoldInFit()
