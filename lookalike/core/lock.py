"""The inter-process lock of a local store directory: one lookalike process at a time.

Chroma's ``PersistentClient`` is not safe across processes: two ingests into one directory both
"succeeded" and left a collection that fails with "Error getting embedding". Read-only commands
are not harmless either: measured here (chromadb 1.5.9), a ``search --label`` rewrote a label
partition's HNSW files (``data_level0.bin``, ``length.bin``) while applying Chroma's write-ahead
log, and every client start inserts a row into the SQLite file. So every process that opens a
local store takes an *exclusive* lock on ``DIR/lookalike.lock`` (``fcntl.flock``; the kernel
releases it when the process ends, so a killed process never leaves a stale lock). The holder
writes its pid and command line into the file; a process refused the lock names them and the fix
(wait with ``--wait SECONDS``, or share the store through ``chroma run`` and ``--db http://HOST:PORT``).

Within one process the lock is shared: every :class:`StoreLock` of the same directory counts as
one holder, and the lock is released when the last one is closed.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path

from lookalike.errors import InputError, LockedError, StoreError

LOCK_FILE = "lookalike.lock"
POLL = 0.2  # seconds between tries while waiting

_held: dict[str, tuple[int, int]] = {}  # resolved directory -> (fd, references) in this process
_guard = threading.Lock()


def _command() -> str:
    """This process's command line, short: ``lookalike ingest mnist ...`` or ``python -c ... ARGS``."""
    argv = sys.argv or [""]
    first = "python -c ..." if argv[0] == "-c" else Path(argv[0]).name or "python"
    return " ".join([first, *argv[1:]])[:300]


def holder(directory: Path) -> dict[str, object] | None:
    """What the lock file says of its holder (``pid``, ``command``, ``since``), or None when unreadable."""
    try:
        data = json.loads((directory / LOCK_FILE).read_text() or "null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class StoreLock:
    """An exclusive, inter-process lock on a store directory (``fcntl.flock``), re-entrant within a process.

    ``wait`` is how many seconds to keep trying when another process holds it (``None`` or 0: fail at
    once with :class:`~lookalike.errors.LockedError`).
    """

    def __init__(self, directory: Path, wait: float | None = None) -> None:
        if wait is not None and wait < 0:
            raise InputError(f"--wait must be 0 or more seconds, got {wait:g}")
        self.directory = directory.resolve()
        self._key = str(self.directory)
        self._closed = False
        deadline = time.monotonic() + (wait or 0)
        while True:
            with _guard:  # held only for one try: other threads are not kept waiting while this one polls
                if self._key in _held:
                    fd, refs = _held[self._key]
                    _held[self._key] = (fd, refs + 1)
                    return
                fd = self._try()
                if fd is not None:
                    _held[self._key] = (fd, 1)
                    self._note(fd)
                    return
            if time.monotonic() >= deadline:
                raise LockedError(self._refusal(wait))
            time.sleep(POLL)

    def _try(self) -> int | None:
        """The locked descriptor of the lock file, or None when another process holds it."""
        import fcntl

        path = self.directory / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot create the lock file {path} ({exc.strerror or exc}): pass --db a writable directory") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        return fd

    @staticmethod
    def _note(fd: int) -> None:
        """Write who holds the lock into it (best effort: a full disk must not leave a lock unrecorded)."""
        info = {"pid": os.getpid(), "command": _command(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)

    def _refusal(self, wait: float | None) -> str:
        info = holder(self.directory)
        who = f"process {info.get('pid')} (`{info.get('command')}`, since {info.get('since')})" if info else "another process"
        waited = f" after waiting {wait:g} s" if wait else ""
        return (
            f"the store at {self.directory} is in use by {who}{waited}: wait for it to finish (or pass --wait SECONDS), "
            "or share the store through `chroma run --path DIR --port N` and --db http://HOST:PORT"
        )

    def close(self) -> None:
        """Release this reference; the lock itself goes with the process's last reference."""
        if self._closed:
            return
        self._closed = True
        with _guard:
            fd, refs = _held[self._key]
            if refs > 1:
                _held[self._key] = (fd, refs - 1)
                return
            del _held[self._key]
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing the descriptor releases the flock


def is_locked_here(directory: Path) -> bool:
    """Whether this process holds the lock of ``directory``."""
    with _guard:
        return str(directory.resolve()) in _held


@atexit.register
def _release_all() -> None:
    """At exit, clear the holder note of every lock this process still holds (the kernel drops the locks themselves)."""
    with _guard:
        for fd, _ in _held.values():
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
