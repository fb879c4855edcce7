"""The vector store: the only module that talks to Chroma.

``db`` is a directory (a Chroma ``PersistentClient``, one process at a time) or
``http://HOST:PORT`` (a server started with ``chroma run --path DIR --port N``, shared by many
processes). Vectors are always supplied (no embedding function). Each collection's metadata holds a
JSON *record*: the embedder spec, the dataset protocol and the label names, so that later commands
rebuild the same embedder and refuse to mix different ones.

Chroma facts honoured here (chromadb 1.5.9): writes go in batches of at most
``get_max_batch_size()``; ``get`` is paged (it fails past 32,766 records with metadatas); ``l2``
distances are squared, so :meth:`VectorCollection.query` returns Euclidean distances.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from lookalike.errors import InputError, MismatchError, NotFoundError, StoreError

log = logging.getLogger(__name__)

DEFAULT_DB = "./lookalike-db"
RECORD_KEY = "lookalike"
PAGE = 5000  # rows per get() page, below Chroma's 32,766-record limit
# ef_search 64: recall@1 0.9999 on MNIST's 10,000 held-out VGG16 vectors against 60,000, the same as
# ef_search 200, in 6.7 s instead of 12.2 s (32: 3.6 s, same recall); see README "Performance".
HNSW = {"space": "l2", "ef_construction": 200, "ef_search": 64, "max_neighbors": 32}
# a label partition is small (a tenth of MNIST): a wider search costs ~1 ms and lifts label-filtered
# recall@5 from 0.975 to 0.997 (Chroma's where over the whole gallery: 0.998, at ~50 ms a query)
PARTITION_HNSW = {**HNSW, "ef_search": 256}
QUERY_BATCH = 500  # query vectors per Chroma call (larger batches were no faster)
PROBE = 100  # neighbours asked unfiltered before falling back to a ``where`` query
PARTITION_KEY = "lookalike_partition_of"  # metadata of a label partition: the collection it belongs to
MAX_PARTITIONS = 100  # collections with more labels than this get no label partitions
_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{1,510}[a-zA-Z0-9]$")


def default_db() -> str:
    """``$LOOKALIKE_DB`` or ``./lookalike-db``."""
    return os.environ.get("LOOKALIKE_DB") or DEFAULT_DB


@dataclass
class Neighbor:
    """One query result: id, Euclidean distance and the stored metadata."""

    id: str
    distance: float
    metadata: dict[str, Any]


@dataclass
class CollectionInfo:
    """A collection's name, size and what built it."""

    name: str
    count: int
    dataset: str
    embedder: str
    record: dict[str, Any]


