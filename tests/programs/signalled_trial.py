"""A sweep trial that only waits for signals, for the controller's Ctrl-C tests.

Touches $MARKS/$WANDB_RUN_ID.started once its SIGTERM handler is in place and
$MARKS/$WANDB_RUN_ID.sigterm on each SIGTERM; then exits 0, or with --mode=stubborn
ignores it, so that only SIGKILL ends it.
"""

import os
import signal
import sys
from pathlib import Path

mark = Path(os.environ["MARKS"]) / os.environ["WANDB_RUN_ID"]
stubborn = "--mode=stubborn" in sys.argv[1:]


def on_sigterm(signum, frame):
    Path(f"{mark}.sigterm").touch()
    if not stubborn:
        sys.exit(0)


signal.signal(signal.SIGTERM, on_sigterm)
Path(f"{mark}.started").touch()
while True:
    signal.pause()
