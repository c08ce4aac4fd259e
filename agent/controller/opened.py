"""Which sweep a controller runs: the one of its --dir or --sweep-id, or the unfinished one of the same YAML under
./sweeps-local (the same command resumes it), or a new one; and what is left of it to run."""

import json
from dataclasses import dataclass
from pathlib import Path

from wandb.sdk.lib.runid import generate_id

from agent.contract import CRASHED, LIVE, PAUSED
from agent.controller.engine import as_sweep_run, engine_config, sweep_metric, sweeps
from agent.controller.store import Store, Trial, sqlite_url, state_counts, write_pointer
from agent.errors import UsageError

SWEEPS_HOME = Path("sweeps-local")  # where a sweep's DIR goes when the command names none


def trial_limit(sweep: dict, count: int | None) -> int | None:
    """How many trials the sweep may have in all: --count and run_cap, the smaller; None for no limit."""
    caps = [c for c in (count, sweep.get("run_cap")) if c]
    return min(caps) if caps else None


def work_left(trials: list[Trial], sweep: dict, count: int | None, retry_crashed: bool) -> bool:
    """Whether a controller of this sweep would run anything: a paused or live trial, a crashed one it retries,
    or a trial more (fewer than the limit, or a grid with points left)."""
    if any(t.state == PAUSED or t.state in LIVE or (retry_crashed and t.state == CRASHED) for t in trials):
        return True
    limit = trial_limit(sweep, count)
    if limit is not None:
        return len(trials) < limit
    if sweep.get("method") != "grid":
        return True
    runs = [as_sweep_run(t, sweep_metric(sweep)[0]) for t in trials]
    return sweeps.next_run(engine_config(sweep), runs) is not None


def progress(trials: list[Trial], sweep: dict, count: int | None) -> str:
    """"2 paused, 1 finished of 4": the trials so far, and the limit when there is one."""
    limit = trial_limit(sweep, count)
    return state_counts(trials) + (f" of {limit}" if limit is not None else "")


def sweeps_of(sweep: dict) -> list[Path]:
    """The folders under ./sweeps-local that hold a sweep of this YAML, the most recently active first. The same
    YAML is the same settings (the parsed file: its name, comments and layout do not count)."""
    found = []
    for database in SWEEPS_HOME.glob("*/sweep.db"):
        try:
            store = Store(sqlite_url(database.parent), readonly=True)
        except UsageError:  # damaged, or no sweep yet: nothing to resume there
            continue
        try:
            held = store.sweep()
        finally:
            store.close()
        if held is not None and held[1] == json.loads(json.dumps(sweep)):
            found.append(database.parent)
    last_write = {d: max(f.stat().st_mtime for f in d.glob("sweep.db*")) for d in found}
    return sorted(found, key=last_write.get, reverse=True)


@dataclass
class Opened:
    """A sweep a controller runs: its store (bound to it), id, folder (as the command named it) and YAML."""
    store: Store
    sweep_id: str
    root: Path
    sweep: dict


def open_sweep(sweep: dict, directory: str | None, sweep_id: str | None = None,
               store_url: str | None = None) -> Opened:
    """A validated sweep's store (made, or the same YAML's again: to resume it, or to join it from another box),
    id and DIR. With `store_url` (PostgreSQL), the sweep `sweep_id` there; else DIR/sweep.db."""
    sweep_id = sweep_id or generate_id(8)
    root = Path(directory) if directory else SWEEPS_HOME / sweep_id
    if store_url:
        store = Store(store_url)  # refused in one line before DIR is made, if the server says no
        store.join(sweep_id, sweep)
        root.mkdir(parents=True, exist_ok=True)
        write_pointer(root, store)
        return Opened(store, sweep_id, root, sweep)
    root.mkdir(parents=True, exist_ok=True)
    store = Store(sqlite_url(root))
    existing = store.sweep()  # a DIR holds one sweep: resumed under its own id
    store.join(existing[0] if existing else sweep_id, sweep)
    return Opened(store, store.sweep_id, root, sweep)


def same_sweep(sweep: dict, count: int | None, retry_crashed: bool) -> tuple[Path, list[Trial], bool] | None:
    """The sweep of this YAML under ./sweeps-local that the same command goes on with: the most recently active
    one with work left, else the most recently active one; its folder, trials and whether work is left. None when
    there is none."""
    from agent.controller.store import open_store

    found = [(d, open_store(str(d)).trials()) for d in sweeps_of(sweep)]
    found = [(d, trials, work_left(trials, sweep, count, retry_crashed)) for d, trials in found]
    return next((f for f in found if f[2]), found[0] if found else None)
