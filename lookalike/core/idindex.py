"""lookalike's own index of a local collection's ids, in the order they were first written: paging by an id cursor.

Chroma 1.5.9 pages ``get`` by offset only, and a page by offset costs more the further it starts (a million
items, ids only: 0.075 s at offset 0, 0.44 s at 900,000). Nor can a filter serve as a keyset: ids cannot be
compared, and every ``where``-filtered ``get`` of a local Chroma is a full scan (its SQLite statement groups every
embedding's metadata, then applies the ``HAVING`` filter and the limit; a range on an integer field cost ~1 s a
page at a million). Only a read by id is index-backed (5,000 ids: 28 ms, 196 ms with their metadata).

So lookalike keeps, beside a local store, the order of its collections' ids (the catalogue apart from the
vector index): ``DIR/lookalike-ids.sqlite3``, one table keyed by (Chroma collection UUID, write number). Each
id gets the next number at its first write (never reused, not changed by a replace); a page is
``seq > cursor ORDER BY seq LIMIT n`` on the primary key, whatever the cursor (O(page)), and its items are then
read from Chroma by id.

Kept by the store's own writes (:mod:`lookalike.core.store`; only this process writes: the store's lock): a
write marks the collection's index stale before it touches Chroma, then records the ids it added or removed
and Chroma's new count in one transaction, fresh again when it was fresh before and the two counts agree (a
stale index stays stale until built again). At its first use in a process, an index that is stale (a process
killed mid-write), missing (a collection of an earlier release, or one rebuilt: a new UUID), that counts other
than Chroma, or whose last id is not the last of Chroma's listing (a write by an earlier release) is built
again from Chroma's listing of ids, under a new *epoch*: a cursor of an earlier epoch is refused, not followed
to the wrong place. ``lookalike check`` compares every id. A file that fails is removed and the store goes on
without it (offset pages, listed scans) until the next process builds it again. Pure SQLite, no Chroma here:
the store hands it ids and counts.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from lookalike.errors import InputError, StoreError
from lookalike.util import first_line

log = logging.getLogger(__name__)

FILE = "lookalike-ids.sqlite3"
INSERT_STEP = 50_000  # rows per executemany of a build

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ids (coll TEXT NOT NULL, seq INTEGER NOT NULL, id TEXT NOT NULL, PRIMARY KEY (coll, seq)) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS ids_by_id ON ids (coll, id);
CREATE TABLE IF NOT EXISTS state (
    coll TEXT PRIMARY KEY, epoch INTEGER NOT NULL, next_seq INTEGER NOT NULL, rows INTEGER NOT NULL,
    stored INTEGER NOT NULL, fresh INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class IndexState:
    """One collection's index: its ``epoch`` (changes at each build), the ids it holds (``rows``), the count Chroma
    gave at the last write (``stored``), and whether no write is unfinished (``fresh``)."""

    epoch: int
    rows: int
    stored: int
    fresh: bool

    def agrees(self, stored: int) -> bool:
        """Usable for a collection Chroma counts ``stored`` items in."""
        return self.fresh and self.rows == self.stored == stored


def encode_cursor(epoch: int, seq: int) -> str:
    return f"{epoch:x}.{seq}"


def decode_cursor(cursor: str, epoch: int) -> int:
    """The write number after which a page starts, from a cursor :func:`encode_cursor` gave under ``epoch``."""
    text = str(cursor).strip()
    head, dot, tail = text.partition(".")
    try:
        ok = bool(dot) and int(head, 16) == epoch and tail.isascii() and tail.isdigit() and len(tail) <= 18
    except ValueError:
        ok = False
    if not ok:
        raise InputError(
            f"cursor {text[:40]!r} is not one this collection gave, or the collection was re-indexed since: start again without a cursor"
        )
    return int(tail)


class IdIndexError(StoreError):
    """The id index cannot be used (its file failed, or the store was closed): the store goes on without it."""


class IdIndex:
    """The ids of a local store's collections in write order (see the module's text). Thread-safe; the SQLite file is
    opened at its first use. It never stands in the store's way: a file that fails (damaged, unreadable) is removed
    (built again at its next use, in the next process) and every later call raises :class:`IdIndexError`, which the
    store answers by going without it."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / FILE
        self._db: sqlite3.Connection | None = None
        self._lock = threading.RLock()
        self.unavailable = ""  # why it cannot be used ("" while it can)

    def _conn(self) -> sqlite3.Connection:
        if self.unavailable:
            raise IdIndexError(self.unavailable)
        if self._db is None:
            try:
                db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.executescript(_SCHEMA)
            except sqlite3.Error as exc:
                self._fail(exc)
            self._db = db
        return self._db

    def _fail(self, exc: sqlite3.Error) -> NoReturn:
        """Give the index up for this process: close and remove its file (lookalike's own, derived from the store)."""
        self.unavailable = f"lookalike's id index {self.path} failed ({first_line(exc)}): it is built again by the next process"
        log.warning("%s", self.unavailable)
        db, self._db = self._db, None
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                db.close()
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                Path(str(self.path) + suffix).unlink(missing_ok=True)
        raise IdIndexError(self.unavailable) from None

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            db = self._conn()
            try:
                db.execute("BEGIN IMMEDIATE")
                yield db
                db.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    self._fail(exc)
                raise

    def _read(self, sql: str, args: tuple[object, ...]) -> list[tuple[object, ...]]:
        with self._lock:
            db = self._conn()
            try:
                return db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                self._fail(exc)

    def close(self) -> None:
        """Close the file; later calls raise :class:`IdIndexError` (a thread still reading after its store was
        closed must not write beside a store whose lock is released)."""
        with self._lock:
            self.unavailable = self.unavailable or "the store was closed"
            db, self._db = self._db, None
            if db is not None:
                db.close()

    def state(self, coll: str) -> IndexState | None:
        got = self._read("SELECT epoch, rows, stored, fresh FROM state WHERE coll = ?", (coll,))
        if not got:
            return None
        epoch, rows, stored, fresh = got[0]
        return IndexState(int(epoch), int(rows), int(stored), bool(fresh))  # type: ignore[call-overload]

    def build(self, coll: str, ids: Sequence[str]) -> int:
        """Number ``ids`` (Chroma's listing, each once) 1, 2, ... under a new epoch, replacing what was held; the epoch."""
        epoch = time.time_ns() // 1000
        with self._tx() as db:
            old = db.execute("SELECT epoch FROM state WHERE coll = ?", (coll,)).fetchone()
            if old is not None and int(old[0]) >= epoch:
                epoch = int(old[0]) + 1  # (a clock set back: the epoch still changes)
            db.execute("DELETE FROM ids WHERE coll = ?", (coll,))
            for start in range(0, len(ids), INSERT_STEP):
                rows = ((coll, start + i + 1, x) for i, x in enumerate(ids[start : start + INSERT_STEP]))
                db.executemany("INSERT INTO ids (coll, seq, id) VALUES (?, ?, ?)", rows)
            db.execute("INSERT OR REPLACE INTO state VALUES (?, ?, ?, ?, ?, 1)", (coll, epoch, len(ids) + 1, len(ids), len(ids)))
        return epoch

    def stale(self, coll: str) -> bool:
        """Mark ``coll``'s index stale (a write to Chroma follows: see :meth:`added`, :meth:`removed`); whether it was
        fresh before. A stale index stays stale until :meth:`build`: two unfinished writes could leave its count equal
        to Chroma's and its ids not."""
        with self._tx() as db:
            row = db.execute("SELECT fresh FROM state WHERE coll = ?", (coll,)).fetchone()
            db.execute("UPDATE state SET fresh = 0 WHERE coll = ?", (coll,))
        return bool(row and row[0])

    def added(self, coll: str, ids: Sequence[str], stored: int, was_fresh: bool) -> None:
        """``ids`` were added or replaced in Chroma, which now counts ``stored`` items: the new ones get the next
        numbers (ids held keep theirs); fresh again when it was before the write (``was_fresh``: what :meth:`stale`
        said) and the counts agree. Nothing when ``coll`` has no index yet."""
        with self._tx() as db:
            row = db.execute("SELECT next_seq, rows FROM state WHERE coll = ?", (coll,)).fetchone()
            if row is None:
                return
            next_seq, rows = int(row[0]), int(row[1])
            before = db.total_changes
            db.executemany(
                "INSERT OR IGNORE INTO ids (coll, seq, id) VALUES (?, ?, ?)", ((coll, next_seq + i, x) for i, x in enumerate(ids))
            )
            rows += db.total_changes - before
            db.execute(
                "UPDATE state SET next_seq = ?, rows = ?, stored = ?, fresh = ? WHERE coll = ?",
                (next_seq + len(ids), rows, stored, int(was_fresh and rows == stored), coll),
            )

    def removed(self, coll: str, ids: Sequence[str], stored: int, was_fresh: bool) -> None:
        """``ids`` were deleted from Chroma, which now counts ``stored`` items (see :meth:`added`)."""
        with self._tx() as db:
            row = db.execute("SELECT rows FROM state WHERE coll = ?", (coll,)).fetchone()
            if row is None:
                return
            before = db.total_changes
            db.executemany("DELETE FROM ids WHERE coll = ? AND id = ?", ((coll, x) for x in ids))
            rows = int(row[0]) - (db.total_changes - before)
            db.execute(
                "UPDATE state SET rows = ?, stored = ?, fresh = ? WHERE coll = ?", (rows, stored, int(was_fresh and rows == stored), coll)
            )

    def after(self, coll: str, seq: int, limit: int) -> list[tuple[int, str]]:
        """Up to ``limit`` (write number, id) of ``coll`` after write number ``seq``, in order."""
        got = self._read("SELECT seq, id FROM ids WHERE coll = ? AND seq > ? ORDER BY seq LIMIT ?", (coll, seq, limit))
        return [(int(s), str(i)) for s, i in got]  # type: ignore[call-overload]

    def last(self, coll: str) -> str | None:
        """The id ``coll``'s index numbered last (None when it holds none)."""
        got = self._read("SELECT id FROM ids WHERE coll = ? ORDER BY seq DESC LIMIT 1", (coll,))
        return str(got[0][0]) if got else None

    def ids(self, coll: str) -> list[str]:
        """Every id ``coll``'s index holds, in write order."""
        return [str(r[0]) for r in self._read("SELECT id FROM ids WHERE coll = ? ORDER BY seq", (coll,))]

    def forget(self, coll: str) -> None:
        """Drop ``coll``'s index (its collection was dropped or replaced)."""
        with self._tx() as db:
            db.execute("DELETE FROM ids WHERE coll = ?", (coll,))
            db.execute("DELETE FROM state WHERE coll = ?", (coll,))
