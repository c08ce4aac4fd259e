"""`python -m agent run --key=value ...`: the program every sweep runs, and the one owner of how a run ends.

Parses the flags (flags.py), prepares the inputs (inputs.py), starts the W&B run (a sweep's values override
the flags and defaults; the run's final config is validated again), and trains (cifar_core.train) with:

- requests from the signals the contract names (agent/contract.py): STOP, INTERRUPT and PREEMPT, and W&B's
  stop, which the SDK reports instead of interrupting the main thread;
- a W&B record: Lightning's WandbLogger, the summary, the best model as the `model-<id>` artifact as it
  improves, the prediction images, the preempted state as `resume-<id>` with mark_preempting();
- the state of an earlier attempt of the run id to resume from: on disk, or its `resume-<id>` artifact.

Then the run's summary says how training ended, and it finishes with the exit code that says it: 0 for a
run that did its work (stopped or not), EXIT_INTERRUPTED, EXIT_PREEMPTED (W&B requeues it), EXIT_USAGE for
a bad input, EXIT_FAILED for a dead rank or an error.
"""

import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from agent import contract
from agent.errors import RunEndedEarly, UsageError
from agent.program.flags import make_config, parse_flags
from agent.program.hold import Hold
from agent.program.inputs import prepare_data
from cifar_core.config import TrainConfig
from cifar_core.ending import Ending, Request, Requests
from cifar_core.record import Record

MEANINGS = {contract.STOP: Request.STOP, contract.INTERRUPT: Request.INTERRUPT, contract.PREEMPT: Request.PREEMPT}
ENDED_BY = {Ending.COMPLETED: contract.COMPLETED, Ending.EARLY_STOPPING: contract.EARLY_STOPPING,
            Ending.DIVERGED: contract.DIVERGED, Ending.STOPPED: contract.BY_STOP,
            Ending.INTERRUPTED: contract.BY_INTERRUPT}


class SignalRequests(Requests):
    """The contract's signals as requests, listened for from before the imports to the end of the run, so that
    none is lost; a second INTERRUPT exits at once (the user wants out, whatever is left unsaved)."""

    signals = tuple(MEANINGS)

    def __init__(self):
        super().__init__()
        self.previous: dict = {}

    def _on_signal(self, signum, frame):
        if MEANINGS[signum] == Request.INTERRUPT and self.reason == Request.INTERRUPT:
            os._exit(contract.EXIT_INTERRUPTED)
        self.request(MEANINGS[signum])

    def wandb_stop(self) -> None:
        """For `wandb.Settings(stop_fn=...)`: W&B's stop, from an SDK thread."""
        self.request(Request.STOP)

    def listen(self) -> None:
        if threading.current_thread() is threading.main_thread():  # only it may set handlers
            # A signal ignored at start (SIGINT in a background job, nohup) stays ignored, as a warm trial's client
            # keeps it (handoff.py): Ctrl-C in the terminal that started a background run is not for it.
            handlers = {s: signal.signal(s, self._on_signal) for s in self.signals
                        if signal.getsignal(s) != signal.SIG_IGN}
            self.previous = self.previous or handlers

    def __enter__(self):
        self.listen()
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}


