"""Why a run ends early: what each signal, and W&B's own stop, asks of it.

  SIGTERM   stop     a sweep's stop (hyperband, the Stop button: `wandb agent` and the local
                     controller both send it). Fit ends after the current batch; the best model so
                     far is tested and logged; the run finishes with exit code 0.
  W&B stop  stop     the same, when the SDK reports the run stopped from the web page.
  SIGINT    interrupt  Ctrl-C: as a stop, but the exit code is 130. A second Ctrl-C exits at once.
  SIGUSR1   preempt  the box is going away (`wandb agent --forward-signals` forwards it; `agent
                     launch` and `agent local` send it): the full training state is saved where a
                     resume continues exactly, the run is marked preempting and exits non-zero, so
                     W&B requeues it.

The handlers only record the request; where fit ends is decided by EndFitOnRequest
(checkpoints.py) at batch and epoch boundaries, and by train() after fit. A preemption is never
downgraded by a later stop (`agent launch` sends SIGUSR1, then SIGTERM). Light on purpose (no
torch): `agent run` listens before it imports.
"""

import os
import signal
import threading

STOP, INTERRUPT, PREEMPT = "stop", "interrupt", "preempt"
# How a run's training ended, beside STOP and INTERRUPT (its summary's `ended_by`): all its epochs, early
# stopping, or a loss that stopped being finite. The local controller reads it: these three are finished.
COMPLETED, EARLY_STOPPING, DIVERGED = "completed", "early_stopping", "diverged"
MEANINGS = {signal.SIGTERM: STOP, signal.SIGINT: INTERRUPT, signal.SIGUSR1: PREEMPT}
RANK = {None: 0, STOP: 1, INTERRUPT: 2, PREEMPT: 3}
BY_RANK = {rank: reason for reason, rank in RANK.items()}
# A stopped run finished its job; an interrupted one says so as shells do; a preempted one must exit
# non-zero for W&B to requeue it, and says which signal ended it.
EXIT_CODES = {None: 0, STOP: 0, INTERRUPT: 130, PREEMPT: 128 + signal.SIGUSR1}


def completed_exit_code(reason: str | None) -> int:
    """The exit code of a run that did all its work: a preemption notice that came after the last
    artifact was logged leaves nothing to resume, so that run is finished, not requeued."""
    return 0 if reason == PREEMPT else EXIT_CODES[reason]


class StopRequests:
    """Records the strongest request to end early; `reason` is None, STOP, INTERRUPT or PREEMPT."""

    def __init__(self):
        self.reason: str | None = None
        self.previous: dict = {}

    def request(self, reason: str) -> None:
        if RANK[reason] > RANK[self.reason]:
            self.reason = reason

    def _on_signal(self, signum, frame):
        meaning = MEANINGS[signum]
        if meaning == INTERRUPT and self.reason == INTERRUPT:
            os._exit(130)  # a second Ctrl-C: the user wants out now, whatever is left unsaved
        self.request(meaning)

    def wandb_stop(self) -> None:
        """For `wandb.Settings(stop_fn=...)`: called from an SDK thread instead of interrupting the main one."""
        self.request(STOP)

    def listen(self) -> None:
        """(Re)installs the handlers; only the main thread can. Lightning replaces SIGTERM's during fit, and
        EndFitOnRequest takes it back."""
        if threading.current_thread() is threading.main_thread():
            handlers = {s: signal.signal(s, self._on_signal) for s in MEANINGS}
            self.previous = self.previous or handlers

    def __enter__(self):
        self.listen()
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}
