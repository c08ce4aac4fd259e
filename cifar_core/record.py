"""Where a run reports, beside its checkpoints folder: `train(config, record=...)`.

The base keeps nothing and logs nothing: a plain `train(config)` (a library call, a benchmark), and ranks
1..N-1 of a trial on several devices, which leave all reporting to rank 0. `agent run` passes its W&B run's
(agent/program/run.py), which names what it logs as the rest of the service reads it. Light (no torch):
`agent run` subclasses it before it imports.
"""

import os
import sys
from pathlib import Path


class Record:
    logger = False  # Lightning's logger of the per-step and per-epoch metrics; False: none

    def note(self, values: dict) -> None:
        """Facts of the run for its summary: its data, where its time went, where its weights came from."""

    def best_model(self, path: Path, metadata: dict) -> None:
        """The network saved at `path` is the best so far (each improvement, then the tested best): keep it
        before the next improvement overwrites the file."""

    def examples(self, images: list, predicted: list[str], labels: list[str], step: int) -> None:
        """The best model's predictions on some validation images (H x W x 3 uint8 arrays), once per run."""

    def preempted(self, state: Path) -> None:
        """A PREEMPT request ended the run, its full state saved at `state`: keep it where a resume finds it."""

    def at(self, phase: str) -> None:
        """train() reaches `phase`: "setup" (before fit), "test" (before the test pass), "logging" (before
        the examples and the final model)."""

    def rank_died(self, message: str) -> None:
        """A rank of the trial died while rank 0 may wait in a collective: say so and end this process."""
        print(message, file=sys.stderr, flush=True)
        os._exit(1)
