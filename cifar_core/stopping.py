"""Why a run ends early: what each signal, and W&B's own stop, asks of it.

  SIGTERM   stop     a sweep's stop (hyperband, the Stop button: `wandb agent` and the local
                     controller both send it). Fit ends at the next batch; the best model so
                     far is tested and logged; the run finishes with exit code 0.
  W&B stop  stop     the same, when the SDK reports the run stopped from the web page.
  SIGINT    interrupt  Ctrl-C: as a stop, but the exit code is 130. A second Ctrl-C exits at once.
  SIGUSR1   preempt  the box is going away (`wandb agent --forward-signals` forwards it; `agent
                     launch` sends it on SIGTERM): the full training state is saved and logged,
                     the run is marked preempting and exits non-zero, so W&B requeues it.

Lightning ends fit at a batch boundary only for SIGTERM, so every other request is turned
into a SIGTERM to this process; the request itself says what it meant. A preemption is never
downgraded by a later stop. Light on purpose (no torch): `agent run` listens before it imports.
"""

import os
import signal
import threading

STOP, INTERRUPT, PREEMPT = "stop", "interrupt", "preempt"
MEANINGS = {signal.SIGTERM: STOP, signal.SIGINT: INTERRUPT, signal.SIGUSR1: PREEMPT}
RANK = {None: 0, STOP: 1, INTERRUPT: 2, PREEMPT: 3}
# A stopped run finished its job; an interrupted one says so as shells do; a preempted one must exit
# non-zero for W&B to requeue it, and says which signal ended it.
EXIT_CODES = {None: 0, STOP: 0, INTERRUPT: 130, PREEMPT: 128 + signal.SIGUSR1}


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
        if signum != signal.SIGTERM:
            signal.raise_signal(signal.SIGTERM)  # the one signal Lightning ends fit on

    @property
    def listening(self) -> bool:
        """Whether our handlers are installed (only the main thread can install them)."""
        return bool(self.previous)

    def wandb_stop(self) -> None:
        """For `wandb.Settings(stop_fn=...)`: called from an SDK thread instead of interrupting the main one."""
        self.request(STOP)
        if self.listening:  # else a SIGTERM would kill the process on the spot
            os.kill(os.getpid(), signal.SIGTERM)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._on_signal) for s in MEANINGS}
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}