class WandbRecord(Record):
    """What a run of ours logs to its W&B run, under the contract's names."""

    def __init__(self, run, hold: Hold):
        self.run, self.hold = run, hold
        self.logger, self.epoch_rows = epoch_rows(run)

    def note(self, values: dict) -> None:
        self.run.summary.update(values)

    def best_model(self, path: Path, metadata: dict) -> None:
        import wandb

        self.hold.at("artifact")
        metadata = {**metadata, contract.MODEL_IN_RUN: str(path.relative_to(Path(self.run.dir).parent))}
        artifact = wandb.Artifact(contract.MODEL_ARTIFACT.format(run_id=self.run.id), type="model", metadata=metadata)
        # The default policy copies the file into W&B's staging area now, so best.ckpt may be overwritten by the
        # next improvement while an upload of this one is still under way.
        artifact.add_file(str(path), name=contract.MODEL_FILE)
        self.run.log_artifact(artifact, aliases=[contract.BEST_ALIAS, "latest"])

    def examples(self, images: list, predicted: list[str], labels: list[str], step: int) -> None:
        captions = [contract.CAPTION.format(predicted=p, label=y) for p, y in zip(predicted, labels)]
        self.logger.log_image(key=contract.EXAMPLES, images=images, caption=captions, step=step)

    def preempted(self, state: Path) -> None:
        import wandb

        artifact = wandb.Artifact(contract.RESUME_ARTIFACT.format(run_id=self.run.id), type="checkpoint",
                                  metadata={"reason": "preempted"})
        # Referenced in place: nothing writes the state again before this process has exited.
        artifact.add_file(str(state), name="resume.ckpt", policy="immutable")
        self.run.log_artifact(artifact, aliases=["latest"])
        self.run.mark_preempting()

    def at(self, phase: str) -> None:
        self.hold.at(phase)

    def rank_died(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)
        self.run.summary[contract.FAILED_RANK] = message
        self.run.finish(exit_code=contract.EXIT_FAILED)
        os._exit(contract.EXIT_FAILED)


