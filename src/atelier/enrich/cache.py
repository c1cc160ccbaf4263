"""Enrichment cache: an append-only JSONL log keyed by (input hash, prompt version, backend + model).

Why a file and not a PostgreSQL table: enrichment runs before anything needs the database (the
embedded server is started from the index stage on), a GPU box or a Ray worker can carry one file
and hand it back, and an append-only log gives the guarantees resumability needs with no schema
migration shared with the vector store:

- one JSON record per line, written with a single ``write`` on an ``O_APPEND`` descriptor under
  an exclusive ``flock`` and ``fsync``-ed (at most every ``sync_every`` seconds, and on close):
  a ``kill -9`` loses at most the record being written, never an earlier one;
- reading skips a torn last line (and counts it), and appending first ends such a line, so a
  crash never glues two records together;
- records are deduplicated on read: the last ``ok``/``repaired`` record of a key wins over any
  error record, so a re-run after a crash or an error simply appends.

Errors are logged too (the error report is built from them) but are not cache hits: a later run
asks the model again.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from atelier.enrich.core import EnrichmentResult

__all__ = ["EnrichCache"]


class EnrichCache:
    """The log at ``path``: ``get`` finished results by key, ``put`` new ones (thread-safe)."""

    def __init__(self, path: Path, sync_every: float = 0.0) -> None:
        self.path = Path(path)
        self.sync_every = sync_every  # 0 = fsync every record
        self.torn_lines = 0
        self._lock = threading.Lock()
        self._done: dict[str, dict[str, Any]] = {}
        self._errors: dict[str, dict[str, Any]] = {}
        self._fd: int | None = None
        self._last_sync = 0.0
        self._load()

    def _load(self) -> None:
        if not self.path.is_file():
            return
        with self.path.open("rb") as fh:
            for line in fh:
                rec = _parse(line)
                if rec is None:
                    self.torn_lines += 1
                    continue
                key = rec["key"]
                if rec.get("status") in ("ok", "repaired"):
                    self._done[key] = rec
                    self._errors.pop(key, None)
                elif key not in self._done:
                    self._errors[key] = rec

    def __len__(self) -> int:
        return len(self._done)

    def __contains__(self, key: str) -> bool:
        return key in self._done

    def get(self, key: str) -> EnrichmentResult | None:
        """The finished (enriched) result for ``key``, or None (errors are not hits)."""
        rec = self._done.get(key)
        return EnrichmentResult.from_record(rec) if rec is not None else None

    def error(self, key: str) -> dict[str, Any] | None:
        """The last error record for ``key`` when it never succeeded."""
        return self._errors.get(key)

    def records(self) -> Iterator[dict[str, Any]]:
        """Every deduplicated record: finished ones, then keys that only ever failed."""
        yield from self._done.values()
        yield from self._errors.values()

    def put(self, result: EnrichmentResult) -> None:
        """Append ``result`` durably and make it visible to ``get``."""
        rec = result.to_record()
        line = (json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        with self._lock:
            fd = self._open()
            fcntl.flock(fd, fcntl.LOCK_EX)  # other processes (a server, a second CLI) append too
            try:
                os.write(fd, line)
                now = time.monotonic()
                if now - self._last_sync >= self.sync_every:
                    os.fsync(fd)
                    self._last_sync = now
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
            if rec["status"] in ("ok", "repaired"):
                self._done[rec["key"]] = rec
                self._errors.pop(rec["key"], None)
            elif rec["key"] not in self._done:
                self._errors[rec["key"]] = rec

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            # A crash mid-write leaves a line without its newline: end it so the next record
            # starts on a line of its own (the torn line is skipped on read).
            size = os.fstat(fd).st_size
            if size:
                with self.path.open("rb") as fh:
                    fh.seek(size - 1)
                    if fh.read(1) != b"\n":
                        os.write(fd, b"\n")
            self._fd = fd
        return self._fd

    def close(self) -> None:
        """Flush to disk and close the log."""
        with self._lock:
            if self._fd is not None:
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> EnrichCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse(line: bytes) -> dict[str, Any] | None:
    """One record, or None for a torn or foreign line."""
    try:
        rec = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("key"), str) or "status" not in rec:
        return None
    return rec
