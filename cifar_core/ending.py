"""How a run ends before its last epoch: what a caller may ask (`Requests`; what it listens to is its own:
`agent run` turns signals into requests), and how a fit ended (`Ending`). Light (no torch): `agent run`
listens before it imports. fit.py's callbacks act on the requests at batch and epoch boundaries, the same on
every rank of a trial on several devices (they agree on the strongest request first):

  STOP, INTERRUPT  fit ends after the current batch, of training or of validation; the best model so far is
                   tested and reported as at the end.
  PREEMPT          the full state is saved where Lightning's loops restart exactly, after the current
                   training batch, or, for a request in an epoch's last batch or in its validation, at that
                   epoch's end, the validation run to its end first; then fit ends and train() raises
                   Preempted. After fit, train() saves a state whose resume only tests and reports.

A training loss that stops being finite ends fit too: every later step would be wasted.
"""

import enum
from pathlib import Path


class Request(enum.IntEnum):
    """What a caller may ask of a fit; a stronger one is never downgraded by a weaker one that comes later."""
    STOP = 1
    INTERRUPT = 2
    PREEMPT = 3


class Ending(enum.Enum):
    COMPLETED = enum.auto()  # every epoch
    EARLY_STOPPING = enum.auto()  # the monitored metric stopped improving
    DIVERGED = enum.auto()  # the training loss stopped being finite
    STOPPED = enum.auto()  # a STOP request
    INTERRUPTED = enum.auto()  # an INTERRUPT request


BY_REQUEST = {Request.STOP: Ending.STOPPED, Request.INTERRUPT: Ending.INTERRUPTED}


class Requests:
    """The strongest request so far (`reason`: a Request, or None). Nothing listens here: a caller that turns
    signals into requests subclasses it, says which signals in `signals`, and takes them back in `listen()`,
    which fit calls once Lightning has put its own SIGTERM handler in place."""

    signals: tuple[int, ...] = ()

    def __init__(self):
        self.reason: Request | None = None

    def request(self, reason: Request) -> None:
        if self.reason is None or reason > self.reason:
            self.reason = reason

    def listen(self) -> None:
        pass


class Preempted(Exception):
    """A PREEMPT request ended the run: its full state is saved; the caller reports it and exits non-zero."""

    def __init__(self, message: str, state: Path):
        super().__init__(message)
        self.state = state
