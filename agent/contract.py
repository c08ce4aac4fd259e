"""Every name that crosses between the trial program (agent/program, our `python -m agent run`) and the rest of
agent/: the offline controller, the W&B side and the views, which run any W&B program and read ours through
these names only. Standard library only: the controller and the views import this, never the program.

A program that is not ours needs none of it: it is told to stop with SIGTERM and its metrics are whatever it
logs. Ours also saves its state on PREEMPT, says in its summary how its training ended, and logs its best
model and its prediction images under the names below.
"""

import re
import signal

# Environment: set by the controller or `agent launch`, read by the trial program.
WARM_SOCKET_ENV = "AGENT_WARM_SOCKET"  # this slot's warm worker: `agent run` hands itself to it
STORE_ENV = "AGENT_STORE"  # a PostgreSQL store for every `agent local` of the shell, as --store
HOLD_ENV = "AGENT_HOLD"  # tests: "PHASE:N FIFO", the trial waits at PHASE's N-th time until FIFO is written (hold.py)

# Signals a trial gets, and what each asks of ours.
STOP = signal.SIGTERM  # a sweep's stop (hyperband, W&B's Stop button): end, test, log the best model, exit 0
INTERRUPT = signal.SIGINT  # Ctrl-C in a terminal: as STOP, then exit EXIT_INTERRUPTED
PREEMPT = signal.SIGUSR1  # the box is going away, or the controller pauses: save the full state, exit EXIT_PREEMPTED

# Exit codes of ours (0: a run that did its work, stopped or not).
EXIT_FAILED = 1
EXIT_USAGE = 2  # a bad flag, value or data file: the user's to fix, before any training
EXIT_INTERRUPTED = 128 + INTERRUPT
EXIT_PREEMPTED = 128 + PREEMPT  # non-zero, so that W&B requeues the run it marked preempting

# The run's summary: how its training ended.
ENDED_BY = "ended_by"
COMPLETED, EARLY_STOPPING, DIVERGED = "completed", "early_stopping", "diverged"  # it ended on its own
BY_STOP, BY_INTERRUPT = "stop", "interrupt"  # a request cut it short
CUT_SHORT = (BY_STOP, BY_INTERRUPT)
DIVERGED_AT_STEP = "diverged_at_step"  # with DIVERGED: the step whose training loss was not finite
FAILED_RANK = "failed_rank"  # a trial on several devices: which rank died, and how
TEST_ACC = "test_acc"  # the seed's name (cifar_core logs it): the best model's, once tested

# What a trial of ours measures of its best model, at its image size, in eval mode with its test-time augmentation
# (as `best --export` serves it), after its test pass: ordinary metrics, in its history and its summary, that a sweep
# may name as its metric or among its metrics.
PARAMS = "params"  # the network's parameters
FLOPS = "flops"  # floating-point operations per image (torch's flop counter: a multiply-add counts 2)
LATENCY_MS = "latency_ms"  # milliseconds per image at batch 1 on the trial's device: the median of timed calls
LATENCY_MS_BATCH = "latency_ms_batch"  # milliseconds per image at the config's latency_batch
COSTS = (PARAMS, FLOPS, LATENCY_MS, LATENCY_MS_BATCH)

# What the run logs besides its metrics.
MODEL_ARTIFACT = "model-{run_id}"  # type "model", each improvement and the tested best: aliases best, latest
MODEL_FILE = "model.ckpt"  # the network alone in that artifact (checkpoints.save_network)
MODEL_IN_RUN = "checkpoint"  # the artifact's metadata key: the same file in the run's folder, relative to it
BEST_ALIAS = "best"
RESUME_ARTIFACT = "resume-{run_id}"  # type "checkpoint": the full state a preempted run saved
EXAMPLES = "examples"  # the best model's prediction images, captioned as below
CAPTION = "Pred: {predicted}, Label: {label}"
_CAPTION = re.compile(r"Pred: (.*), Label: (.*)")


def parse_caption(text: str) -> tuple[str, str] | None:
    """(predicted, label) of a caption written as CAPTION, or None."""
    match = _CAPTION.fullmatch(text)
    return (match[1], match[2]) if match else None


# A trial's states in the controller's store, in the order tables count them.
FINISHED, RUNNING, PENDING, PAUSED, FAILED, CRASHED, STOPPED = (
    "finished", "running", "pending", "paused", "failed", "crashed", "stopped")
STATES = (FINISHED, RUNNING, PENDING, PAUSED, FAILED, CRASHED, STOPPED)
LIVE = (PENDING, RUNNING)
