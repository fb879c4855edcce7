"""The Gallery: one opened collection, the object every command and front-end works through.

A :class:`Gallery` owns the Chroma collection (through :mod:`lookalike.core.store`), its typed
:class:`~lookalike.core.record.Record`, the embedder the record names (built lazily, once), the pixels of
stored items (read from the source the record names, whatever the dataset kind), the label names,
and one :meth:`Gallery.neighbours` that hides the label partitions, the probe and Chroma's ``where``.

Open it once per command::

    with Gallery.open("mnist", db="./lookalike-db") as g:
        hits = lookalike.search(g, id="mnist:test:0", k=5, labels=["3"])

A Gallery is safe to share between threads of one process: the embedder is built and called under
a lock. Opening a local store takes its inter-process lock until :meth:`Gallery.close` (or the
process's end).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np

from lookalike.core.record import Record
from lookalike.core.store import MAX_PARTITIONS, Neighbor, Store, VectorCollection
from lookalike.data.datasets import SPLITS, stored_pixels
from lookalike.data.filters import check_fields, combine, validate
from lookalike.data.images import Unreadable, as_image_array, check_max_pixels, open_image
from lookalike.errors import InputError, NotFoundError, StoreError, TooLargeError
from lookalike.models.embedder import Embedder, build_embedder
from lookalike.util import UNLABELLED, json_safe, label_name, trim_memory

log = logging.getLogger(__name__)

EVALUATION_NOTE = "lookalike_evaluation"  # the collection metadata key of the last evaluate report
FIELD_SAMPLE = 5000  # items a cold collection reads its field names from
# a write of at least this many new items (ingest, import) goes to the index first and fills the label partitions
# after it, label by label: the writing process then holds one index in memory at a time, not the index and every
# partition's (a million 784-d items: 9.1 GB written together); a smaller write keeps them level batch by batch
PARTITIONS_LATER = int(os.environ.get("LOOKALIKE_PARTITIONS_LATER", "50000"))
# a collection of at most this many label names gives its items' labels by one id listing a label (Gallery.listed_labels)
LABELS_LISTED = 256


@dataclass
class Scanned:
    """Every item of a collection, held-out ones first, then the indexed ones, then any other: ids, vectors
    ``(n, dim)``, label numbers and splits (read by :meth:`Gallery.scan_by_split`, without metadata). A scan handed to
    :func:`lookalike.analysis.evaluate.held_out` with ``consume`` has no vectors left after it (``vectors`` empty)."""

    ids: list[str]
    vectors: np.ndarray
    labels: np.ndarray
    splits: list[str]

    def split(self, name: str) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(ids, vectors, labels) of one split; its vectors a view, not a copy, when its rows are one block."""
        rows = [i for i, s in enumerate(self.splits) if s == name]
        if rows and rows[-1] - rows[0] == len(rows) - 1:
            block = slice(rows[0], rows[-1] + 1)
            return self.ids[block], self.vectors[block], self.labels[block]
        return [self.ids[i] for i in rows], self.vectors[rows], self.labels[rows]


@dataclass
class CollectionInfo:
    """A collection's name, size and what built it."""

    name: str
    count: int
    dataset: str
    embedder: str
    label_names: list[str] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict, repr=False)
    labelled: bool = True
    backbone: str = "?"  # the network: a registered backbone's name, pixels, or a trained model's base
    input_size: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "count": self.count,
            "dataset": self.dataset,
            "embedder": self.embedder,
            "backbone": self.backbone,
            "input_size": self.input_size,
            "label_names": self.label_names,
            "labelled": self.labelled,
            "record": self.record,
        }


