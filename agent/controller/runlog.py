"""Read the history an offline W&B run has logged so far, while it is still running.

A local sweep controller has no W&B server to ask for a trial's metrics, but every
offline run writes its transaction log, `run-<id>.wandb`, as it goes: wandb-core
flushes it every 15 s, or as often as WANDB__TRANSACTION_LOG_FLUSH_INTERVAL says
(the local controller asks for 0.5 s). `RunLogReader.poll()` returns the history
rows appended since the previous poll, for early stopping and final values.

The log is LevelDB's log format with a 7-byte file header (`:W&B`, magic 0xBEE1,
version 0): 32 KiB blocks of chunks `crc32 u32 | length u16 | type u8 | data`,
a chunk type FULL, or FIRST/MIDDLE.../LAST for a record split across blocks, and
fewer than 7 bytes left in a block are zero padding. Each record is a serialized
`wandb_internal_pb2.Record`. The file may end anywhere, even inside a chunk, so
the reader only moves its offset past records it read whole, and the next poll
re-reads from there: a torn tail is never an error, only not yet a row.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

FILE_HEADER = struct.pack("<4sHB", b":W&B", 0xBEE1, 0)
BLOCK, CHUNK_HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def find_run_files(wandb_dir: Path, run_id: str) -> list[Path]:
    """The logs of every attempt of offline run `run_id` under `wandb_dir` (the runs' WANDB_DIR), oldest first."""
    # Directory names are offline-run-<YYYYmmdd_HHMMSS>-<id>, so name order is start order.
    return sorted(Path(wandb_dir).glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))


def find_run_file(wandb_dir: Path, run_id: str) -> Path | None:
    """The newest attempt's log of offline run `run_id`, None if it has none yet."""
    candidates = find_run_files(wandb_dir, run_id)
    return candidates[-1] if candidates else None


class RunLogReader:
    """Incremental reader of one run's `.wandb` log; `poll()` as often as you like."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.offset = 0  # file offset just past the last record read whole (0: header not read yet)
        self.exit_code: int | None = None  # from the run's exit record, once written
        self.summary: dict[str, Any] = {}  # what the run has set in its summary so far (run.summary[...] = ...)

    @property
    def finished(self) -> bool:
        """True once the run's exit record is in the log (wandb writes it on `run.finish()`)."""
        return self.exit_code is not None

    def records(self) -> Iterator[pb.Record]:
        """The records appended since the last call (or poll), parsed, in order."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        base = self.offset
        if base == 0:
            if len(data) < len(FILE_HEADER):
                return
            if data[: len(FILE_HEADER)] != FILE_HEADER:
                raise ValueError(f"{self.path}: not a W&B transaction log")
            self.offset = len(FILE_HEADER)
        for raw in self._complete_records(data, base):
            record = pb.Record()
            record.ParseFromString(raw)
            yield record

    def poll(self) -> list[dict[str, Any]]:
        """History rows ({key: value}, nested keys joined by '.') appended since the last poll, in order;
        summary updates go to `self.summary` on the way."""
        rows = []
        for record in self.records():
            kind = record.WhichOneof("record_type")
            if kind == "exit":
                self.exit_code = record.exit.exit_code
            elif kind == "history":
                rows.append(history_row(record.history))
            elif kind == "summary":
                self.summary.update(history_row(record.summary))
        return rows

    def _complete_records(self, data: bytes, base: int) -> Iterator[bytes]:
        """Yields the whole records in `data` (file bytes from offset `base`), advancing self.offset."""
        pos = self.offset
        parts: list[bytes] = []  # chunks of a record split across blocks
        while True:
            left = BLOCK - pos % BLOCK
            if left < CHUNK_HEADER:  # block trailer: zero padding
                pos += left
                continue
            header = data[pos - base : pos - base + CHUNK_HEADER]
            if len(header) < CHUNK_HEADER:
                return
            crc, length, kind = struct.unpack("<IHB", header)
            start = pos - base + CHUNK_HEADER
            chunk = data[start : start + length]
            if len(chunk) < length:
                return  # the writer is still writing this chunk
            if crc != zlib.crc32(chunk, zlib.crc32(bytes([kind]))) or kind not in (FULL, FIRST, MIDDLE, LAST):
                if len(data) - start > 2 * BLOCK:  # far from the tail: real corruption, not a torn write
                    raise ValueError(f"{self.path}: corrupt chunk at offset {pos}")
                return
            if kind in (FULL, FIRST):
                parts = [chunk]
            elif not parts:
                raise ValueError(f"{self.path}: chunk of type {kind} without a FIRST at offset {pos}")
            else:
                parts.append(chunk)
            pos += CHUNK_HEADER + length
            if kind in (FULL, LAST):
                self.offset = pos
                yield b"".join(parts)
                parts = []


def history_row(record: pb.HistoryRecord | pb.SummaryRecord) -> dict[str, Any]:
    """A history row, or a summary update, as {key: value}."""
    # wandb-core fills nested_key ("a.b" is ["a", "b"]); the legacy writer filled key
    items = record.item if isinstance(record, pb.HistoryRecord) else record.update
    return {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in items}
