"""A test hook: the trial waits at a named phase until the test lets it go, so that a signal the test sends
meanwhile lands exactly there, not wherever the trial happens to be when it arrives.

contract.HOLD_ENV = "PHASE:N FIFO": at the N-th time the trial reaches PHASE it creates FIFO.held, then waits
until the test writes to the named pipe FIFO (made by the test). A signal that comes meanwhile is handled as it
would be at that point, then its name is added to FIFO.signals, a line each: the test's word that the signal
has reached the trial, which a relayed signal (a warm trial's client, W&B's agent, `agent local`) gives no
other way. A FIFO the test has removed ends the hold: trials that inherit its environment later (the next
trial of a sweep, a requeued run's resume) go on. Phases: `train_batch` (the end of a training batch, before
fit checks for requests), `validation` (the end of an epoch's validation), `setup`, `test` (before the test
pass), `logging` (before the prediction images), `artifact` (each best model, before it is logged). Unset,
the hook does nothing.
"""

import os
import select
import signal
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
            self.wait()

    def wait(self) -> None:
        # Opened without blocking, before FIFO.held: the test's write never waits for this reader. Until a
        # writer has come, the FIFO is not readable (Linux reports no hang-up to a reader no writer has met).
        try:
            fifo = os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:  # the test has ended the hold
            return
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        # Python's C-level handler writes each signal's number here. The trial's Python handler has run before
        # the name is written down: when select is interrupted, before it is retried; at the latest on
        # entering handled() (the signal taken by another thread).
        previous = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        try:
            Path(f"{self.fifo}.held").touch()
            while True:
                ready = select.select([fifo, wake_r], [], [])[0]
                if wake_r in ready:
                    self.handled(os.read(wake_r, 64))
                if fifo in ready:
                    return
        finally:
            signal.set_wakeup_fd(previous)
            for fd in (fifo, wake_r, wake_w):
                os.close(fd)

    def handled(self, signums: bytes) -> None:
        with open(f"{self.fifo}.signals", "a") as f:
            f.writelines(f"{signal.Signals(n).name}\n" for n in signums)

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