class Gallery:
    """An opened collection: its record, its vectors, its embedder and its neighbours."""

    def __init__(
        self,
        store: Store,
        name: str,
        *,
        owns_store: bool = False,
        max_pixels: int | None = None,
        _collection: VectorCollection | None = None,
    ) -> None:
        self.store = store
        self.name = name
        col = _collection or store.open(name)
        self.record = Record.parse(col.raw_record, name)
        col.partitioned = self.record.label_partitions
        col.dim = self.record.embedder.dim
        self._col = col
        self._owns_store = owns_store
        self.max_pixels = check_max_pixels(max_pixels)
        self._embedder: Embedder | None = None
        self._embed_lock = threading.Lock()
        self._fields: list[str] | None = None
        self._fields_complete = False  # the fields were read from every item (not a sample of the first FIELD_SAMPLE)

    # -- opening and closing -------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        collection: str | None = None,
        db: str | None = None,
        *,
        wait: float | None = None,
        store: Store | None = None,
        max_pixels: int | None = None,
    ) -> Gallery:
        """The collection ``collection`` (``None``: the store's only one) of the store at ``db`` (or of ``store``)."""
        owns = store is None
        st = store if store is not None else Store(db, wait=wait)
        try:
            return cls(st, st.pick(collection), owns_store=owns, max_pixels=max_pixels)
        except BaseException:
            if owns:
                st.close()
            raise

    @classmethod
    def create(
        cls,
        store: Store,
        name: str,
        record: Record,
        *,
        max_pixels: int | None = None,
        notes: dict[str, str] | None = None,
        partitions: bool = True,
    ) -> Gallery:
        """A new, empty collection ``name`` holding ``record`` and ``notes``, with label partitions when it has 1-100
        labels (unless not ``partitions``)."""
        partitioned = partitions and 0 < len(record.label_names) <= MAX_PARTITIONS
        record = replace(record, label_partitions=partitioned)
        col = store.create(name, record.to_json(), partitioned, notes)
        return cls(store, name, max_pixels=max_pixels, _collection=col)

    def close(self) -> None:
        """Release the store (and its lock) when this Gallery opened it."""
        if self._owns_store:
            self.store.close()

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what it is ----------------------------------------------------------------------------------

    @property
    def db(self) -> str:
        return self.store.db

    @property
    def label_names(self) -> list[str]:
        return self.record.label_names

    def label_name(self, label: int) -> str:
        return label_name(self.record.label_names, int(label))

    def count(self) -> int:
        return self._col.count()

    def info(self) -> CollectionInfo:
        rec = self.record
        spec = rec.embedder
        return CollectionInfo(
            self.name,
            self.count(),
            rec.dataset,
            spec.describe(),
            rec.label_names,
            json.loads(rec.to_json()),
            rec.labelled,
            spec.backbone,
            spec.input_size,
        )

    def resolve_labels(self, labels: Sequence[int | str]) -> list[int]:
        """Label ints from ints or names (``3``, ``"3"``, ``"Sneaker"``); unknown ones raise InputError listing the choices."""
        names = self.record.label_names
        if labels and not self.record.labelled:
            raise InputError(f"collection {self.name!r} is unlabelled: leave out --label (filter by --split, or search it all)")
        out: list[int] = []
        for lab in labels:
            text = str(lab).strip()
            if text in names:
                out.append(names.index(text))
            elif text.lstrip("-").isdigit() and 0 <= int(text) < len(names):
                out.append(int(text))
            else:
                shown = ", ".join(f"{i}={n}" if n != str(i) else n for i, n in enumerate(names))
                raise InputError(f"label {text!r} is not in collection {self.name!r}: choose from {shown}")
        return sorted(set(out))

    def where(self, labels: Sequence[int | str] | None = None, split: str | None = None) -> dict[str, Any] | None:
        """The metadata filter for ``labels`` and ``split`` (None when neither); bad values raise InputError."""
        clauses: list[dict[str, Any]] = []
        if labels:
            ids = self.resolve_labels(labels)
            clauses.append({"label": ids[0]} if len(ids) == 1 else {"label": {"$in": ids}})
        if split is not None:
            if split not in SPLITS:
                raise InputError(f"--split {split!r} is not one of {', '.join(SPLITS)}")
            clauses.append({"split": split})
        if not clauses:
            return None
        return clauses[0] if len(clauses) == 1 else {"$and": clauses}

    # -- the embedder --------------------------------------------------------------------------------

    @property
    def embedder(self) -> Embedder:
        """The embedder the record names, built on first use (TensorFlow loads then), once."""
        with self._embed_lock:
            if self._embedder is None:
                self._embedder = build_embedder(self.record.embedder)
            return self._embedder

    def use_embedder(self, embedder: Embedder) -> None:
        """Use an embedder already built (it must have the record's spec)."""
        if embedder.spec != self.record.embedder:
            raise InputError(f"embedder [{embedder.spec.describe()}] is not the one of {self.name!r} [{self.record.embedder.describe()}]")
        with self._embed_lock:
            self._embedder = embedder

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Vectors ``(n, dim)`` of uint8 images, with the collection's embedder (one call at a time)."""
        model = self.embedder
        checked = [as_image_array(im) for im in images]
        with self._embed_lock:
            return np.asarray(model.embed(checked), np.float32)

    def read_query_image(self, image: Any, *, name: str = "the upload") -> np.ndarray:
        """A query image: a file path or the bytes of a file (called ``name`` in messages), read under this
        Gallery's pixel limit as ingest reads files, or a uint8 array. InputError (TooLargeError over the limit)."""
        if isinstance(image, np.ndarray):
            h, w = image.shape[:2]
            if h * w > self.max_pixels:
                raise TooLargeError(
                    f"the image is too large ({w}x{h} = {w * h:,} pixels, over the limit of {self.max_pixels:,}): shrink it"
                )
            return as_image_array(image)
        return open_image(image, self.max_pixels, self.record.embedder.decode_side, name=name)  # read as ingest reads it

    # -- stored items --------------------------------------------------------------------------------

    def existing_ids(self, ids: Sequence[str]) -> set[str]:
        return self._col.existing_ids(ids)

    def add(self, ids: Sequence[str], vectors: np.ndarray, metadatas: Sequence[dict[str, Any]], *, partitions_later: bool = False) -> None:
        """Add items to the index (and their label partitions); ids already stored are skipped. ``partitions_later``
        (a large write, see ``PARTITIONS_LATER``): the partitions are left to :meth:`fill_partitions`."""
        self._fields = None
        self._col.add(ids, vectors, metadatas, partitions_later=partitions_later)

    @property
    def partitions_behind(self) -> bool:
        """The label partitions lack items the index holds (a large write not followed by :meth:`fill_partitions`
        yet, or interrupted before it ended): label filters are answered without them meanwhile."""
        return self.record.label_partitions and self._col.partitions_behind

    def fill_partitions(self, *, release: bool = False) -> int:
        """Bring every label partition level with the index (see :meth:`VectorCollection.fill_partitions`);
        returns the entries added."""
        return self._col.fill_partitions(range(len(self.label_names)), release=release)

    def replace(self, ids: Sequence[str], vectors: np.ndarray, metadatas: Sequence[dict[str, Any]]) -> None:
        """Add or replace items (vector and metadata) in the index and their label partitions."""
        self._fields = None
        self._col.upsert(ids, vectors, metadatas)

    def update_metadatas(self, ids: Sequence[str], metadatas: Sequence[dict[str, Any]]) -> None:
        """New metadata for stored items (their vectors kept): the keys given replace theirs, a None value removes one."""
        self._fields = None
        self._col.update_metadatas(ids, metadatas)

    def remove(self, ids: Sequence[str]) -> None:
        """Remove items from the index and their label partitions (ids not stored are ignored)."""
        self._fields = None
        self._col.delete(ids)

    def set_record(self, record: Record) -> None:
        """Replace the collection's record (label partitions as it says)."""
        self._col.set_record(record.to_json())
        self.record = record
        self._col.partitioned = record.label_partitions

    def catalogue(self) -> dict[str, dict[str, Any]]:
        """id -> metadata of every stored item (no vectors), read page by page: the stored side of a sync's plan."""
        ids, _, metas = self._col.scan(vectors=False)
        return dict(zip(ids, metas))

    def example_id(self) -> str:
        return self._col.first_id() or "dataset:split:index"

    def get(self, ids: Sequence[str], *, vectors: bool = False) -> tuple[list[str], np.ndarray | None, list[dict[str, Any]]]:
        """(ids, vectors or None, metadatas) of the stored ``ids`` among those asked (Chroma's order)."""
        return self._col.get(ids, vectors=vectors)

    def item(self, item_id: str, *, vector: bool = False) -> tuple[dict[str, Any], np.ndarray | None]:
        """(metadata, vector ``(dim,)`` or None) of one stored item; NotFoundError with an example id otherwise."""
        ids, vecs, metas = self._col.get([item_id], vectors=vector)
        if not ids:
            raise NotFoundError(f"no item {item_id!r} in collection {self.name!r}: ids look like '{self.example_id()}'")
        return metas[0], (vecs[0] if vecs is not None else None)

    def vector(self, item_id: str) -> np.ndarray:
        """The stored vector ``(1, dim)`` of ``item_id``."""
        _, vec = self.item(item_id, vector=True)
        assert vec is not None
        return vec[None, :]

    def scan(
        self,
        split: str | None = None,
        *,
        vectors: bool = True,
        fields: Sequence[str] | None = None,
        only: Sequence[str] | None = None,
        metadata: bool = True,
    ) -> tuple[list[str], np.ndarray, list[dict[str, Any]]]:
        """Every item (of ``split``), read page by page: (ids, vectors ``(n, dim)``, metadatas; only their
        ``fields`` when given; none with ``metadata=False``). ``only``: just these ids (from :meth:`ids`), in that
        order, without listing the split again."""
        if only is not None and split is not None:
            raise InputError("scan: give a split or the ids to read (only=...), not both")
        dim = self.record.embedder.dim
        return self._col.scan(self.where(split=split), vectors=vectors, dim=dim, fields=fields, only=only, metadatas=metadata)

    def page(self, where: dict[str, Any] | None, cursor: str | None, limit: int) -> tuple[list[str], list[dict[str, Any]], str | None]:
        """Up to ``limit`` items matching ``where`` after ``cursor``, in write order: (ids, metadatas, the next page's
        cursor or None); see :meth:`lookalike.core.store.VectorCollection.page`."""
        return self._col.page(where, cursor, limit)

    def scan_by_split(self) -> Scanned:
        """Every item, held-out ones first, then the indexed ones, then any other, read once: each split's ids and each
        label's are listed, the vectors read without metadata (a million items: their metadata would nearly double
        the read). Each split is then one block of rows (:meth:`Scanned.split`: views, not copies)."""
        listed = self.listed_labels()  # (labels and splits listed before the vectors are read)
        split_of = dict.fromkeys(self.ids("test"), "test")
        split_of.update(dict.fromkeys(self.ids("train"), "train"))
        if len(split_of) < self.count():  # (items of neither split, when there may be some: their split read by id)
            rest = [i for i in self.ids() if i not in split_of]
            got, _, metas = self._col.scan(only=rest, vectors=False, fields=("split",))
            split_of.update((i, str(m.get("split", ""))) for i, m in zip(got, metas))
        ids, vectors, _ = self.scan(only=list(split_of), metadata=False)
        scanned = Scanned(ids, vectors, self.labels_of(ids, listed), [split_of[i] for i in ids])
        del listed, split_of
        trim_memory()  # (the listings' and pages' freed memory back to the system before the caller's next step)
        return scanned

    def listed_labels(self) -> dict[str, int]:
        """id -> label number of every item, one id listing a label (ids only: reading a million items' metadata
        beside their vectors nearly doubles the read); empty past ``LABELS_LISTED`` label names or without labels.
        List before reading the vectors: an item removed in between keeps its label here."""
        if not self.record.labelled or len(self.label_names) > LABELS_LISTED:
            return {}
        return self._col.values("label", [*range(len(self.label_names)), UNLABELLED])

    def labels_of(self, ids: Sequence[str], listed: dict[str, int] | None = None) -> np.ndarray:
        """The label number of each of ``ids`` (``UNLABELLED`` in a collection without labels): from ``listed``
        (:meth:`listed_labels`, listed now when not given), and for the ids it lacks (more labels, an item added
        since, a label of another type) read by id, the label field alone."""
        if not self.record.labelled:
            return np.full(len(ids), UNLABELLED, dtype=int)
        known = self.listed_labels() if listed is None else listed
        missing = [i for i in ids if i not in known]
        if missing:
            got, _, metas = self._col.scan(only=missing, vectors=False, fields=("label",))
            known = {**known, **{i: m.get("label", UNLABELLED) for i, m in zip(got, metas)}}
        try:
            return np.array([int(known[i]) for i in ids], dtype=int)
        except KeyError as exc:
            raise StoreError(f"collection {self.name!r} no longer holds item {exc}: run the command again") from None

    def ids(self, split: str | None = None) -> list[str]:
        """The ids of every item (of ``split``), listed without their metadata or vectors."""
        return self._col.ids(self.where(split=split))

    def images(self, metadatas: Sequence[dict[str, Any]]) -> list[np.ndarray | None]:
        """Pixels of stored items from the source the record names (None where a file no longer reads)."""
        got = stored_pixels(self.record.protocol, metadatas, self.max_pixels)
        return [None if isinstance(im, Unreadable) else im for im in got]

    def neighbours(
        self,
        vectors: np.ndarray,
        k: int,
        *,
        labels: Sequence[int | str] | None = None,
        split: str | None = None,
        exclude: Collection[str] = (),
        metadata: bool = True,
        where: dict[str, Any] | None = None,
    ) -> list[list[Neighbor]]:
        """The ``k`` nearest stored items to each row of ``vectors`` ``(n, dim)``, nearest first.

        Only items with one of ``labels`` (ints or names) and of ``split`` that match ``where`` (Chroma's
        dict form, see :mod:`lookalike.data.filters`), never those in ``exclude``. ``metadata=False`` returns ids
        and distances only (faster, for evaluation).
        """
        if k < 1:
            raise InputError(f"--k must be at least 1, got {k}")
        vectors = np.asarray(vectors, np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.record.embedder.dim:
            raise InputError(f"query vectors must be (n, {self.record.embedder.dim}) for {self.name!r}, got shape {vectors.shape}")
        self.check_where(where)
        return self._col.query(vectors, k, combine(self.where(labels, split), where), exclude=exclude, metadata=metadata)

    def release_memory(self) -> None:
        """Let the store drop the indexes it loaded (a local store; see :meth:`Store.release_memory`): for a command
        that has read what it needs and builds its own index. Not while other threads use the store."""
        self.store.release_memory()

    def keep_warm(self, load: bool = False) -> None:
        """Plan filtered queries from an in-memory mirror of the items (for long-lived processes on a local
        store: the service, the app); ``load``: read it now, else in the background."""
        self._col.keep_warm(load)

    def fields(self) -> list[str]:
        """The metadata fields of the collection's items: a warm collection's all, else those of its first
        ``FIELD_SAMPLE`` items (read once)."""
        return self._known_fields()[0]

    def _known_fields(self) -> tuple[list[str], bool]:
        """(the fields, whether every item was read for them)."""
        fields = self._col.from_mirror(lambda mir: mir.fields())
        if fields is not None:
            return fields, True
        if self._fields is None:
            _, _, metas = self._col.get_page(0, FIELD_SAMPLE)
            self._fields = sorted({key for m in metas for key in m})
            self._fields_complete = len(metas) < FIELD_SAMPLE
        return self._fields, self._fields_complete

    def describe_fields(self) -> dict[str, dict[str, Any]] | None:
        """What a warm collection's fields hold (:meth:`lookalike.core.mirror.Mirror.describe`), for filter widgets; None
        while its mirror is not read yet (or for a cold collection)."""
        return self._col.from_mirror(lambda mir: mir.describe())

    def check_where(self, where: dict[str, Any] | None) -> None:
        """InputError naming the collection's fields when ``where`` filters on another (when every item's fields are
        known), or uses an unknown operator."""
        if not where:
            return
        validate(where)
        known, complete = self._known_fields()
        if complete:  # (a sample of the first items may miss fields that only later ones have)
            check_fields(where, known, self.name)

    # -- notes kept with the collection -------------------------------------------------------------

    def save_evaluation(self, report: dict[str, Any]) -> dict[str, Any]:
        """Keep ``report`` with the collection, replacing the previous one (see :meth:`save_note`)."""
        return self.save_note(EVALUATION_NOTE, report)

    def evaluation(self) -> dict[str, Any] | None:
        """The last report kept by :meth:`save_evaluation` (read from the store now), or None."""
        return self.saved_note(EVALUATION_NOTE)

    def save_note(self, key: str, report: dict[str, Any]) -> dict[str, Any]:
        """Keep ``report`` with the collection under ``key`` (``lookalike_...``), replacing the previous one.

        What is kept (and returned): ``report`` made JSON-safe (NaN as null), with ``saved_at`` (UTC).
        """
        saved = json_safe({**report, "saved_at": datetime.now(UTC).isoformat(timespec="seconds")})
        self._col.set_note(key, json.dumps(saved, allow_nan=False))
        return saved

    def saved_note(self, key: str) -> dict[str, Any] | None:
        """The report kept under ``key`` (read from the store now), or None."""
        text = self._col.note(key)
        if not text:
            return None
        try:
            return dict(json.loads(text))
        except ValueError:
            log.warning("the saved %s of %r is not JSON; ignored", key, self.name)
            return None

    # -- for lookalike check -------------------------------------------------------------------------

    def collection(self) -> VectorCollection:
        """The store-level collection (for :mod:`lookalike.analysis.check`)."""
        return self._col


def list_collections(store: Store) -> list[CollectionInfo]:
    """Every collection of ``store`` with its count, dataset and embedder (an unreadable record shows as ``?``)."""
    out = []
    for name in store.names():
        try:
            out.append(Gallery(store, name).info())
        except StoreError as exc:
            log.warning("%s", exc)
            out.append(CollectionInfo(name, store.open(name).count(), "?", "?"))
    return out