class VectorCollection:
    """A Chroma collection of image vectors with ``label``/``split`` metadata.

    When its record says ``label_partitions``, every vector is also stored in a hidden collection
    per label (``NAME.pLABEL``, written before the main one so that a resumed ingest completes
    them): a label-filtered query searches those small indexes instead of running Chroma's
    ``where`` over the whole gallery (~50 ms a query on 70,000 items, see :meth:`query`).
    """

    def __init__(self, collection: Any, max_batch: int, client: Any = None) -> None:
        self._c = collection
        self._max_batch = max_batch
        self._client = client
        self.name: str = collection.name
        self.record: dict[str, Any] = _read_record(collection)
        self._count: int | None = None
        self._parts: dict[int, VectorCollection | None] = {}

    @property
    def partitioned(self) -> bool:
        return bool(self.record.get("label_partitions")) and self._client is not None

    def _partition(self, label: int, create: bool = False) -> VectorCollection | None:
        """The hidden collection of ``label`` (None when it holds nothing yet)."""
        if self._parts.get(label) is None:
            name = partition_name(self.name, label)
            if create:
                col = self._client.get_or_create_collection(
                    name, configuration={"hnsw": dict(PARTITION_HNSW)}, metadata={PARTITION_KEY: self.name}, embedding_function=None
                )
            else:
                try:
                    col = self._client.get_collection(name, embedding_function=None)
                except Exception:  # no item with this label was ever stored
                    return None
            if (col.metadata or {}).get(PARTITION_KEY) != self.name:
                raise StoreError(f"collection {name!r} exists and is not a label partition of {self.name!r}: "
                                 "ingest under another --collection NAME (or drop it)")  # fmt: skip
            self._parts[label] = VectorCollection(col, self._max_batch)
        return self._parts[label]

    def count(self) -> int:
        if self._count is None:
            self._count = int(self._c.count())
        return self._count

    def first_id(self) -> str | None:
        """Any one stored id (for examples in messages), or None when empty."""
        got = self._c.get(limit=1, include=[])
        return got["ids"][0] if got["ids"] else None

    def existing_ids(self, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` are stored."""
        found: set[str] = set()
        for start in range(0, len(ids), self._max_batch):
            got = self._c.get(ids=list(ids[start : start + self._max_batch]), include=[])
            found.update(got["ids"])
        return found

    def add(self, ids: Sequence[str], vectors: np.ndarray, metadatas: Sequence[dict[str, Any]]) -> None:
        """Add vectors ``(n, dim)`` float32 in batches Chroma accepts (existing ids are skipped).

        Label partitions are written first: an interrupted add leaves the main collection without
        the batch, so a resumed ingest re-adds it everywhere (partitions skip what they hold).
        """
        if self.partitioned:
            labels = np.array([int(m["label"]) for m in metadatas])
            for label in np.unique(labels):
                rows = np.flatnonzero(labels == label)
                part = self._partition(int(label), create=True)
                assert part is not None
                part._add([ids[i] for i in rows], vectors[rows], [metadatas[i] for i in rows])
        self._add(ids, vectors, metadatas)

    def _add(self, ids: Sequence[str], vectors: np.ndarray, metadatas: Sequence[dict[str, Any]]) -> None:
        self._count = None
        for start in range(0, len(ids), self._max_batch):
            end = start + self._max_batch
            self._c.add(ids=list(ids[start:end]), embeddings=vectors[start:end], metadatas=list(metadatas[start:end]))

    def get(self, ids: Sequence[str], *, vectors: bool = False) -> tuple[list[str], np.ndarray | None, list[dict[str, Any]]]:
        """(ids, vectors or None, metadatas) of stored ``ids`` (each once), in the order Chroma returns them."""
        include = ["metadatas", "embeddings"] if vectors else ["metadatas"]
        got = self._c.get(ids=list(dict.fromkeys(ids)), include=include)  # Chroma refuses repeated ids
        embs = np.asarray(got["embeddings"], np.float32) if vectors else None
        return list(got["ids"]), embs, list(got["metadatas"])

    def scan(self, where: dict[str, Any] | None = None, *, vectors: bool = True) -> tuple[list[str], np.ndarray, list[dict[str, Any]]]:
        """Every item matching ``where``, read page by page: (ids, vectors ``(n, dim)``, metadatas)."""
        ids: list[str] = []
        metas: list[dict[str, Any]] = []
        chunks: list[np.ndarray] = []
        for page_ids, page_vecs, page_metas in self._pages(where, vectors):
            ids += page_ids
            metas += page_metas
            if page_vecs is not None:
                chunks.append(page_vecs)
        dim = int(self.record.get("embedder", {}).get("dim", 0))
        vecs = np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
        return ids, vecs, metas

    def _pages(self, where: dict[str, Any] | None, vectors: bool) -> Iterator[tuple[list[str], np.ndarray | None, list[dict[str, Any]]]]:
        include = ["metadatas", "embeddings"] if vectors else ["metadatas"]
        offset = 0
        while True:
            got = self._c.get(where=where, limit=PAGE, offset=offset, include=include)
            n = len(got["ids"])
            if n == 0:
                return
            vecs = np.asarray(got["embeddings"], np.float32) if vectors else None
            yield list(got["ids"]), vecs, list(got["metadatas"])
            offset += n
            if n < PAGE:
                return

    def query(
        self, vectors: np.ndarray, k: int, where: dict[str, Any] | None = None, *, metadata: bool = True
    ) -> list[list[Neighbor]]:
        """The ``k`` nearest stored items to each row of ``vectors`` ``(n, dim)``, nearest first.

        A filter on labels uses the label partitions when there are some (each label's partition is
        searched with the rest of the filter, the answers merged by distance). Any other ``where``:
        the collection is first asked *unfiltered* for ``max(4k + 16, 100)`` neighbours and those
        matching ``where`` are kept; when at least ``k`` match, they are the ``k`` nearest matching
        items (any nearer match would be among them). Only rows left short are asked again with
        Chroma's ``where``, which costs ~50 ms a query on 70,000 items (it reads the metadata of
        every match) against ~7 ms for the probe. ``metadata=False`` skips reading metadata back
        (a third of an unfiltered query's time); it is ignored when ``where`` is given.
        """
        if where is None or len(vectors) == 0:
            return self._query(vectors, k, None, metadata)
        split = label_filter(where) if self.partitioned else None
        if split is not None:
            labels, rest = split
            rows: list[list[Neighbor]] = [[] for _ in range(len(vectors))]
            for label in labels:
                part = self._partition(label)
                if part is not None and part.count():
                    for row, got in zip(rows, part.query(vectors, k, rest)):
                        row.extend(got)
            return [sorted(row, key=lambda n: n.distance)[:k] for row in rows]
        probe = min(max(4 * k + 16, PROBE), self.count())
        try:
            out = [[n for n in row if matches(n.metadata, where)][:k] for row in self._query(vectors, probe, None, True)]
        except ValueError:  # an operator matches() does not know: let Chroma filter
            return self._query(vectors, k, where, True)
        short = [i for i, row in enumerate(out) if len(row) < k]
        if short:
            log.debug("%d of %d filtered queries had fewer than %d matches among %d neighbours", len(short), len(out), k, probe)
            for i, row in zip(short, self._query(vectors[short], k, where, True)):
                out[i] = row
        return out

    def _query(self, vectors: np.ndarray, k: int, where: dict[str, Any] | None, metadata: bool) -> list[list[Neighbor]]:
        out: list[list[Neighbor]] = []
        include = ["metadatas", "distances"] if metadata else ["distances"]
        for start in range(0, len(vectors), QUERY_BATCH):
            got = self._c.query(
                query_embeddings=np.asarray(vectors[start : start + QUERY_BATCH], np.float32),
                n_results=k,
                where=where,
                include=include,
            )
            metas = got["metadatas"] if metadata else [[{}] * len(ids) for ids in got["ids"]]
            for ids, dists, row_metas in zip(got["ids"], got["distances"], metas):
                out.append([Neighbor(i, float(np.sqrt(max(d, 0.0))), m) for i, d, m in zip(ids, dists, row_metas)])
        return out


def matches(meta: dict[str, Any], where: dict[str, Any]) -> bool:
    """Whether metadata ``meta`` satisfies a Chroma ``where`` filter (``$and``/``$or``, ``$eq``/``$ne``/``$in``/``$nin``).

    Raises ValueError for any other operator.
    """
    for key, cond in where.items():
        if key == "$and":
            ok = all(matches(meta, c) for c in cond)
        elif key == "$or":
            ok = any(matches(meta, c) for c in cond)
        elif key.startswith("$"):
            raise ValueError(key)
        elif isinstance(cond, dict):
            ((op, value),) = cond.items()
            have = meta.get(key)
            if op == "$eq":
                ok = have == value
            elif op == "$ne":
                ok = have != value
            elif op == "$in":
                ok = have in value
            elif op == "$nin":
                ok = have not in value
            else:
                raise ValueError(op)
        else:
            ok = meta.get(key) == cond
        if not ok:
            return False
    return True


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


def _read_record(collection: Any) -> dict[str, Any]:
    meta = collection.metadata or {}
    raw = meta.get(RECORD_KEY)
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        return {}


class Store:
    """A Chroma client on a directory or a server URL."""

    def __init__(self, db: str | os.PathLike[str] | None = None, *, create: bool = False) -> None:
        self.db = str(db) if db is not None else default_db()
        if self.db.startswith(("http://", "https://")):
            self._client = _http_client(self.db)
        else:
            self._client = _persistent_client(Path(self.db).expanduser(), create)
        self._max_batch = int(self._client.get_max_batch_size())

    def names(self) -> list[str]:
        """The collections' names (label partitions are hidden)."""
        return sorted(name for name, owner in self._all() if owner is None)

    def _all(self) -> list[tuple[str, str | None]]:
        """(name, the collection it partitions or None) of every Chroma collection."""
        out = []
        for c in self._client.list_collections():
            meta = getattr(c, "metadata", None) or {}
            out.append((c.name if hasattr(c, "name") else str(c), meta.get(PARTITION_KEY)))
        return out

    def info(self) -> list[CollectionInfo]:
        """Every collection with its count, dataset and embedder."""
        from lookalike.embedder import EmbedderSpec

        out = []
        for name in self.names():
            col = self.open(name)
            rec = col.record
            emb = EmbedderSpec.from_dict(rec["embedder"]).describe() if "embedder" in rec else "?"
            out.append(CollectionInfo(name, col.count(), rec.get("protocol", {}).get("dataset", "?"), emb, rec))
        return out

    def exists(self, name: str) -> bool:
        return name in self.names()

    def open(self, name: str | None = None) -> VectorCollection:
        """An existing collection; ``None`` picks the only one, or fails listing them."""
        names = self.names()
        if name is None:
            if len(names) == 1:
                name = names[0]
            elif not names:
                raise NotFoundError(f"the store at {self.db} has no collections: run `lookalike ingest` first")
            else:
                raise InputError(f"the store at {self.db} has several collections, pass --collection: {', '.join(names)}")
        if name not in names:
            listing = ", ".join(names) if names else "none"
            raise NotFoundError(f"no collection {name!r} in {self.db} (collections: {listing})")
        return VectorCollection(self._client.get_collection(name, embedding_function=None), self._max_batch, self._client)

    def create(self, name: str, record: dict[str, Any]) -> VectorCollection:
        """A new collection holding ``record`` in its metadata.

        Collections of at most ``MAX_PARTITIONS`` labels get label partitions (``label_partitions``
        in the record); leftovers of a collection of the same name are removed first.
        """
        check_name(name)
        if 0 < len(record.get("label_names", [])) <= MAX_PARTITIONS:
            record = {**record, "label_partitions": True}
        self._drop_partitions(name)
        col = self._client.create_collection(
            name,
            configuration={"hnsw": dict(HNSW)},
            metadata={RECORD_KEY: json.dumps(record, sort_keys=True)},
            embedding_function=None,
        )
        return VectorCollection(col, self._max_batch, self._client)

    def drop(self, name: str) -> None:
        """Delete collection ``name`` and its label partitions."""
        self.open(name)  # raises NotFoundError with the listing
        self._drop_partitions(name)
        self._client.delete_collection(name)

    def _drop_partitions(self, name: str) -> None:
        for part, owner in self._all():
            if owner == name:
                self._client.delete_collection(part)


def check_name(name: str) -> None:
    if not _NAME.match(name):
        raise InputError(
            f"invalid collection name {name!r}: use 3-512 letters, digits, '.', '_' or '-', starting and ending with a letter or digit"
        )


def _persistent_client(path: Path, create: bool) -> Any:
    if not create and not path.is_dir():
        raise NotFoundError(f"no store at {path}: run `lookalike ingest` first, or pass --db PATH (or set LOOKALIKE_DB)")
    if path.exists() and not path.is_dir():
        raise StoreError(f"--db {path} is a file, not a directory: pass --db a directory path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".lookalike-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise StoreError(f"cannot write to --db {path} ({exc.strerror or exc}): pass --db a writable directory") from None
    import chromadb
    from chromadb.config import Settings

    try:
        return chromadb.PersistentClient(path=str(path), settings=Settings(anonymized_telemetry=False))
    except Exception as exc:
        raise StoreError(f"cannot open the Chroma store at {path} ({str(exc).splitlines()[0][:120]}): "
                         "is another process using it? share a store through `chroma run` and --db http://HOST:PORT") from None


def _http_client(url: str) -> Any:
    import chromadb
    from chromadb.config import Settings

    u = urlparse(url)
    if not u.hostname:
        raise InputError(f"--db {url} is not a server address: use http://HOST:PORT")
    port = u.port or (443 if u.scheme == "https" else 8000)
    try:
        client = chromadb.HttpClient(host=u.hostname, port=port, ssl=u.scheme == "https",
                                     settings=Settings(anonymized_telemetry=False))  # fmt: skip
        client.heartbeat()
        return client
    except Exception as exc:
        raise StoreError(
            f"cannot reach a Chroma server at {url} ({str(exc).splitlines()[0][:100]}): "
            "start one with `chroma run --path DIR --port N`"
        ) from None


def check_compatible(record: dict[str, Any], wanted: dict[str, Any], name: str) -> None:
    """Refuse to add to collection ``name`` built with another embedder or protocol."""
    from lookalike.embedder import EmbedderSpec

    have_emb, want_emb = record.get("embedder"), wanted["embedder"]
    have_spec = EmbedderSpec.from_dict(have_emb) if have_emb else None
    want_spec = EmbedderSpec.from_dict(want_emb)
    if have_spec != want_spec:  # compared as specs: records written before a field existed get its default
        have = have_spec.describe() if have_spec else "unknown"
        hint = f"pass --precision {have_spec.precision}, or " if have_spec and have_spec.precision != want_spec.precision else ""
        raise MismatchError(
            f"collection {name!r} was built with embedder [{have}], not [{want_spec.describe()}]: "
            f"{hint}use another --collection NAME (or `lookalike drop` it first)"
        )
    keys = ("dataset", "mode", "limit", "test_size", "seed", "root", "source_sha256")
    have_p, want_p = record.get("protocol", {}), wanted["protocol"]
    diff = [k for k in keys if have_p.get(k) != want_p.get(k)]
    if diff:
        shown = ", ".join(f"{k}={have_p.get(k)!r} not {want_p.get(k)!r}" for k in diff)
        raise MismatchError(f"collection {name!r} holds another dataset protocol ({shown}): use another --collection NAME")


def list_collections(db: str | None = None) -> list[CollectionInfo]:
    """Every collection in the store at ``db``."""
    return Store(db).info()


def drop_collection(name: str, db: str | None = None) -> None:
    """Delete collection ``name`` from the store at ``db``."""
    Store(db).drop(name)
