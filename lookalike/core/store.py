"""The vector store: the only module that talks to Chroma.

``db`` is a directory (a Chroma ``PersistentClient``; the process holds the directory's lock, see
:mod:`lookalike.core.lock`) or ``http://HOST:PORT`` (a server started with ``chroma run --path DIR --port
N``, shared by many processes). Vectors are always supplied (no embedding function). Each
collection's metadata holds a JSON *record* (see :mod:`lookalike.core.record`), which this module stores
and returns as text without reading it.

Chroma facts honoured here (chromadb 1.5.9): writes go in batches of at most
``get_max_batch_size()``; ``get`` is paged (it fails past 32,766 records with metadatas); ``l2``
distances are squared, so :meth:`VectorCollection.query` returns Euclidean distances. Every error
Chroma raises becomes a :class:`~lookalike.errors.StoreError` naming the fix.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar
from urllib.parse import urlparse

import numpy as np

from lookalike.core.idindex import IdIndex, IdIndexError, decode_cursor, encode_cursor
from lookalike.core.lock import StoreLock
from lookalike.core.mirror import Mirror
from lookalike.data.filters import matches
from lookalike.errors import DamagedError, InputError, LookalikeError, NotFoundError, StoreError
from lookalike.util import first_line, trim_memory

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_DB = "./lookalike-db"
RECORD_KEY = "lookalike"
PAGE = 5000  # rows per get() page, below Chroma's 32,766-record limit
# a scan of every item of a local collection follows its id index (lookalike.core.idindex), PAGE ids at a time, each page
# read by id. A filtered scan (or a server's collection) lists the matching ids first (ids only: 0.33 s for 100,000),
# then reads them by id, PAGE at a time: a page by offset costs more the further it starts (100,000 items: 290 ms at
# offset 50,000, 450 ms at 95,000), a page by id does not.
# That listing pages by offset (Chroma's get has no cursor), so its pages are large: listing a million items'
# 900,000 indexed ids took 55.8 s in pages of 100,000 and 11.7 s in one (every id 17.7 s and 7.4 s). The price is memory
# for the moment of the call: up to 600 MB for a page of a million ids, 270 MB for 300,000 (7.6 s): see docs/scale.md
ID_PAGE = 1_000_000
# a filtered page by cursor reads the id index's next ids with their metadata from Chroma (by id: index-backed; Chroma's
# where beside 5,000 ids took 6.8 s a call at 20,000 items), keeps the matches (lookalike.data.filters.matches, as the
# mirror does) and reads on, twice as many each time up to PAGE, until the page is full or SCAN_MAX ids were looked at:
# a rare filter's page may then hold fewer items (its cursor goes on)
SCAN_MAX = 50_000
# ef_search 64: recall@1 0.9999 on MNIST's 10,000 held-out VGG16 vectors against 60,000, the same as
# ef_search 200, in 6.7 s instead of 12.2 s (32: 3.6 s, same recall); see docs/performance.md.
# max_neighbors 32 and ef_construction 200, not Chroma's 16 and 100: those wrote 1.5x faster in one Chroma call, but on
# 100,000 distinct digits (scripts/scale.py) they lost quality: store recall@1 0.9934 against 0.9989, 1-NN accuracy
# through the store 0.9146 against 0.9173 (exact: 0.9181), and some stored vectors no longer found themselves (check).
# M 32 with ef_construction 100 (searched 128 wide) wrote a flat million 1.35x as fast (934.7 against 690.7 items/s), but
# lost recall@1 there: 0.9973 against 1.0 on evaluate's 1,111 exact queries (0.9982 searched 256 wide); docs/scale.md
HNSW = {"space": "l2", "ef_construction": 200, "ef_search": 64, "max_neighbors": 32}
# a label partition is small (a tenth of MNIST): a wider search costs ~1 ms and lifts label-filtered
# recall@5 from 0.975 to 0.997 (Chroma's where over the whole gallery: 0.998, at ~50 ms a query). Built 100 wide and
# searched 384 wide, it answers as the graph built 200 wide and searched 256 wide did, as fast, and is written 1.7x as
# fast: one label's 91,823 distinct digits (scripts/hnsw_settings.py --label 3 --any-queries: 1,000 held-out digits of
# every label ask) written at 2,123 against 1,188 vectors/s; recall@1 0.999 and 0.999, recall@10 0.9980 and 0.9981, p50
# 3.31 and 3.47 ms (searched 256 wide, the cheaper graph: 0.998, 0.9962). Partitions made before 2026-12-02 keep 200 and
# 256 (Chroma stores a collection's settings).
PARTITION_HNSW = {**HNSW, "ef_construction": 100, "ef_search": 384}
QUERY_BATCH = 500  # query vectors per Chroma call (larger batches were no faster)
# Chroma reads a query call's metadatas in one SQL statement of rows x k variables; past SQLite's
# 32,766 it fails ("too many SQL variables"): calls that read metadata stay under this many results
META_RESULTS = 32_000
PROBE = 100  # neighbours asked unfiltered before falling back to a ``where`` query
# a filter that the probe finds too rarely and that matches at most this many items is answered exactly, by brute
# force over the matching items (their ids from SQLite, their vectors by id); a wider one by Chroma's ``where``, which
# costs as much every time (300,000 items, a 1% filter of 2,700: 1.5 s a query)
EXACT_MAX = 10_000
# ... and the matching items of the last NARROW_KEPT such filters (at most NARROW_MB of vectors) are kept until the next
# write: the same filter again skips SQLite (at 100,000 items: 250 ms to list 900 ids, 180 ms to read their vectors)
NARROW_KEPT = 8
NARROW_MB = 256
# a warm collection (see VectorCollection.keep_warm) plans each filtered query from its in-memory mirror:
BROAD = 0.05  # a filter matching at least this share of the items: over-fetch unfiltered, then keep the matches
OVERFETCH = 3.0  # ... asking OVERFETCH x k / share neighbours (+ PROBE_MIN), at most PROBE_MAX
PROBE_MIN, PROBE_MAX = 16, 1000
MIRROR_VECTORS_MB = int(os.environ.get("LOOKALIKE_MIRROR_MB", "1024"))  # vectors mirrored when they fit in this many MB
ALLOW_MAX = 20_000  # the longest id allow-list sent to Chroma (else its where)
EXTRA = 16  # neighbours asked beyond k when some ids are excluded (the held-out items of evaluate)
PARTITION_KEY = "lookalike_partition_of"  # metadata of a label partition: the collection it belongs to
REBUILD_KEY = "lookalike_rebuild_of"  # metadata of a collection being rebuilt: the collection it will replace
# metadata of a main collection written ahead of its label partitions (a large ingest): "1" until they are filled
BEHIND_KEY = "lookalike_partitions_behind"
BEHIND_RECHECK = 5.0  # seconds a server collection's mark is trusted before it is read again
REBUILD_SUFFIX = ".rebuild"
MAX_PARTITIONS = 100  # collections with more labels than this get no label partitions
_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{1,510}[a-zA-Z0-9]$")
_RESERVED_NAME = re.compile(r"\.(p\d+|rebuild)$")


def default_db() -> str:
    """``$LOOKALIKE_DB`` or ``./lookalike-db``."""
    return os.environ.get("LOOKALIKE_DB") or DEFAULT_DB


def is_server(db: str) -> bool:
    return db.startswith(("http://", "https://"))


@dataclass
class Neighbor:
    """One query result: id, Euclidean distance and the stored metadata (empty when not asked for)."""

    id: str
    distance: float
    metadata: dict[str, Any]


def _chroma_error(exc: Exception, db: str, collection: str | None) -> StoreError:
    """The one-line StoreError for an exception Chroma (or its HTTP client) raised."""
    from chromadb.errors import NotFoundError as ChromaNotFound

    text = first_line(exc)
    if isinstance(exc, ChromaNotFound):
        return NotFoundError(f"the store at {db} has no {text.split(': ', 1)[-1]}: list them with `lookalike collections`")
    if "already exists" in text:
        return StoreError(f"the store at {db} refused ({text}): another process made it just now; run the command again")
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT):
        return StoreError(
            f"the store at {db} cannot be written ({text}): free disk space or fix its permissions, then run the command again"
        )
    if is_server(db) and (isinstance(exc, (ConnectionError, OSError)) or "connect" in text.lower() or "timed out" in text.lower()):
        return StoreError(f"cannot reach the Chroma server at {db} ({text}): is `chroma run` still running?")
    where = f" on collection {collection!r}" if collection else ""
    check = f" --collection {collection}" if collection else ""
    return DamagedError(f"the store at {db} failed{where} ({text}): it may be damaged; run `lookalike check{check} --db {db}`")


@contextmanager
def _chroma(db: str, collection: str | None = None) -> Iterator[None]:
    """Turn any Chroma exception inside into a StoreError naming the fix."""
    try:
        yield
    except LookalikeError:
        raise
    except Exception as exc:  # chromadb raises many kinds (InternalError, httpx errors, ValueError...)
        log.debug("Chroma error", exc_info=True)
        raise _chroma_error(exc, db, collection) from None


class VectorCollection:
    """A Chroma collection of image vectors with ``label``/``split`` metadata.

    When its owner says so (``partitioned``), every vector is also stored in a hidden collection per
    label (``NAME.pLABEL``, written before the main one so that a resumed ingest completes them): a
    label-filtered query searches those small indexes instead of running Chroma's ``where`` over the
    whole gallery (~50 ms a query on 70,000 items, see :meth:`query`).
    """

    def __init__(self, collection: Any, store: Store, partitioned: bool = False, *, indexed: bool = False) -> None:
        self._store = store
        self._c = collection
        self.name: str = collection.name
        self.partitioned = partitioned
        # a local store's collection keeps its ids in write order in the store's id index (see lookalike.core.idindex):
        # its key is Chroma's UUID of the collection (a rebuilt or re-made collection has another, and is indexed afresh)
        self._ids = store._ids if indexed else None
        self._ids_key = str(collection.id)
        self._ids_lock = threading.RLock()
        self._ids_checked = False  # the index was compared with Chroma's count in this process (only it writes since)
        # the label partitions lack items of the main collection (see :meth:`fill_partitions`): label filters go without them
        self._behind = bool((collection.metadata or {}).get(BEHIND_KEY))
        self._behind_read = time.monotonic()
        self._parts: dict[int, VectorCollection] = {}
        # how filtered queries were answered (cold: short probes by brute force / by Chroma's where; warm: the plans)
        self.plan_counts = {"brute": 0, "where": 0, "probe": 0, "overfetch": 0, "mirror": 0, "kept": 0, "allow-list": 0}
        self.warm = False
        self._mirror: Mirror | None = None
        self._mirror_lock = threading.RLock()  # the mirror changes (writes) and is read (queries) from several threads
        self._generation = 0  # writes so far (a mirror read while one happened is read again)
        self._loader: threading.Thread | None = None
        self.dim = 0  # the vectors' length, when the owner knows it (an empty collection's mirror needs it)
        # a narrow filter's matching items (see NARROW_KEPT): filter's JSON -> (generation, ids, metadatas, prepared)
        self._narrow: dict[str, tuple[int, list[str], list[dict[str, Any]], Base]] = {}
        # a warm collection's last filters: (filter's JSON, generation) -> the matching mirror rows, prepared
        self._matched: dict[tuple[str, int], Base] = {}

    @property
    def _c(self) -> Any:
        """Chroma's handle on the collection, fetched again after :meth:`Store.release_memory` replaced the client."""
        if self._client_epoch != self._store.epoch:
            self._c = self._store._client.get_collection(self.name, embedding_function=None)
        return self._handle

    @_c.setter
    def _c(self, handle: Any) -> None:
        self._handle = handle
        self._client_epoch = self._store.epoch

    def keep_warm(self, load: bool = False) -> None:
        """Plan filtered queries from an in-memory mirror of the metadata (and vectors, when they fit in
        ``LOOKALIKE_MIRROR_MB``), kept current by this object's own writes: for long-lived processes (the service,
        the app) on a local store, whose lock keeps every other writer out (a server's collection stays cold: other
        processes may write to it). The mirror is read now with ``load``, else in the background (queries go
        the cold way until it is ready)."""
        if is_server(self._store.db):
            return
        self.warm = True
        if load:
            self.mirror()
        else:
            self.ensure_loading()

    def ensure_loading(self) -> None:
        """A warm collection without its mirror (not read yet, or dropped by a failed write): read it in the background."""
        if self.warm and self._mirror is None and (self._loader is None or not self._loader.is_alive()):
            self._loader = threading.Thread(target=self._load_quietly, name=f"mirror-{self.name}", daemon=True)
            self._loader.start()

    def from_mirror(self, read: Callable[[Mirror], T]) -> T | None:
        """``read(mirror)`` under the mirror's lock when a warm collection's mirror is ready; else None (and the
        mirror is read in the background)."""
        mir = self._mirror if self.warm else None
        if mir is None:
            self.ensure_loading()
            return None
        with self._mirror_lock:
            return read(mir)

    def _load_quietly(self) -> None:
        try:
            self.mirror()
        except Exception:  # a store that fails now fails again, loudly, in the query that needs it
            log.warning("could not mirror %r; its filtered queries go the cold way", self.name, exc_info=True)

    def mirror(self) -> Mirror:
        """The mirror (read now, page by page, when not loaded yet; again when a write happened meanwhile)."""
        for _ in range(5):
            with self._mirror_lock:
                if self._mirror is not None:
                    return self._mirror
                generation = self._generation
            count = self.count()
            dim = self.dim or self._stored_dim()
            mir = Mirror(dim, vectors=dim > 0 and count * dim * 4 <= MIRROR_VECTORS_MB * 2**20)
            for ids, vecs, metas in self.pages(vectors=mir.keeps_vectors):  # (vectors read only when they are kept)
                mir.put(ids, vecs, metas)
            with self._mirror_lock:
                current = self._generation == generation  # no write while it was read: it is the collection now
                if current:
                    self._mirror = mir
                    log.info("mirrored %d items of %r (vectors: %s)", len(mir), self.name, mir.keeps_vectors)
            if current:
                trim_memory()  # (the pages read and freed go back to the system; outside the lock: it walks the heap)
                return mir
        raise StoreError(f"collection {self.name!r} kept changing while it was read: run the query again")

    def _stored_dim(self) -> int:
        """The length of a stored vector (0 when the collection is empty)."""
        with self._guard():
            got = self._c.get(limit=1, include=["embeddings"])
        embs = got.get("embeddings")
        return int(np.asarray(embs).shape[1]) if embs is not None and len(embs) else 0

    @property
    def raw_record(self) -> str | None:
        """The record's JSON text as stored, or None."""
        raw = (self._c.metadata or {}).get(RECORD_KEY)
        return str(raw) if raw else None

    def note(self, key: str) -> str | None:
        """The text kept under ``key`` in the collection's metadata, read from the store now (another process may
        have written it since this collection was opened)."""
        with self._guard():
            fresh = self._store._client.get_collection(self.name, embedding_function=None)
        value = (fresh.metadata or {}).get(key)
        return str(value) if value is not None else None

    def notes(self) -> dict[str, str]:
        """Every text kept in the collection's metadata beside its record (read from the store now)."""
        with self._guard():
            fresh = self._store._client.get_collection(self.name, embedding_function=None)
        skip = {RECORD_KEY, PARTITION_KEY, REBUILD_KEY, BEHIND_KEY}
        return {k: str(v) for k, v in (fresh.metadata or {}).items() if k not in skip and v not in (None, "")}

    def set_note(self, key: str, text: str) -> None:
        """Keep ``text`` under ``key`` in the collection's metadata (the record and other notes are kept)."""
        if key == RECORD_KEY:
            raise InputError(f"{key!r} is the collection's record, not a note")
        with self._guard():
            fresh = self._store._client.get_collection(self.name, embedding_function=None)
            meta = dict(fresh.metadata or {})
            meta[key] = text
            fresh.modify(metadata=meta)  # Chroma replaces the whole metadata: the record goes back with it
            self._c = self._store._client.get_collection(self.name, embedding_function=None)

    def _guard(self) -> Any:
        return _chroma(self._store.db, self.name)

    def partition(self, label: int, create: bool = False) -> VectorCollection | None:
        """The hidden collection of ``label``; None when no item with that label was ever stored.

        "Absent" is only Chroma's not-found answer; any other failure (a server hiccup) raises.
        """
        if label in self._parts:
            return self._parts[label]
        from chromadb.errors import NotFoundError as ChromaNotFound

        name = partition_name(self.name, label)
        with self._guard():
            if create:
                col = self._store._client.get_or_create_collection(
                    name, configuration={"hnsw": dict(PARTITION_HNSW)}, metadata={PARTITION_KEY: self.name}, embedding_function=None
                )
            else:
                try:
                    col = self._store._client.get_collection(name, embedding_function=None)
                except ChromaNotFound:
                    return None
        if (col.metadata or {}).get(PARTITION_KEY) != self.name:
            raise StoreError(
                f"collection {name!r} exists and is not a label partition of {self.name!r}: "
                "drop it, or ingest under another --collection NAME"
            )
        self._parts[label] = VectorCollection(col, self._store)
        return self._parts[label]

    def count(self) -> int:
        with self._guard():
            return int(self._c.count())

    def first_id(self) -> str | None:
        """Any one stored id (for examples in messages), or None when empty."""
        with self._guard():
            got = self._c.get(limit=1, include=[])
        return got["ids"][0] if got["ids"] else None

    def existing_ids(self, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` are stored."""
        found: set[str] = set()
        with self._guard():
            for start in range(0, len(ids), self._store.max_batch):
                got = self._c.get(ids=list(ids[start : start + self._store.max_batch]), include=[])
                found.update(got["ids"])
        return found

    def add(self, ids: Sequence[str], vectors: np.ndarray, metadatas: Sequence[dict[str, Any]], *, partitions_later: bool = False) -> None:
        """Add vectors ``(n, dim)`` float32 in batches Chroma accepts (existing ids are skipped).

        Label partitions are written first: an interrupted add leaves the main collection without
        the batch, so a resumed ingest writes it everywhere again (the partitions' entries replaced).
        ``partitions_later`` (a large ingest): the main collection alone, marked as ahead of its partitions until
        :meth:`fill_partitions` (label filters meanwhile go without them), so that a process writing holds one index
        in memory, not the main collection's and every partition's.
        """
        if self.partitioned and partitions_later:
            self.mark_partitions_behind(True)
        elif self.partitioned:
            self.add_to_partitions(ids, vectors, metadatas)
        self._write("add", ids, vectors, metadatas)

    @property
    def partitions_behind(self) -> bool:
        """The label partitions lack items of the main collection (a large write not filled yet, or interrupted):
        read when the collection was opened, and again, at most every ``BEHIND_RECHECK`` seconds, on a server
        (where other processes write; a local store's lock keeps them out)."""
        if is_server(self._store.db) and time.monotonic() - self._behind_read > BEHIND_RECHECK:
            self._behind = bool(self.note(BEHIND_KEY))
            self._behind_read = time.monotonic()
        return self._behind

    def mark_partitions_behind(self, behind: bool) -> None:
        """Mark (or unmark) the main collection as ahead of its label partitions, in the store (another process
        opening it reads the mark). Written every time (a batch's one metadata write): never skipped on what this
        object last knew. Unmarked, the key is kept, empty."""
        self.set_note(BEHIND_KEY, "1" if behind else "")
        self._behind, self._behind_read = behind, time.monotonic()

    def fill_partitions(self, labels: Sequence[int], *, release: bool = False) -> int:
        """Make each label partition of ``labels`` hold exactly the main collection's items of its label: the missing
        ones read back from the main collection (``PAGE`` at a time) and added, entries without a main item removed;
        then the main collection is no longer marked as ahead of them. Called after writes with ``partitions_later``
        and to finish a fill that was interrupted (it starts over from what the partitions hold). ``release``: let the
        store drop its indexes after each label, so that at most the main collection's and one partition's are in
        memory (each label then loads the main collection's again: ~10 s at a million). Returns the entries added."""
        if not self.partitioned:
            return 0
        added = 0
        for label in labels:
            want = self.ids({"label": int(label)})
            part = self.partition(int(label), create=bool(want))
            if part is None:
                continue
            have = part.ids()
            wanted, held = set(want), set(have)
            extra = [i for i in have if i not in wanted]
            if extra:
                part.delete(extra)
            missing = [i for i in want if i not in held]
            for start in range(0, len(missing), PAGE):
                got_ids, vecs, metas = self.get(missing[start : start + PAGE], vectors=True)
                if got_ids:
                    assert vecs is not None
                    part._write("add", got_ids, vecs, metas)
                    added += len(got_ids)
            if release and missing:
                self._store.release_memory()
            log.info("label partition %d of %r: %d added, %d removed", label, self.name, len(missing), len(extra))
        self.mark_partitions_behind(False)
        return added

    def add_to_partitions(self, ids: Sequence[str], vectors: np.ndarray, metadatas: Sequence[dict[str, Any]]) -> None:
        """Write items to the label partitions only (each to its label's), replacing what a killed write left there:
        the main collection decides what is stored, so a partition entry always follows the item written now."""
        self._write_partitions("upsert", ids, vectors, metadatas)

    def upsert(self, ids: Sequence[str], vectors: np.ndarray, metadatas: Sequence[dict[str, Any]]) -> None:
        """Add or replace items (vector and metadata), label partitions first (as :meth:`add`): an interrupted
        replace leaves the main collection's old fingerprint, so the next sync replaces the item again."""
        if self.partitioned:
            self._write_partitions("upsert", ids, vectors, metadatas)
        self._write("upsert", ids, vectors, metadatas)

    def update_metadatas(self, ids: Sequence[str], metadatas: Sequence[dict[str, Any]]) -> None:
        """Replace the metadata of stored items (vectors kept), label partitions first."""
        if self.partitioned:
            self._write_partitions("update", ids, None, metadatas)
        self._write("update", ids, None, metadatas)

    def delete(self, ids: Sequence[str]) -> None:
        """Remove stored items, from their label partitions first: an interrupted delete leaves them in the
        main collection, so the same delete again completes it (an id not stored is ignored)."""
        ids = list(dict.fromkeys(ids))
        if not ids:
            return
        if self.partitioned:
            got_ids, _, metas = self.get(ids)
            for label in sorted({int(m["label"]) for m in metas if isinstance(m.get("label"), int)}):
                part = self.partition(label)
                if part is not None:
                    part.delete([i for i, m in zip(got_ids, metas) if m.get("label") == label])
        with self._mirror_lock:
            self._generation += 1
            mir, self._mirror = self._mirror, None
        try:
            with self._guard(), self._indexing(ids, removed=True):
                for start in range(0, len(ids), self._store.max_batch):
                    self._c.delete(ids=ids[start : start + self._store.max_batch])
            if mir is not None:
                with self._mirror_lock:
                    mir.remove(ids)
                    self._mirror = mir
                    self._written()  # (in the same step: no query sees the new mirror under the old generation)
        finally:
            with self._mirror_lock:
                self._written()

    def _write_partitions(self, how: str, ids: Sequence[str], vectors: np.ndarray | None, metadatas: Sequence[dict[str, Any]]) -> None:
        """``how`` (add, upsert, update) each item in its label's partition (an unlabelled item has none)."""
        known = {ids[i]: m["label"] for i, m in enumerate(metadatas) if "label" in m}
        if len(known) < len(ids):  # an update of some fields only: each item's partition is its stored label's
            got_ids, _, got_metas = self.get([i for i in ids if i not in known])
            known.update((i, m.get("label", -1)) for i, m in zip(got_ids, got_metas))
        labels = np.array([int(known.get(i, -1)) for i in ids])
        for label in np.unique(labels):
            if label < 0:
                continue
            rows = np.flatnonzero(labels == label)
            part = self.partition(int(label), create=True)
            assert part is not None
            part._write(how, [ids[i] for i in rows], None if vectors is None else vectors[rows], [metadatas[i] for i in rows])

    def _write(self, how: str, ids: Sequence[str], vectors: np.ndarray | None, metadatas: Sequence[dict[str, Any]]) -> None:
        """Chroma's ``add``, ``upsert`` or ``update`` (no vectors) in batches it accepts; the mirror follows a write
        that succeeded (one that failed drops it: it is read again when next needed)."""
        with self._mirror_lock:
            self._generation += 1
            mir, self._mirror = self._mirror, None
        if mir is not None and how == "add":  # Chroma skips ids already stored; update touches stored ids only
            new = [i for i, x in enumerate(ids) if mir.row(x) is None]
        elif mir is not None and how == "update":
            new = [i for i, x in enumerate(ids) if mir.row(x) is not None]
        else:
            new = list(range(len(ids)))
        step = self._store.max_batch
        try:
            with self._guard(), self._indexing(ids if how != "update" else None):
                call = getattr(self._c, how)
                for start in range(0, len(ids), step):
                    end = start + step
                    kwargs: dict[str, Any] = {"ids": list(ids[start:end]), "metadatas": list(metadatas[start:end])}
                    if vectors is not None:
                        kwargs["embeddings"] = vectors[start:end]
                    call(**kwargs)
            if mir is not None:
                vecs = vectors[new] if vectors is not None and mir.keeps_vectors else None
                with self._mirror_lock:
                    mir.put([ids[i] for i in new], vecs, [metadatas[i] for i in new])
                    self._mirror = mir
                    self._written()  # (in the same step: no query sees the new mirror under the old generation)
        finally:
            with self._mirror_lock:
                self._written()  # (also when no mirror was loaded: a read running now must start again)

    @contextmanager
    def _indexing(self, ids: Sequence[str] | None, *, removed: bool = False) -> Iterator[None]:
        """Around a Chroma write of ``ids`` (None: no id added or removed): the id index marked stale before, given the
        ids and Chroma's count after; a write that fails or is killed leaves it stale (built again at its next use).
        An index that cannot be used is gone without (see :class:`~lookalike.core.idindex.IdIndex`)."""
        if self._ids is None or ids is None:
            yield
            return
        with self._ids_lock:
            try:
                was_fresh: bool | None = self._ids.stale(self._ids_key)
            except IdIndexError:
                was_fresh = None
            yield
            if was_fresh is not None:
                stored = int(self._c.count())
                with contextlib.suppress(IdIndexError):
                    (self._ids.removed if removed else self._ids.added)(self._ids_key, ids, stored, was_fresh)

    def _id_epoch(self) -> int:
        """The id index's epoch, after building the index from Chroma's listing when it is missing, stale, counts other
        than Chroma or ends with another id (checked once a process: only this process writes to a local store
        meanwhile). IdIndexError when it cannot be used."""
        assert self._ids is not None
        with self._ids_lock:
            state = self._ids.state(self._ids_key)
            if state is not None and state.fresh and self._ids_checked:
                return state.epoch
            stored = self.count()
            if state is None or not state.agrees(stored) or self._ids.last(self._ids_key) != self._last_listed(stored):
                began = time.perf_counter()
                epoch = self._ids.build(self._ids_key, self.ids())
                log.info("indexed the %d ids of %r in write order (%.1f s)", stored, self.name, time.perf_counter() - began)
            else:
                epoch = state.epoch
            self._ids_checked = True
            return epoch

    def _last_listed(self, stored: int) -> str | None:
        """The last id of Chroma's listing (the order items were written in): a write the index did not see (a process
        of an earlier release) changes it even when the count comes out the same."""
        if stored == 0:
            return None
        with self._guard():
            got = self._c.get(limit=1, offset=stored - 1, include=[])
        return got["ids"][0] if got["ids"] else None

    def verify_id_index(self, listed: Sequence[str]) -> str:
        """Compare the id index with ``listed`` (every id Chroma lists, in its order): when they differ, build the index
        again from it and say so (a note: the index is lookalike's own, derived from the store); "" when they agree or
        there is no index."""
        if self._ids is None:
            return ""
        with self._ids_lock:
            try:
                state = self._ids.state(self._ids_key)
                if state is None:
                    return ""
                held = set(self._ids.ids(self._ids_key))
                differ = len(held.symmetric_difference(listed))
                if not differ and state.agrees(len(listed)):
                    return ""
                self._ids.build(self._ids_key, list(dict.fromkeys(listed)))
            except IdIndexError as exc:
                return str(exc)
            self._ids_checked = True
        what = f"{differ} ids differ" if differ else "a write was not finished"
        return (
            f"lookalike's id index differed from the store ({what}): built again from the store's listing "
            "(a listing by cursor starts again)"
        )

    def page(self, where: dict[str, Any] | None, cursor: str | None, limit: int) -> tuple[list[str], list[dict[str, Any]], str | None]:
        """Up to ``limit`` items matching ``where`` after ``cursor`` (None: from the start): (ids, metadatas, the next
        page's cursor or None at the end). A local collection pages in write order by its id index (a page costs
        the same wherever it starts; added items come at the end, removed ones leave no gap); a filtered page looks at
        up to ``SCAN_MAX`` ids, so a rare filter's page may hold fewer items and still name a next cursor. A server's
        collection (other processes write to it), or one whose index cannot be used, pages in Chroma's order by
        offset: its cursor is an offset."""
        if self._ids is None or self._ids.unavailable:
            return self._page_by_offset(where, cursor, limit)
        with self._ids_lock:  # (one numbering for the whole page: a rebuild by another thread waits)
            try:
                return self._page_by_index(where, cursor, limit)
            except IdIndexError:
                return self._page_by_offset(where, None if cursor and "." in cursor else cursor, limit)

    def _page_by_index(
        self, where: dict[str, Any] | None, cursor: str | None, limit: int
    ) -> tuple[list[str], list[dict[str, Any]], str | None]:
        assert self._ids is not None
        epoch = self._id_epoch()
        after = decode_cursor(cursor, epoch) if cursor else 0
        if where is None:
            chunk = self._ids.after(self._ids_key, after, limit + 1)
            more = len(chunk) > limit
            chunk = chunk[:limit]
            ids, metas = self._in_order(chunk)
            return ids, metas, encode_cursor(epoch, chunk[-1][0]) if more else None
        out_ids: list[str] = []
        out_metas: list[dict[str, Any]] = []
        scanned, step = 0, min(PAGE, max(2 * limit, 100))
        while True:
            chunk = self._ids.after(self._ids_key, after, step)
            if not chunk:
                return out_ids, out_metas, None
            ids, metas = self._in_order(chunk)
            keep = [k for k, m in enumerate(metas) if matches(m, where)]
            room = limit - len(out_ids)
            out_ids += [ids[k] for k in keep[:room]]
            out_metas += [metas[k] for k in keep[:room]]
            if len(keep) > room:  # the page is full inside this chunk: the next one starts after its last item
                seq = {x: s for s, x in chunk}[out_ids[-1]]
                return out_ids, out_metas, encode_cursor(epoch, seq)
            after = chunk[-1][0]
            scanned += len(chunk)
            if len(chunk) < step:
                return out_ids, out_metas, None
            if len(out_ids) == limit or scanned >= SCAN_MAX:
                return out_ids, out_metas, encode_cursor(epoch, after)
            step = min(PAGE, 2 * step)  # (a narrow filter: larger reads)

    def _in_order(self, chunk: list[tuple[int, str]]) -> tuple[list[str], list[dict[str, Any]]]:
        """The stored items of ``chunk`` (write number, id), read by id, in write order."""
        got_ids, _, got_metas = self.get([x for _, x in chunk])
        found = dict(zip(got_ids, got_metas))
        ids = [x for _, x in chunk if x in found]
        return ids, [found[x] or {} for x in ids]

    def _page_by_offset(
        self, where: dict[str, Any] | None, cursor: str | None, limit: int
    ) -> tuple[list[str], list[dict[str, Any]], str | None]:
        text = str(cursor or "0").strip()
        if not (text.isascii() and text.isdigit()) or len(text) > 12:
            raise InputError(f"cursor {text[:40]!r} is not one this collection gave: start again without a cursor")
        offset = int(text)
        with self._guard():
            got = self._c.get(where=where, limit=limit + 1, offset=offset, include=["metadatas"])
        ids, metas = list(got["ids"]), [m or {} for m in got["metadatas"]]
        more = len(ids) > limit
        return ids[:limit], metas[:limit], str(offset + limit) if more else None

    def set_record(self, text: str) -> None:
        """Replace the collection's record (its notes are kept)."""
        with self._guard():
            fresh = self._store._client.get_collection(self.name, embedding_function=None)
            meta = dict(fresh.metadata or {})
            meta[RECORD_KEY] = text
            fresh.modify(metadata=meta)
            self._c = self._store._client.get_collection(self.name, embedding_function=None)

    def get(self, ids: Sequence[str], *, vectors: bool = False) -> tuple[list[str], np.ndarray | None, list[dict[str, Any]]]:
        """(ids, vectors or None, metadatas) of stored ``ids`` (each once), in the order Chroma returns them."""
        include = ["metadatas", "embeddings"] if vectors else ["metadatas"]
        unique = list(dict.fromkeys(ids))  # Chroma refuses repeated ids
        out_ids: list[str] = []
        out_metas: list[dict[str, Any]] = []
        out_vecs: list[np.ndarray] = []
        with self._guard():
            for start in range(0, len(unique), PAGE):  # paged: one get() fails past 32,766 records
                got = self._c.get(ids=unique[start : start + PAGE], include=include)
                out_ids += list(got["ids"])
                out_metas += list(got["metadatas"])
                if vectors and len(got["ids"]):
                    out_vecs.append(np.asarray(got["embeddings"], np.float32))
        if not vectors:
            return out_ids, None, out_metas
        embs = np.concatenate(out_vecs) if out_vecs else np.zeros((0, 0), np.float32)
        return out_ids, embs, out_metas

    def scan(
        self,
        where: dict[str, Any] | None = None,
        *,
        vectors: bool = True,
        dim: int = 0,
        metadatas: bool = True,
        fields: Sequence[str] | None = None,
        only: Sequence[str] | None = None,
    ) -> tuple[list[str], np.ndarray, list[dict[str, Any]]]:
        """Every item matching ``where``, read page by page: (ids, vectors ``(n, dim)``, metadatas). The vectors
        are written into one array as the pages come (no second copy); ``fields``: keep only these metadata keys
        (a million items' whole metadata is a gigabyte of dicts); ``metadatas=False``: none read
        (an empty list); ``only``: read these ids, in
        this order, instead of listing the filter's (a sample of :meth:`ids`; those no longer stored are left out)."""
        ids: list[str] = []
        metas: list[dict[str, Any]] = []
        vecs = np.zeros((0, dim), np.float32)
        listed = list(dict.fromkeys(only)) if only is not None else self.ids(where)
        for page_ids, page_vecs, page_metas in self._read(listed, vectors=vectors, metadatas=metadatas):
            if page_vecs is not None:
                if len(vecs) < len(listed):  # (allocated at the first page, which gives the length)
                    vecs = np.empty((len(listed), page_vecs.shape[1]), np.float32)
                vecs[len(ids) : len(ids) + len(page_ids)] = page_vecs
            ids += page_ids
            if metadatas:
                metas += page_metas if fields is None else [{k: m[k] for k in fields if k in m} for m in page_metas]
        if len(vecs) > len(ids):  # (items removed while the scan ran: a view, not a second copy)
            vecs = vecs[: len(ids)]
        return ids, vecs, metas

    def values(self, field: str, values: Sequence[Any]) -> dict[str, Any]:
        """id -> ``field`` of every item whose ``field`` is one of ``values``, each value's ids listed (ids only, no
        metadata read: a million items' labels in ~20 s, where reading them with the vectors costs ~70 s more)."""
        found: dict[str, Any] = {}
        for value in values:
            found.update(dict.fromkeys(self.ids({field: value}), value))
        return found

    def get_page(self, offset: int, limit: int) -> tuple[list[str], None, list[dict[str, Any]]]:
        """(ids, None, metadatas) of up to ``limit`` items from ``offset`` in Chroma's order."""
        with self._guard():
            got = self._c.get(limit=limit, offset=offset, include=["metadatas"])
        return list(got["ids"]), None, list(got["metadatas"])

    def pages(
        self, where: dict[str, Any] | None = None, *, vectors: bool = True, metadatas: bool = True
    ) -> Iterator[tuple[list[str], np.ndarray | None, list[dict[str, Any]]]]:
        """The items matching ``where``, ``PAGE`` at a time: (ids, vectors or None, metadatas or empty dicts).

        Paged by id, not by offset. Every item of a local collection: its id index's ids ``PAGE`` at a time, in write
        order (no listing of every id in memory; an item added during the scan is read at the end). Otherwise the
        matching ids are listed first (``ID_PAGE`` at a time, ids only), then read by id, and one added after the
        listing is not read. An item removed during the scan is left out."""
        if where is None and self._ids is not None and not self._ids.unavailable:
            return self._pages_by_index(vectors=vectors, metadatas=metadatas)
        return self._read(self.ids(where), vectors=vectors, metadatas=metadatas)

    def _pages_by_index(self, *, vectors: bool, metadatas: bool) -> Iterator[tuple[list[str], np.ndarray | None, list[dict[str, Any]]]]:
        assert self._ids is not None
        try:
            epoch = self._id_epoch()
        except IdIndexError:
            yield from self._read(self.ids(), vectors=vectors, metadatas=metadatas)
            return
        after = 0
        while True:
            with self._ids_lock:  # (the chunk and the epoch it belongs to, read together)
                state = self._ids.state(self._ids_key)
                if state is None or state.epoch != epoch:
                    raise StoreError(f"collection {self.name!r} was indexed again while it was read: run the command again")
                chunk = self._ids.after(self._ids_key, after, PAGE)
            if not chunk:
                return
            after = chunk[-1][0]
            yield from self._read([x for _, x in chunk], vectors=vectors, metadatas=metadatas)

    def ids(self, where: dict[str, Any] | None = None) -> list[str]:
        """The ids of every item matching ``where``, in Chroma's order (listed ``ID_PAGE`` at a time, ids only)."""
        listed: list[str] = []
        with self._guard():
            while True:
                got = self._c.get(where=where, limit=ID_PAGE, offset=len(listed), include=[])
                listed += got["ids"]
                if len(got["ids"]) < ID_PAGE:
                    break
        return list(dict.fromkeys(listed))  # (a write between two listings can shift an id into the next one)

    def _read(
        self, listed: list[str], *, vectors: bool, metadatas: bool
    ) -> Iterator[tuple[list[str], np.ndarray | None, list[dict[str, Any]]]]:
        include = (["metadatas"] if metadatas else []) + (["embeddings"] if vectors else [])
        for start in range(0, len(listed), PAGE):
            chunk = listed[start : start + PAGE]
            if not include:
                yield chunk, None, [{} for _ in chunk]
                continue
            with self._guard():
                got = self._c.get(ids=chunk, include=include)
            n = len(got["ids"])
            if n == 0:
                continue
            at = {x: i for i, x in enumerate(got["ids"])}
            order = [at[x] for x in chunk if x in at]  # (Chroma answers in its own order: the listing's, kept)
            vecs = np.asarray(got["embeddings"], np.float32)[order] if vectors else None
            metas = [got["metadatas"][i] for i in order] if metadatas else [{} for _ in range(n)]
            yield [got["ids"][i] for i in order], vecs, metas

    def query(
        self,
        vectors: np.ndarray,
        k: int,
        where: dict[str, Any] | None = None,
        *,
        exclude: Collection[str] = (),
        metadata: bool = True,
    ) -> list[list[Neighbor]]:
        """The ``k`` nearest stored items to each row of ``vectors`` ``(n, dim)`` that match ``where`` and
        are not in ``exclude``, nearest first.

        A filter on labels uses the label partitions when there are some (each label's partition is
        searched with the rest of the filter, the answers merged by distance). Otherwise the
        collection is first asked *unfiltered* (``k + 16`` neighbours, or ``max(4k + 16, 100)`` with
        a filter) and the matching, non-excluded ones are kept: when at least ``k`` remain they are
        the ``k`` nearest (any nearer match would be among them). Only rows left short are asked
        again: exactly, by brute force over the matching items, when the filter matches at most
        ``EXACT_MAX`` (a narrow filter: its ids are listed from SQLite alone); else with Chroma's
        ``where`` (~50 ms a query on 70,000 items, against ~7 ms for the probe), or wider.
        ``metadata=False`` skips reading metadata back (a third of an unfiltered query's
        time) when no filter needs it.
        """
        if len(vectors) == 0:
            return []
        split = label_filter(where) if where is not None and self.partitioned and not self.partitions_behind else None
        if split is not None:
            labels, rest = split
            rows: list[list[Neighbor]] = [[] for _ in range(len(vectors))]
            for label in labels:
                part = self.partition(label)
                if part is not None:
                    for row, got in zip(rows, part.query(vectors, k, rest, exclude=exclude, metadata=metadata)):
                        row.extend(got)
            return [sorted(row, key=lambda n: n.distance)[:k] for row in rows]
        excluded = set(exclude)
        mir = self._mirror if self.warm else None
        if where is not None and mir is None:
            self.ensure_loading()
        if where is not None and mir is not None:
            return self._planned(mir, vectors, k, where, excluded, metadata)
        if where is None and metadata and mir is not None:  # metadata from the mirror: Chroma's read of it is most of a query
            found = self.query(vectors, k, exclude=exclude, metadata=False)
            with self._mirror_lock:  # (an item removed since is left out)
                return [[Neighbor(n.id, n.distance, mir.metadata(n.id)) for n in row if mir.row(n.id) is not None] for row in found]
        kept = self._kept_narrow(where) if where is not None else None
        if kept is not None:  # a narrow filter met before (and no write since): exact over its items, no probe
            self.plan_counts["brute"] += len(vectors)
            return _nearest_of(vectors, k, kept, excluded, metadata)
        if where is None:
            # excluded items met on the way: ~k x their share of the collection (long rankings of evaluate), plus a margin
            share = min(1.0, len(excluded) / max(self.count() - len(excluded), 1)) if k > EXTRA and excluded else 0.0
            probe = k + min(len(excluded), EXTRA + int(1.25 * k * share))
        else:
            probe = max(4 * k + 16, PROBE)
        with_meta = metadata or where is not None

        def keep(row: list[Neighbor]) -> list[Neighbor]:
            return [n for n in row if n.id not in excluded and (where is None or matches(n.metadata, where))][:k]

        raw = self._query(vectors, probe, None, with_meta)
        out = [keep(row) for row in raw]
        # a short row whose probe came back full may have more matches further out: ask again
        short = [i for i, row in enumerate(out) if len(row) < k and len(raw[i]) == probe]
        if where is not None:
            self.plan_counts["probe"] += len(out) - len(short)
        if short:
            log.debug("%d of %d queries had fewer than %d matches among %d neighbours", len(short), len(out), k, probe)
            narrow = self._narrow_items(where) if where is not None else None
            if narrow is not None:  # a narrow filter: exact, over the matching items alone
                self.plan_counts["brute"] += len(short)
                for i, row in zip(short, _nearest_of(vectors[short], k, narrow, excluded, with_meta)):
                    out[i] = row
            else:
                self.plan_counts["where"] += len(short)
                for i, row in zip(short, self._query(vectors[short], k + len(excluded), where, with_meta)):
                    out[i] = keep(row)
        return out

    def _planned(
        self, mir: Mirror, vectors: np.ndarray, k: int, where: dict[str, Any], excluded: set[str], metadata: bool
    ) -> list[list[Neighbor]]:
        """A warm collection's filtered query, planned from the mirror's exact count of matching items:
        a broad filter (``BROAD`` of the items or more) over-fetches unfiltered neighbours and keeps the matches
        (rows left short are answered by the next plan); a narrower one is answered by brute force over the
        matching vectors: mirrored, or, when the mirror has no vectors, read by id once and kept until the next write
        (at most ``EXACT_MAX`` of them); else by Chroma's search restricted to the matching ids. Every plan is exact
        up to the HNSW index's own recall."""
        with self._mirror_lock:  # a consistent view: the matching rows, their ids and vectors
            mask = mir.mask(where)
            every = rows = np.flatnonzero(mask)  # every matching item, before any exclusion
            if excluded:
                mask[mir.rows(excluded)] = False
                rows = np.flatnonzero(mask)
            ids = mir.ids[rows]
            every_ids = ids if rows is every else mir.ids[every]
            key = (json.dumps(where, sort_keys=True), self._generation)
            kept = self._matched.get(key)  # their vectors, kept from an earlier query
            if kept is None and mir.vectors is not None and len(every) < BROAD * max(len(mir), 1):
                kept = Base.of(every_ids, mir.vectors[every])  # (a broad filter's over-fetch rarely needs them)
                self._keep_matched(key, kept)
            live = len(mir)
            share = len(rows) / max(live, 1)
        out: list[list[Neighbor]] = [[] for _ in range(len(vectors))]
        if len(rows) == 0:
            return out
        todo = list(range(len(vectors)))
        if share >= BROAD:
            probe = int(min(PROBE_MAX, OVERFETCH * k / share + PROBE_MIN + min(len(excluded), EXTRA)))
            for i, got in enumerate(self._query(vectors, probe, None, False)):
                out[i] = [n for n in got if (r := mir.row(n.id)) is not None and r < len(mask) and mask[r]][:k]
            todo = [i for i, row in enumerate(out) if len(row) < min(k, len(rows))]
            self.plan_counts["overfetch"] += len(vectors) - len(todo)
        if todo and kept is None and mir.vectors is None and len(every) <= EXACT_MAX:
            # vectors not mirrored (they did not fit): the matching ones read by id once, kept until the next write
            got_ids, got_vecs, _ = self.get(list(every_ids), vectors=True)
            if got_vecs is None or not len(got_ids):
                got_vecs = np.zeros((0, self.dim or vectors.shape[1]), np.float32)
            kept = Base.of(np.array(got_ids, dtype=object), got_vecs)
            with self._mirror_lock:
                if self._generation == key[1]:  # (not when a write ran meanwhile)
                    self._keep_matched(key, kept)
        if todo:
            if kept is not None or mir.vectors is not None:
                skip = excluded
                if kept is None:  # (a broad filter's rows left short: the excluded ones are not among them)
                    with self._mirror_lock:
                        kept = Base.of(ids, mir.vectors[rows])
                    skip = set()
                self.plan_counts["mirror" if mir.vectors is not None else "kept"] += len(todo)
                for i, got in zip(todo, _nearest_excluding(vectors[todo], kept, k, skip)):
                    out[i] = got
            elif len(rows) > ALLOW_MAX:  # (an id list that long would pass SQLite's variable limit): Chroma's where
                self.plan_counts["where"] += len(todo)
                for i, got in zip(todo, self._query(vectors[todo], k + len(excluded), where, False)):
                    out[i] = [n for n in got if n.id not in excluded][:k]
            else:
                self.plan_counts["allow-list"] += len(todo)
                allowed = list(ids)
                with self._guard():
                    for i in todo:
                        got = self._c.query(query_embeddings=vectors[i : i + 1], n_results=k, ids=allowed, include=["distances"])
                        out[i] = [Neighbor(x, float(np.sqrt(max(d, 0.0))), {}) for x, d in zip(got["ids"][0], got["distances"][0])]
        if metadata:
            with self._mirror_lock:  # (an item removed since is left out)
                out = [[Neighbor(n.id, n.distance, mir.metadata(n.id)) for n in row if mir.row(n.id) is not None] for row in out]
        return out

    def _written(self) -> None:
        """A write ended: a new generation, and the filters' kept vectors of the old one dropped. Under the mirror lock."""
        self._generation += 1
        self._matched.clear()

    def _keep_matched(self, key: tuple[str, int], base: Base) -> None:
        """Keep a filter's matching vectors (``key``: its JSON and the write generation; a write drops them all) for
        the next queries. Under the mirror lock."""
        _keep_last(self._matched, key, base, lambda b: b.vectors.nbytes)

    def _kept_narrow(self, where: dict[str, Any]) -> Narrow | None:
        """A narrow filter's items as :meth:`_narrow_items` kept them, when no write happened since."""
        kept = self._narrow.get(json.dumps(where, sort_keys=True))
        if kept is None or kept[0] != self._generation or len(kept[1]) > EXACT_MAX:
            return None
        return Narrow(kept[1], kept[2], kept[3])

    def _narrow_items(self, where: dict[str, Any]) -> Narrow | None:
        """The items matching ``where`` when they are at most ``EXACT_MAX``, else None.
        Their ids are listed from SQLite alone (no index), then read by id; a local collection keeps the answer
        until its next write (its lock keeps other writers out; a server's other clients may write, so it does not)."""
        kept = self._kept_narrow(where)
        if kept is not None:
            return kept
        key = json.dumps(where, sort_keys=True)
        generation = self._generation
        with self._guard():
            listed = list(self._c.get(where=where, limit=EXACT_MAX + 1, include=[])["ids"])
        if len(listed) > EXACT_MAX:
            return None
        ids, vecs, metas = self.get(listed, vectors=True)
        if vecs is None or len(ids) == 0:
            vecs = np.zeros((0, self.dim), np.float32)
        base = Base.of(np.array(ids, dtype=object), vecs)
        if not is_server(self._store.db) and vecs.nbytes <= NARROW_MB * 2**20:
            with self._mirror_lock:
                if self._generation == generation:  # (not when a write ran meanwhile)
                    _keep_last(self._narrow, key, (generation, ids, metas, base), lambda v: v[3].vectors.nbytes)
        return Narrow(ids, metas, base)

    def _query(self, vectors: np.ndarray, k: int, where: dict[str, Any] | None, metadata: bool) -> list[list[Neighbor]]:
        out: list[list[Neighbor]] = []
        if k < 1:
            return [[] for _ in range(len(vectors))]
        inline = metadata and k <= META_RESULTS  # else the metadatas are read afterwards, by id
        include = ["metadatas", "distances"] if inline else ["distances"]
        batch = max(1, min(QUERY_BATCH, META_RESULTS // k)) if inline else QUERY_BATCH
        with self._guard():
            for start in range(0, len(vectors), batch):
                got = self._c.query(
                    query_embeddings=np.asarray(vectors[start : start + batch], np.float32),
                    n_results=k,
                    where=where,
                    include=include,
                )
                for row, ids in enumerate(got["ids"]):
                    if inline:
                        metas = got["metadatas"][row]
                    elif metadata:
                        got_ids, _, got_metas = self.get(ids)
                        by_id = dict(zip(got_ids, got_metas))
                        metas = [by_id.get(i, {}) for i in ids]
                    else:
                        metas = [{}] * len(ids)
                    out.append([Neighbor(i, float(np.sqrt(max(d, 0.0))), m) for i, d, m in zip(ids, got["distances"][row], metas)])
        return out


def _keep_last(cache: dict[Any, T], key: Any, value: T, nbytes: Callable[[T], int]) -> None:
    """Keep ``value`` under ``key``: the last ``NARROW_KEPT`` values, at most ``NARROW_MB`` of vectors in all (the
    oldest dropped first); a value larger than that is not kept."""
    size = nbytes(value)
    if size > NARROW_MB * 2**20:
        return
    cache.pop(key, None)
    while cache and (len(cache) >= NARROW_KEPT or sum(nbytes(v) for v in cache.values()) > NARROW_MB * 2**20 - size):
        cache.pop(next(iter(cache)))
    cache[key] = value


def _nearest_of(queries: np.ndarray, k: int, items: Narrow, excluded: Collection[str], metadata: bool) -> list[list[Neighbor]]:
    """The exact ``k`` nearest of the given items (not ``excluded``) to each query, with their metadata when asked."""
    found = _nearest_excluding(queries, items.base, k, excluded)
    if not metadata:
        return found
    meta_of = dict(zip(items.ids, items.metadatas))
    return [[Neighbor(n.id, n.distance, dict(meta_of[n.id])) for n in row] for row in found]


@dataclass(frozen=True)
class Base:
    """Items prepared for brute-force search: their ids, float32 vectors (C order) and squared norms."""

    ids: np.ndarray
    vectors: np.ndarray
    norms: np.ndarray

    @classmethod
    def of(cls, ids: np.ndarray, vectors: np.ndarray) -> Base:
        vecs = np.ascontiguousarray(vectors, np.float32)
        return cls(ids, vecs, np.einsum("ij,ij->i", vecs, vecs))

    def __len__(self) -> int:
        return len(self.ids)


class Narrow(NamedTuple):
    """A filter's matching items: ids and metadatas, and their vectors prepared for search."""

    ids: list[str]
    metadatas: list[dict[str, Any]]
    base: Base


# float32's error on a squared distance, relative to |q|^2 + |b|^2: a dot product of d terms is within d x 2^-24 x |q||b|
# (the worst case; typically sqrt(d) x that), so a margin of 4 d 2^-24 x (|q|^2 + max |b|^2) keeps every candidate
def _margin(dim: int) -> float:
    return 4.0 * dim * 2.0**-24


def _nearest_excluding(queries: np.ndarray, base: Base, k: int, excluded: Collection[str]) -> list[list[Neighbor]]:
    """:func:`_nearest` without the ``excluded`` ids: a few (a search by a stored id leaves itself out) are asked
    for beyond k and dropped; more (evaluate's held-out items) are taken out of ``base`` first."""
    if not excluded:
        return _nearest(queries, base, k)
    if len(excluded) <= EXTRA:
        return [[n for n in row if n.id not in excluded][:k] for row in _nearest(queries, base, k + len(excluded))]
    keep = np.array([i not in excluded for i in base.ids], bool)
    return _nearest(queries, Base(base.ids[keep], base.vectors[keep], base.norms[keep]), k)


def _nearest(queries: np.ndarray, base: Base, k: int) -> list[list[Neighbor]]:
    """The exact ``k`` nearest of ``base`` to each query (ties by id), without metadata: candidates by float32
    distances (one pass over the vectors), then those within float32's error of the k-th, ranked in float64."""
    n = len(base)
    if n == 0:
        return [[] for _ in range(len(queries))]
    q32 = np.asarray(queries, np.float32)
    qn = np.einsum("ij,ij->i", q32, q32).astype(np.float64)
    approx = base.norms[None, :] - 2 * (q32 @ base.vectors.T)  # |q - b|^2 - |q|^2, float32
    slack = _margin(base.vectors.shape[1]) * (qn + float(base.norms.max()))
    out = []
    for i, row in enumerate(approx):
        cut = row[np.argpartition(row, k - 1)[:k]].max() if k < n else row.max()
        cand = np.flatnonzero(row <= cut + 2 * slack[i])
        q = np.asarray(queries[i], np.float64)
        diff = base.vectors[cand].astype(np.float64) - q
        d2 = np.einsum("ij,ij->i", diff, diff)
        order = np.lexsort((base.ids[cand].astype(str), d2))[:k]  # ties by id
        out.append([Neighbor(str(base.ids[cand[j]]), float(np.sqrt(d2[j])), {}) for j in order])
    return out


def label_filter(where: dict[str, Any]) -> tuple[list[int], dict[str, Any] | None] | None:
    """``(labels, rest of the filter)`` when ``where`` requires ``label`` to be one of some ints, else None."""
    clauses = where["$and"] if set(where) == {"$and"} else [{k: v} for k, v in where.items()]
    labels: list[int] | None = None
    rest = []
    for clause in clauses:
        (key, cond), *more = clause.items()
        if key == "label" and not more and labels is None:
            if isinstance(cond, dict) and set(cond) == {"$in"}:
                labels = [int(v) for v in cond["$in"]]
                continue
            value = cond["$eq"] if isinstance(cond, dict) and set(cond) == {"$eq"} else cond
            if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
                labels = [int(value)]
                continue
        rest.append(clause)
    if labels is None:
        return None
    return labels, (None if not rest else rest[0] if len(rest) == 1 else {"$and": rest})


def partition_name(name: str, label: int) -> str:
    return f"{name}.p{label}"


class Store:
    """A Chroma client on a directory (holding its lock) or a server URL.

    ``wait``: seconds to wait for another process's lock on a local directory (default: fail at once).
    Close it (or use it as a context manager) to release the lock before the process ends.
    """

    def __init__(self, db: str | os.PathLike[str] | None = None, *, create: bool = False, wait: float | None = None) -> None:
        self._lock: StoreLock | None = None
        self._client: Any = None
        self._path: Path | None = None
        self._ids: IdIndex | None = None  # a local store's id index (see lookalike.core.idindex)
        self.epoch = 0  # clients so far (see release_memory)
        self.db = str(db) if db is not None else default_db()
        if is_server(self.db):
            self._client = _http_client(self.db)
        else:
            path = self._path = _local_dir(Path(self.db).expanduser(), create).resolve()
            self._lock = StoreLock(path, wait)
            self._ids = IdIndex(path)
            try:
                self._client = _persistent_client(path)
            except BaseException:
                self.close()
                raise
        try:
            with _chroma(self.db):
                self.max_batch = int(self._client.get_max_batch_size())
            with _chroma(self.db):
                self._finish_rebuilds()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Store:
        return self

    def __del__(self) -> None:  # a forgotten Store still lets go of the lock when collected
        with contextlib.suppress(Exception):  # at interpreter exit, modules may already be gone
            self.close()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the client and, for a local directory, this process's lock on it (the lock even if closing fails)."""
        client, self._client = self._client, None
        lock, self._lock = self._lock, None
        if self._ids is not None:
            self._ids.close()
        try:
            close = getattr(client, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):  # a client that fails to close must not keep the lock
                    close()
        finally:
            if lock is not None:
                lock.close()

    def release_memory(self) -> None:
        """Let Chroma drop what a local store holds in memory: each collection's HNSW index, loaded at its first read
        and kept (3.8 GB for a million 784-d vectors). The next call loads what it needs again (~10 s at a million).
        The lock stays held. For audit, which then builds its own index of the vectors it read (a server's memory
        is the server's)."""
        if self._path is None or self._client is None:
            return
        import gc

        with _chroma(self.db):
            close = getattr(self._client, "close", None)
            if close is not None:
                close()  # (the path's last client: Chroma stops its system, and the indexes go with it)
            self._client = None
            gc.collect()
            trim_memory()
            self._client = _persistent_client(self._path)
        self.epoch += 1

    def names(self) -> list[str]:
        """The collections' names (label partitions are hidden)."""
        return sorted(name for name, owner in self.all_collections() if owner is None)

    def all_collections(self) -> list[tuple[str, str | None]]:
        """(name, the collection it partitions or None) of every Chroma collection."""
        out = []
        with _chroma(self.db):
            for c in self._client.list_collections():
                meta = getattr(c, "metadata", None) or {}
                out.append((c.name if hasattr(c, "name") else str(c), meta.get(PARTITION_KEY) or meta.get(REBUILD_KEY)))
        return out

    def exists(self, name: str) -> bool:
        return name in self.names()

    def pick(self, name: str | None) -> str:
        """``name`` if the store has it; with ``None``, the only collection. NotFound/InputError listing them otherwise."""
        names = self.names()
        if name is None:
            if len(names) == 1:
                return names[0]
            if not names:
                raise NotFoundError(f"the store at {self.db} has no collections: run `lookalike ingest` first")
            raise InputError(f"the store at {self.db} has several collections, pass --collection: {', '.join(names)}")
        if name not in names:
            listing = ", ".join(names) if names else "none"
            raise NotFoundError(f"no collection {name!r} in {self.db} (collections: {listing})")
        return name

    def open(self, name: str, partitioned: bool = False) -> VectorCollection:
        """The existing collection ``name``."""
        with _chroma(self.db, name):
            col = self._client.get_collection(name, embedding_function=None)
        return VectorCollection(col, self, partitioned, indexed=True)

    def create(self, name: str, record_json: str, partitioned: bool, notes: dict[str, str] | None = None) -> VectorCollection:
        """A new collection holding ``record_json`` in its metadata.

        Refused when ``name`` exists (nothing is touched then). Partitions left by an earlier
        collection of the same name (a crash between dropping them and it) are removed only once
        the new collection exists.
        """
        check_name(name)
        if any(existing == name for existing, _ in self.all_collections()):
            raise StoreError(
                f"collection {name!r} already exists in {self.db}: run the command again to add to it, or choose another --collection"
            )
        try:
            col = self._client.create_collection(
                name, configuration={"hnsw": dict(HNSW)}, metadata={**(notes or {}), RECORD_KEY: record_json}, embedding_function=None
            )
        except Exception as exc:
            if "already exists" in str(exc):  # another client of a server made it just now
                raise StoreError(f"collection {name!r} was just created by another process: run the command again to add to it") from None
            raise _chroma_error(exc, self.db, name) from None
        self.drop_partitions(name)
        if self._ids is not None:
            self._ids.build(str(col.id), [])  # (indexed from its first write)
        return VectorCollection(col, self, partitioned, indexed=True)

    def rebuild(self, name: str) -> int:
        """Rebuild collection ``name``'s index from its stored vectors and metadata (nothing is embedded): copy every
        item into a new collection, then put it in the old one's place. Chroma only marks deleted nodes of its
        HNSW graph, and after many deletes and replacements some live items can no longer be reached by a query
        (measured: docs/living-collections.md); a rebuilt index reaches them all again.

        Kill-safe: until the copy is complete the original is untouched (an unfinished copy is dropped the
        next time the store is opened); once the original is dropped, opening the store finishes the swap.
        Returns the items copied.
        """
        tmp = name + REBUILD_SUFFIX
        with _chroma(self.db, name):
            src = self._client.get_collection(name, embedding_function=None)
            meta = dict(src.metadata or {})
            with contextlib.suppress(Exception):
                self._client.delete_collection(tmp)
            dst = self._client.create_collection(
                tmp, configuration={"hnsw": dict(HNSW)}, metadata={**meta, REBUILD_KEY: name}, embedding_function=None
            )
            copied = 0
            for ids, vecs, metas in VectorCollection(src, self).pages(vectors=True):
                for start in range(0, len(ids), self.max_batch):
                    end = start + self.max_batch
                    dst.add(ids=ids[start:end], embeddings=vecs[start:end], metadatas=metas[start:end])  # type: ignore[index]
                copied += len(ids)
            if dst.count() != src.count():
                raise DamagedError(f"rebuilding {name!r} copied {dst.count()} of its {src.count()} items: run `lookalike check` again")
            self._client.delete_collection(name)
            dst.modify(name=name, metadata=meta)
        if self._ids is not None:
            self._ids.forget(str(src.id))  # (the copy has another UUID: its ids are indexed at its first page)
        return copied

    def _finish_rebuilds(self) -> None:
        """Complete or undo a rebuild a killed process left: the copy replaces a dropped original (also on a server:
        there is nothing else to do with it), or an unfinished copy beside its original is dropped (only under a local
        store's lock: on a server another process may be copying now; its next rebuild starts afresh)."""
        for c in self._client.list_collections():
            target = (getattr(c, "metadata", None) or {}).get(REBUILD_KEY)
            if not target:
                continue
            names = {x.name for x in self._client.list_collections()}
            if target in names:
                if self._lock is not None:
                    log.warning("dropping the unfinished rebuild of %r (the collection itself is untouched)", target)
                    self._client.delete_collection(c.name)
            else:
                log.warning("finishing the rebuild of %r that a stopped process left", target)
                col = self._client.get_collection(c.name, embedding_function=None)
                col.modify(name=target, metadata={k: v for k, v in (col.metadata or {}).items() if k != REBUILD_KEY})

    def drop(self, name: str) -> None:
        """Delete collection ``name`` and its label partitions (partitions first: a crash leaves the main one listed)."""
        self.pick(name)
        self.drop_partitions(name)
        with _chroma(self.db, name):
            key = str(self._client.get_collection(name, embedding_function=None).id)
            self._client.delete_collection(name)
        if self._ids is not None:
            self._ids.forget(key)

    def drop_partitions(self, name: str) -> None:
        for part, owner in self.all_collections():
            if owner == name:
                with _chroma(self.db, part):
                    self._client.delete_collection(part)


def check_name(name: str) -> None:
    if not _NAME.match(name):
        raise InputError(
            f"invalid collection name {name!r}: use 3-512 letters, digits, '.', '_' or '-', starting and ending with a letter or digit"
        )
    if _RESERVED_NAME.search(name):
        raise InputError(
            f"invalid collection name {name!r}: names ending in .pN or .rebuild are kept for label partitions and index rebuilds; "
            "choose another"
        )


def _local_dir(path: Path, create: bool) -> Path:
    if path.exists() and not path.is_dir():
        raise StoreError(f"--db {path} is a file, not a directory: pass --db a directory path")
    if not create and not path.is_dir():
        raise NotFoundError(f"no store at {path}: run `lookalike ingest` first, or pass --db PATH (or set LOOKALIKE_DB)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".lookalike-write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise StoreError(f"cannot write to --db {path} ({exc.strerror or exc}): pass --db a writable directory") from None
    return path


def _persistent_client(path: Path) -> Any:
    import chromadb
    from chromadb.config import Settings

    try:
        return chromadb.PersistentClient(path=str(path), settings=Settings(anonymized_telemetry=False))
    except Exception as exc:
        raise StoreError(
            f"cannot open the Chroma store at {path} ({first_line(exc)}): run `lookalike check --db {path}`, or restore it from a copy"
        ) from None


def _http_client(url: str) -> Any:
    import chromadb
    from chromadb.config import Settings

    u = urlparse(url)
    if not u.hostname:
        raise InputError(f"--db {url} is not a server address: use http://HOST:PORT")
    try:
        port = u.port or (443 if u.scheme == "https" else 8000)
    except ValueError:
        raise InputError(f"--db {url} has a bad port: use http://HOST:PORT") from None
    try:
        client = chromadb.HttpClient(host=u.hostname, port=port, ssl=u.scheme == "https", settings=Settings(anonymized_telemetry=False))
        client.heartbeat()
        return client
    except Exception as exc:
        raise StoreError(
            f"cannot reach a Chroma server at {url} ({first_line(exc, 100)}): start one with `chroma run --path DIR --port N`"
        ) from None
