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
HNSW = {"space": "l2", "ef_construction": 200, "ef_search": 200, "max_neighbors": 32}
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
    """A Chroma collection of image vectors with ``label``/``split`` metadata."""

    def __init__(self, collection: Any, max_batch: int) -> None:
        self._c = collection
        self._max_batch = max_batch
        self.name: str = collection.name
        self.record: dict[str, Any] = _read_record(collection)

    def count(self) -> int:
        return int(self._c.count())

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
        """Add vectors ``(n, dim)`` float32 in batches Chroma accepts (existing ids are skipped)."""
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

    def query(self, vectors: np.ndarray, k: int, where: dict[str, Any] | None = None) -> list[list[Neighbor]]:
        """The ``k`` nearest stored items to each row of ``vectors`` ``(n, dim)``, nearest first."""
        out: list[list[Neighbor]] = []
        for start in range(0, len(vectors), 500):
            got = self._c.query(
                query_embeddings=np.asarray(vectors[start : start + 500], np.float32),
                n_results=k,
                where=where,
                include=["metadatas", "distances"],
            )
            for ids, dists, metas in zip(got["ids"], got["distances"], got["metadatas"]):
                out.append([Neighbor(i, float(np.sqrt(max(d, 0.0))), m) for i, d, m in zip(ids, dists, metas)])
        return out


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
        return sorted(c.name if hasattr(c, "name") else str(c) for c in self._client.list_collections())

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
        return VectorCollection(self._client.get_collection(name, embedding_function=None), self._max_batch)

    def create(self, name: str, record: dict[str, Any]) -> VectorCollection:
        """A new collection holding ``record`` in its metadata."""
        check_name(name)
        col = self._client.create_collection(
            name,
            configuration={"hnsw": dict(HNSW)},
            metadata={RECORD_KEY: json.dumps(record, sort_keys=True)},
            embedding_function=None,
        )
        return VectorCollection(col, self._max_batch)

    def drop(self, name: str) -> None:
        self.open(name)  # raises NotFoundError with the listing
        self._client.delete_collection(name)


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
    if have_emb != want_emb:
        have = EmbedderSpec.from_dict(have_emb).describe() if have_emb else "unknown"
        raise MismatchError(
            f"collection {name!r} was built with embedder [{have}], not [{EmbedderSpec.from_dict(want_emb).describe()}]: "
            "use another --collection NAME (or `lookalike drop` it first)"
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
