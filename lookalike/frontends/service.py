"""The search service's library side: one store, its collections opened once, warm embedders, batched image queries.

:class:`Service` is what ``lookalike serve`` runs behind HTTP (:mod:`lookalike.frontends.server` parses requests
and presents answers; everything else happens here, with the library's own functions). It opens the
store once (a local directory's lock is held for the service's life), opens each collection's
:class:`~lookalike.core.gallery.Gallery` on first use and keeps it, and builds each embedder once, on the
first image query. Image queries from concurrent requests go through a
:class:`~lookalike.models.batching.DynamicBatcher`: the embeddings of requests that arrive together are
computed as one batch. Every answer is what :func:`lookalike.core.search.search` gives for the same query.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from lookalike import __version__
from lookalike.core.gallery import Gallery, list_collections
from lookalike.core.items import AddReport, ItemsPage, RemoveReport, add_images, list_items, remove_items
from lookalike.core.search import Hit, search
from lookalike.core.store import Store
from lookalike.errors import InputError, NotFoundError
from lookalike.models.batching import DynamicBatcher

log = logging.getLogger(__name__)

MAX_K = 1000
# Measured with scripts/loadtest.py (docs/service.md): no extra wait is best here. While one batch is embedded
# (7-18 ms) the next requests queue, and the next batch takes them all (mean 7 images under 16 clients,
# 313 image searches/s against 117 without batching); waiting 2, 5 or 10 ms more after a batch's first
# request gathered barely more (7.2-8.8) and cost throughput, p99 and every lone client's latency.
DEFAULT_WINDOW = 0.0
DEFAULT_MAX_BATCH = 32


@dataclass
class SearchAnswer:
    """One search's hits and what was asked (``query``: ``{"kind": "image"|"id"|"vector", ...}``)."""

    collection: str
    query: dict[str, Any]
    k: int
    labels: list[int] | None
    split: str | None
    hits: list[Hit]
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "collection": self.collection,
            "query": self.query,
            "k": self.k,
            "labels": self.labels,
            "split": self.split,
            "hits": [h.to_dict() for h in self.hits],
            "took_ms": round(self.seconds * 1000, 3),
        }


@dataclass
class ItemInfo:
    """A stored item's id, label and split, and its metadata as stored."""

    id: str
    label: int
    label_name: str
    split: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "label": self.label, "label_name": self.label_name, "split": self.split, "metadata": self.metadata}


def check_k(k: Any) -> int:
    """``k`` as an int between 1 and ``MAX_K``; InputError otherwise."""
    if isinstance(k, bool) or not isinstance(k, (int, str)):
        raise InputError(f"k must be a whole number between 1 and {MAX_K}")
    try:
        value = int(k)
    except ValueError:
        raise InputError(f"k must be a whole number between 1 and {MAX_K}, got {k!r}") from None
    if not 1 <= value <= MAX_K:
        raise InputError(f"k must be between 1 and {MAX_K}, got {value}")
    return value