def epoch_rows(run):
    """Lightning's WandbLogger writing one history row per epoch, and the callback that commits each row once
    its epoch is over (a row committed is final in W&B: a later value at its step would be dropped).

    W&B's `_step` of a row is then the number of epochs trained when its values were logged (1 for the first
    epoch's): a pruner's resource (min_resource, a rung) counts epochs, online and offline. Values logged
    within an epoch (training's, every 10 steps) share its row, the last one kept; what comes after fit (the
    test metrics, the examples) is the row after the last epoch's."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import WandbLogger

    class EpochRows(WandbLogger):
        # A run W&B resumed online goes on after its last step (run.step): a step it has is not written again.
        row = committed = max(0, run.step - 1)

        def log_metrics(self, metrics, step=None):
            if "epoch" in metrics:  # Lightning adds the epoch to what it logs during fit
                self.row = max(int(metrics["epoch"]) + 1, self.committed + 1)
            elif self.row <= self.committed:
                self.row = self.committed + 1
            values = dict(metrics) if step is None else {**metrics, "trainer/global_step": step}
            self.experiment.log(values, step=self.row, commit=False)

        def commit(self):
            if self.row > self.committed:
                self.experiment.log({}, commit=True)
                self.committed = self.row

    class CommitRows(pl.Callback):
        # Lightning logs an epoch's training metrics after its epoch-end hooks: the next epoch's start, or the
        # end of training, is where the epoch's row is complete.
        def on_train_epoch_start(self, trainer, pl_module):
            logger.commit()

        def on_train_end(self, trainer, pl_module):
            logger.commit()

    logger = EpochRows(experiment=run)
    return logger, CommitRows()


def resume_from(run) -> Path | None:
    """The newest full state an earlier attempt of this run id saved: on this box, in the run folders beside
    this one; else, requeued on another box, what the preempted attempt logged."""
    import wandb

    from cifar_core.checkpoints import resumable

    here = Path(run.dir).parent
    earlier = [d for d in here.parent.glob(f"*run-*-{run.id}") if d != here]
    if (found := resumable(earlier)) is not None or not run.resumed or run.offline:
        return found
    try:
        folder = run.use_artifact(contract.RESUME_ARTIFACT.format(run_id=run.id) + ":latest").download()
    except (wandb.errors.CommError, ValueError):
        return None
    return Path(folder) / "resume.ckpt"


def seconds_since_process_start() -> float:
    """From the start of this process (Python's own start-up and the imports included), by Linux's clock."""
    with open("/proc/self/stat") as f:
        started = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
    with open("/proc/uptime") as f:
        return float(f.read().split()[0]) - started


def logged_run(config: TrainConfig, requests: SignalRequests, callbacks: Sequence = ()) -> dict:
    """One training of `config` as a W&B run: the one wandb.init and finish of this program. Returns the result
    of train() with the run id and `ended_by` as the contract names it; raises RunEndedEarly with the exit code
    of a preempted, interrupted or failed run, UsageError for a bad input."""
    import wandb

    in_sweep = bool(os.environ.get("WANDB_SWEEP_ID"))
    started_init = seconds_since_process_start()
    # resume="allow": a requeued (preempted) sweep run comes back under its own id and continues.
    # Under a sweep the project is the sweep's: naming one only makes wandb print that it ignores it.
    run = wandb.init(project=None if in_sweep else config.project, config=config.model_dump(), job_type="train",
                     resume="allow", settings=wandb.Settings(stop_fn=requests.wandb_stop))
    initialized = seconds_since_process_start()
    try:
        # Under a sweep the run's config holds the sweep's values; validate what will train.
        config = make_config(dict(run.config))
        prepare_data(config, in_sweep)
    except UsageError:
        run.finish(exit_code=contract.EXIT_USAGE)
        raise
    from cifar_core.checkpoints import checkpoint_dir
    from cifar_core.ddp import RankDied
    from cifar_core.ending import Preempted
    from cifar_core.fetch import DatasetError
    from cifar_core.train import train  # torch and Lightning load only for valid input

    # Where a trial's time goes, beside its metrics (train() adds the rest): start-up is this process's start
    # to training's, imports and wandb.init included.
    run.summary.update({"trial/startup_s": seconds_since_process_start(),
                        "trial/wandb_init_s": initialized - started_init})
    hold = Hold.from_env()
    record = WandbRecord(run, hold)
    try:
        result = train(config, record, requests, checkpoint_dir(Path(run.dir).parent),
                       resume_from(run), [*callbacks, hold.callback(), record.epoch_rows])
    except DatasetError as e:  # corrupt data files: the user's to fix, not a crash
        run.finish(exit_code=contract.EXIT_USAGE)
        raise UsageError(str(e)) from None
    except Preempted as e:
        run.finish(exit_code=contract.EXIT_PREEMPTED)
        raise RunEndedEarly(str(e), contract.EXIT_PREEMPTED) from None
    except RankDied as e:  # what failed is that rank, not the collective rank 0 was waiting in
        run.summary[contract.FAILED_RANK] = str(e)
        run.finish(exit_code=contract.EXIT_FAILED)
        raise RunEndedEarly(str(e), contract.EXIT_FAILED) from None
    except BaseException:
        run.finish(exit_code=contract.EXIT_FAILED)
        raise
    cost = result.pop("cost")
    costs = {contract.PARAMS: cost.params, contract.FLOPS: cost.flops, contract.LATENCY_MS: cost.latency_ms,
             contract.LATENCY_MS_BATCH: cost.latency_ms_batch}
    run.log(costs)  # ordinary metrics: the history row after the last epoch's, and the summary
    ended_by = ENDED_BY[result["ended_by"]]
    run.summary[contract.ENDED_BY] = ended_by
    if result["ended_by"] == Ending.DIVERGED:
        run.summary[contract.DIVERGED_AT_STEP] = result["diverged_at_step"]
    # A PREEMPT that came after the last artifact leaves nothing to resume: that run is finished, not requeued.
    interrupted = requests.reason == Request.INTERRUPT
    run.finish(exit_code=contract.EXIT_INTERRUPTED if interrupted else 0)
    if interrupted:
        raise RunEndedEarly("interrupted; the best model so far is logged", contract.EXIT_INTERRUPTED)
    return {"run_id": run.id, **result, **costs, "ended_by": ended_by}


def run(argv: list[str]) -> dict:
    """`agent run ARGV`: trains once; raises RunEndedEarly when the exit code must not be 0."""
    config = make_config(parse_flags(argv))  # fail before any run exists
    with SignalRequests() as requests:  # from here on a signal is never lost, even during imports and wandb.init
        prepare_data(config, bool(os.environ.get("WANDB_SWEEP_ID")))
        return logged_run(config, requests)
