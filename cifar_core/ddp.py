"""A trial on several devices: Lightning's DDP, with the other ranks started here, not by Lightning.

Lightning's launcher starts the other ranks by running the command line again, so each would parse the
agent's flags, read W&B's sweep config and call wandb.init under the same run id. Here the trial itself
is rank 0 and the one W&B run: it has its final config (what W&B locked, under a sweep), fetched its
data and found what to resume from; it then starts ranks 1..N-1 as `python -m cifar_core.ddp SPEC`,
SPEC holding that config, the checkpoint to resume from and the checkpoint folder, with the environment
Lightning reads when processes are made outside it (LOCAL_RANK, NODE_RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT). They start cold: a fork of the trial, which has started W&B's threads, would not be safe.

- Each rank trains its shard of every epoch (data.TensorBatches); validation metrics are reduced over
  the ranks; rank 0 alone logs, saves checkpoints and the best model, and runs the test pass (over the
  whole test set, on its device: it is not distributed).
- Rank 0 listens for what its caller listens for (ranks 1..N-1 ignore those signals, from their start),
  and at each batch and epoch end the ranks agree on the strongest request (ending.agreed): a stop or a
  preemption ends fit at the same batch on all of them.
- A rank that dies (out of memory, kill -9) ends the trial at once: rank 0's watchdog says which, and
  the run fails; ranks 1..N-1 die with rank 0 (PR_SET_PDEATHSIG).
"""

import ctypes
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from cifar_core.config import TrainConfig
from cifar_core.ending import Requests
from cifar_core.record import Record

WATCH_SECONDS = 0.2
# After a rank died: how long rank 0 may take to fail by itself (gloo does at once; NCCL can wait in a
# collective for its timeout), before the watchdog ends the process.
DEATH_GRACE = 5.0


class RankDied(Exception):
    """A rank of the trial died before fit was over; the message names it and how."""


def world_size(config: TrainConfig) -> int:
    """The trial's processes: `devices`, else every GPU it sees, else one."""
    if config.devices:
        return config.devices
    import torch

    return max(1, torch.cuda.device_count())


def digest(config: TrainConfig) -> str:
    """What each rank prints of the config it trains, so that one can see they are one."""
    return hashlib.sha256(json.dumps(config.model_dump(), sort_keys=True).encode()).hexdigest()[:12]


def _rank_start(ignored: list[int]) -> None:
    """In a rank's process, before it runs Python: it dies with rank 0, and ignores what rank 0 listens to
    (an ignored signal stays ignored across exec), so that a signal to the trial's group during its imports
    does not kill it."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    for signum in ignored:
        signal.signal(signum, signal.SIG_IGN)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ranks:
    """Ranks 1..N-1 of a trial, started on entering (with rank 0's environment set), waited for on exit.
    When one dies before fit is over, the others are killed, and leaving the block raises RankDied (the
    collective rank 0 waits in then fails); if rank 0 is still in fit DEATH_GRACE later, the watchdog calls
    `on_death(message)`, which must end the process."""

    def __init__(self, config: TrainConfig, devices: int, resume_from: Path | None, checkpoints: Path,
                 signals: tuple[int, ...], on_death: Callable[[str], None]):
        self.config, self.devices, self.on_death = config, devices, on_death
        self.spec = {"config": config.model_dump(), "resume_from": str(resume_from) if resume_from else None,
                     "checkpoints": str(checkpoints), "ignored_signals": [int(s) for s in signals]}
        self.procs: list[subprocess.Popen] = []
        self.over = threading.Event()
        self.death: str | None = None
        self.saved_env: dict[str, str | None] = {}
        self.spec_file: Path | None = None

    def __enter__(self):
        if self.devices == 1:
            return self
        shared = {"NODE_RANK": "0", "WORLD_SIZE": str(self.devices), "MASTER_ADDR": "127.0.0.1",
                  "MASTER_PORT": str(_free_port())}
        fd, name = tempfile.mkstemp(prefix="ddp-", suffix=".json")
        os.close(fd)
        self.spec_file = Path(name)
        self.spec_file.write_text(json.dumps(self.spec))
        for rank in range(1, self.devices):
            env = {**os.environ, **shared, "LOCAL_RANK": str(rank)}
            self.procs.append(subprocess.Popen([sys.executable, "-m", "cifar_core.ddp", name], env=env,
                                               stdin=subprocess.DEVNULL,
                                               preexec_fn=lambda: _rank_start(self.spec["ignored_signals"])))
        for key, value in {**shared, "LOCAL_RANK": "0"}.items():
            self.saved_env[key] = os.environ.get(key)
            os.environ[key] = value
        print(f"rank 0 of {self.devices}: config {digest(self.config)}; ranks 1-{self.devices - 1} started cold",
              file=sys.stderr, flush=True)
        threading.Thread(target=self._watch, daemon=True).start()
        return self

    def dead(self) -> str | None:
        """Which rank died, and how, if one did."""
        for rank, proc in enumerate(self.procs, 1):
            code = proc.poll()
            if code is not None and code != 0:
                how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
                return f"rank {rank} of {self.devices} died ({how}); the trial ends"
        return None

    def _watch(self) -> None:
        while not self.over.wait(WATCH_SECONDS):
            if (death := self.dead()) and not self.over.is_set():
                self.death = death
                self.stop()
                if not self.over.wait(DEATH_GRACE):
                    self.on_death(death)
                return

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()

    def __exit__(self, *exc):
        """After fit, on every rank: the ranks leave the process group (rank 0's test pass and post-fit saves
        need no other rank), rank 0 waits for them, and its environment is put back."""
        if exc[0] is not None:  # a collective failing at once (gloo) can come before the watchdog's look
            self.death = self.death or self.dead()
        self.over.set()
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for proc in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for key, value in self.saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if self.spec_file is not None:
            self.spec_file.unlink(missing_ok=True)
        if self.death and exc[0] is not None:
            raise RankDied(self.death) from None


class FollowRankZero(Requests):
    """The requests of ranks 1..N-1: none of their own. The signals rank 0 listens to reach the whole process
    group (a terminal's Ctrl-C, `agent local`'s stop), or rank 0 alone (W&B's agent); these ranks ignore them,
    and learn rank 0's request at the next batch (ending.agreed)."""

    def __init__(self, signals: list[int]):
        super().__init__()
        self.signals = tuple(signals)

    def listen(self) -> None:
        for signum in self.signals:  # again once fit starts: Lightning put its SIGTERM handler in place
            signal.signal(signum, signal.SIG_IGN)


def main(argv: list[str]) -> int:
    """Rank LOCAL_RANK of a trial: the fit of rank 0's config, nothing reported, nothing tested."""
    spec = json.loads(Path(argv[0]).read_text())
    config, rank = TrainConfig(**spec["config"]), int(os.environ["LOCAL_RANK"])
    requests = FollowRankZero(spec["ignored_signals"])
    print(f"rank {rank} of {os.environ['WORLD_SIZE']}: config {digest(config)} from rank 0", file=sys.stderr,
          flush=True)
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from cifar_core.fit import make_fit

    fit = make_fit(config, Record(), requests, (), Path(spec["checkpoints"]), int(os.environ["WORLD_SIZE"]))
    try:
        fit.trainer.fit(fit.system, datamodule=fit.datamodule, ckpt_path=spec["resume_from"], weights_only=True)
    except SIGTERMException:  # a stop or a preemption the ranks agreed on: rank 0 says what it was
        pass
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # the fit is over: skip the interpreter's teardown of torch and Lightning