class Service:
    """A store opened for serving: galleries kept open, embedders warm, image queries batched.

    ``window`` and ``max_batch`` set the dynamic batching of image embeddings (``max_batch=1``: none).
    Thread-safe: the HTTP front-end calls it from many threads.
    """

    def __init__(
        self,
        db: str | None = None,
        *,
        wait: float | None = None,
        max_pixels: int | None = None,
        window: float = DEFAULT_WINDOW,
        max_batch: int = DEFAULT_MAX_BATCH,
        files: str | None = None,
    ) -> None:
        if not 0 <= window <= 1:  # (also refuses NaN and infinity)
            raise InputError(f"--batch-window-ms must be between 0 and 1000, got {window * 1000:g}")
        if max_batch < 1:
            raise InputError(f"--max-batch must be at least 1, got {max_batch}")
        self.store = Store(db, wait=wait)
        self.max_pixels = max_pixels
        self.window = window
        self.max_batch = max_batch
        self.files = files  # where images added over HTTP are kept (default: beside a local store; see lookalike.core.items)
        self.started = time.time()
        self._galleries: dict[str, Gallery] = {}
        self._batchers: dict[str, DynamicBatcher[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()  # one write at a time (a write's record and vectors go together)

    def close(self) -> None:
        """Stop the batchers and release the store (and its lock)."""
        with self._lock:
            batchers, self._batchers = list(self._batchers.values()), {}
            self._galleries = {}
        for b in batchers:
            b.close()
        self.store.close()

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- collections -----------------------------------------------------------------------------------

    def gallery(self, name: str) -> Gallery:
        """The open Gallery of collection ``name`` (opened on first use); NotFoundError listing the collections."""
        with self._lock:
            g = self._galleries.get(name)
            if g is None:
                names = self.store.names()
                if name not in names:  # (the store's own message names its directory: not for a client)
                    raise NotFoundError(f"no collection {name!r} here: the collections are {', '.join(names) or 'none'}")
                g = Gallery(self.store, name, max_pixels=self.max_pixels)
                g.keep_warm()  # filtered queries planned from an in-memory mirror (read in the background), kept current
                self._galleries[name] = g
            return g

    def batcher(self, name: str) -> DynamicBatcher[np.ndarray, np.ndarray]:
        """The batcher of collection ``name``'s image embeddings (its embedder is built on the first batch)."""
        g = self.gallery(name)
        with self._lock:
            b = self._batchers.get(name)
            if b is None:
                b = DynamicBatcher(lambda images: list(g.embed(images)), max_batch=self.max_batch, window=self.window, name=f"embed-{name}")
                self._batchers[name] = b
            return b

    def warm(self, names: Sequence[str] | None = None, *, mirrors: bool = False) -> list[str]:
        """Build the embedders of ``names`` (default: every collection) now rather than on their first image query;
        ``mirrors``: read their filter mirrors now too."""
        chosen = list(names) if names is not None else self.store.names()
        for name in chosen:
            g = self.gallery(name)
            _ = g.embedder
            if mirrors:
                g.keep_warm(load=True)
            log.info("embedder of %r ready", name)
        return chosen

    # -- writes ----------------------------------------------------------------------------------------

    def add(self, collection: str, images: Sequence[tuple[str, bytes]], *, label: str | None = None, metadata: Any = None) -> AddReport:
        """Embed and add uploaded images (``(filename, bytes)``), kept in the service's files folder; see
        :func:`lookalike.core.items.add_images`. The collection's cached Gallery (and its filter mirror) sees the write."""
        g = self.gallery(collection)
        with self._write_lock:
            return add_images(g, images, label=label, metadata=metadata, files=self.files)

    def remove(self, collection: str, ids: Sequence[str]) -> RemoveReport:
        """Remove stored items by id (and their kept files); NotFoundError when none of them is stored."""
        g = self.gallery(collection)
        with self._write_lock:
            report = remove_items(g, ids)
        if not report.removed:
            raise NotFoundError(f"no item {ids[0]!r} in collection {collection!r}")
        return report

    def collections(self) -> list[dict[str, Any]]:
        """Each collection's name, count, dataset, embedder (and its backbone and input size), label names and whether it
        has labels (no server paths)."""
        return [
            {
                "name": c.name,
                "count": c.count,
                "dataset": c.dataset,
                "embedder": c.embedder,
                "backbone": c.backbone,
                "input_size": c.input_size,
                "label_names": c.label_names,
                "labelled": c.labelled,
            }
            for c in list_collections(self.store)
        ]

    def health(self) -> dict[str, Any]:
        """``status`` ``ok`` when the store answers (StoreError otherwise), with the version and uptime."""
        n = len(self.store.names())
        return {"status": "ok", "version": __version__, "collections": n, "uptime_s": round(time.time() - self.started, 1)}

    def stats(self) -> dict[str, Any]:
        """The batching of each collection's image queries so far."""
        with self._lock:
            batchers = dict(self._batchers)
        return {
            "batch_window_ms": self.window * 1000,
            "max_batch": self.max_batch,
            "collections": {name: b.stats.to_dict() for name, b in batchers.items()},
        }

    # -- queries ---------------------------------------------------------------------------------------

    def search(
        self,
        collection: str,
        *,
        image: bytes | None = None,
        image_name: str = "the upload",
        id: str | None = None,
        vector: Sequence[float] | np.ndarray | None = None,
        k: Any = 5,
        labels: Sequence[int | str] | None = None,
        split: str | None = None,
        where: Any = None,
    ) -> SearchAnswer:
        """:func:`lookalike.core.search.search` on ``collection``, an uploaded ``image`` embedded in a shared batch.
        ``where``: a metadata filter, Chroma's dict form or a list of ``--where`` expressions (strings)."""
        started = time.perf_counter()
        k = check_k(k)
        if sum(q is not None for q in (image, id, vector)) != 1:
            raise InputError('give exactly one query: an image file, or JSON {"id": ...} or {"vector": [...]}')
        g = self.gallery(collection)
        resolved = g.resolve_labels(labels) if labels else None
        g.where(labels, split)  # a bad split fails before any work
        where = as_where(where)
        g.check_where(where)
        if image is not None:
            query: dict[str, Any] = {"kind": "image", "bytes": len(image)}
            pixels = g.read_query_image(image, name=image_name)
            vec = self.batcher(collection)(pixels)
            hits = search(g, vector=vec, k=k, labels=labels, split=split, where=where)
        elif id is not None:
            if not isinstance(id, str) or not id:
                raise InputError("id must be a non-empty string")
            query = {"kind": "id", "id": id}
            hits = search(g, id=id, k=k, labels=labels, split=split, where=where)
        else:
            query = {"kind": "vector"}
            hits = search(g, vector=_as_vector(vector, g.record.embedder.dim), k=k, labels=labels, split=split, where=where)
        return SearchAnswer(collection, query, k, resolved, split, hits, time.perf_counter() - started)

    def items(
        self,
        collection: str,
        *,
        labels: Sequence[int | str] | None = None,
        split: str | None = None,
        where: Any = None,
        cursor: str | None = None,
        limit: Any = 100,
    ) -> ItemsPage:
        """A page of ``collection``'s stored items in write order (see :func:`lookalike.core.items.list_items`); ``where``
        as :meth:`search` takes it."""
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise InputError(f"limit must be a whole number of items, got {limit!r}")
        return list_items(self.gallery(collection), labels=labels, split=split, where=as_where(where), cursor=cursor, limit=limit)

    def item(self, collection: str, item_id: str) -> ItemInfo:
        """A stored item's label, split and metadata; NotFoundError with an example id."""
        g = self.gallery(collection)
        meta, _ = g.item(item_id)
        label = int(meta["label"])
        return ItemInfo(item_id, label, g.label_name(label), str(meta["split"]), meta)

    def item_png(self, collection: str, item_id: str) -> bytes:
        """A PNG of a stored item, read from the source its collection records (nothing a request names)."""
        from PIL import Image

        g = self.gallery(collection)
        meta, _ = g.item(item_id)
        rel = meta.get("path")
        if rel is not None and (PurePosixPath(str(rel)).is_absolute() or ".." in PurePosixPath(str(rel)).parts):
            raise NotFoundError(f"item {item_id!r} names a file outside its folder: its image is not served")
        (pixels,) = g.images([meta])
        if pixels is None:
            raise NotFoundError(f"the image of item {item_id!r} can no longer be read from its source (moved or deleted)")
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="PNG")
        return out.getvalue()

    def evaluation(self, collection: str) -> dict[str, Any]:
        """The last evaluate report saved with ``collection``; NotFoundError naming the command that makes one."""
        report = self.gallery(collection).evaluation()
        if report is None:
            raise NotFoundError(f"collection {collection!r} has no saved evaluation: run `lookalike evaluate --collection {collection}`")
        return report

    def audit(self, collection: str) -> dict[str, Any]:
        """The last audit saved with ``collection``; NotFoundError naming the command that makes one."""
        from lookalike.analysis.audit import saved_audit

        report = saved_audit(self.gallery(collection))
        if report is None:
            raise NotFoundError(f"collection {collection!r} has no saved audit: run `lookalike audit --collection {collection}`")
        return report


def _as_vector(vector: Any, dim: int) -> np.ndarray:
    """A query vector of ``dim`` numbers; InputError otherwise (``search`` refuses NaN and infinity)."""
    try:
        v = np.asarray(vector, dtype=np.float32)
    except (TypeError, ValueError):
        raise InputError(f"vector must be a list of {dim} numbers") from None
    if v.ndim != 1 or v.shape[0] != dim:
        raise InputError(f"vector must be a list of {dim} numbers, got shape {list(v.shape)}")
    return v


def as_where(where: Any) -> dict[str, Any] | None:
    """A request's filter: None, Chroma's dict form, one ``--where`` expression or a list of them; InputError otherwise."""
    from lookalike.data.filters import parse_where

    if where is None or where == "" or where == []:
        return None
    if isinstance(where, dict):
        return where
    if isinstance(where, str):
        return parse_where([where])
    if isinstance(where, list) and all(isinstance(w, str) for w in where):
        return parse_where(where)
    raise InputError('where must be a filter object such as {"width": {"$gte": 1000}}, or a list of expressions such as ["width >= 1000"]')
