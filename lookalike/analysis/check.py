"""Check a collection: is everything that was stored still there and answering?

:func:`check` verifies that the record parses, that every stored id reads back with a finite vector
of the recorded dimension and valid metadata, that the index answers (a sample of stored vectors
finds itself), that each label partition holds exactly the main collection's ids of its label, and
counts the items per split. :func:`repair` mends what can be mended in place: it fills the label
partitions from the main collection's vectors (dropping them first when more than entries are wrong)
and rebuilds an index that lost items. A main collection whose vectors or index no longer
read cannot be mended in place (measured: deleting its unreadable items leaves Chroma unable to
apply its own log, and every later read fails): drop it and ingest again.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from lookalike.core.gallery import Gallery
from lookalike.core.store import Store, VectorCollection
from lookalike.data.catalogue import FINGERPRINT_KEYS, fingerprint_missing
from lookalike.data.datasets import ADDED_PREFIX as ADDED
from lookalike.data.datasets import FOLDER_PREFIX, SPLITS
from lookalike.errors import StoreError
from lookalike.util import UNLABELLED

log = logging.getLogger(__name__)

CHUNK = 1000  # ids per vector read-back
SELF_QUERIES = 200  # stored vectors queried to see that the index finds them
PARTITION_SELF_QUERIES = 20  # and in each label partition
# a vector the collection's own search (k=1, ef_search 64) misses is asked again WIDE neighbours deep (Chroma searches
# max(ef_search, k) wide): found then, it is HNSW's own miss (100,000 noisy digits: 1 of 200, found at k=100), said as a
# note; still not found, the record is unreachable (the damage of Chroma's issue #7758), a problem
WIDE = 256
CHECKED_FIELDS = ("label", "split", "sha256", "file", "path", *FINGERPRINT_KEYS)  # the metadata a check reads


@dataclass
class CheckReport:
    """What :func:`check` found. ``ok`` is False when anything is wrong; ``problems`` says what, ``fix`` how to mend it."""

    collection: str
    db: str
    ok: bool
    count: int
    counts: dict[str, int]
    problems: list[str] = field(default_factory=list)
    fix: str = ""
    unreadable_ids: list[str] = field(default_factory=list)  # the first 100
    partitions: dict[str, int] = field(default_factory=dict)  # label name -> items in its partition
    notes: list[str] = field(default_factory=list)  # what is worth knowing but not damage (the index's own misses)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check(store: Store, name: str | None = None, *, full: bool = False, release_store_memory: bool = False) -> CheckReport:
    """Check collection ``name`` (``None``: the store's only one) of ``store``; ``full``: every stored vector
    must find itself through the index (else a sample of 200 does). ``release_store_memory``: the store drops the
    indexes it loaded after the main collection and after each label partition, so that one is in memory at a time
    (for a process of its own: see :meth:`Store.release_memory`)."""
    name = store.pick(name)
    try:
        gallery = Gallery(store, name)
    except StoreError as exc:
        col = store.open(name)
        return CheckReport(
            name, store.db, False, col.count(), {}, [f"record: {exc}"], f"drop it (`lookalike drop {name}`) and ingest again"
        )
    return _check(gallery, full, release_store_memory)


def _check(g: Gallery, full: bool = False, release: bool = False) -> CheckReport:
    try:
        return _check_items(g, full, release)
    except StoreError as exc:
        return CheckReport(
            g.name,
            g.db,
            False,
            0,
            {},
            [f"the collection's items cannot be read: {exc}"],
            f"drop it (`lookalike drop {g.name}`) and ingest again",
        )


def _check_items(g: Gallery, full: bool = False, release: bool = False) -> CheckReport:
    col = g.collection()
    problems: list[str] = []
    # only the fields checked (a million items' whole metadata is a gigabyte of dicts)
    ids, _, metas = col.scan(vectors=False, fields=CHECKED_FIELDS)
    counts = dict.fromkeys(SPLITS, 0)
    by_label: dict[int, set[str]] = {}
    bad_meta = 0
    labelled = g.record.labelled
    for id_, m in zip(ids, metas):
        label, split = m.get("label"), m.get("split")
        valid = isinstance(label, int) and (0 <= label < max(len(g.label_names), 1) if labelled else label == UNLABELLED)
        if not valid or split not in SPLITS:
            bad_meta += 1
            continue
        counts[split] += 1
        by_label.setdefault(label, set()).add(id_)
    if bad_meta:
        problems.append(f"{bad_meta} items have metadata without a valid label or split")
    if len(set(ids)) != len(ids):
        problems.append(f"{len(ids) - len(set(ids))} ids are listed twice")
    importing = col.notes().get("lookalike_import")  # (lookalike.core.transfer's mark of an import not finished)
    if importing:
        problems.append(f"the import from {importing} did not finish: run `lookalike import` with that file again")
    catalogue_trouble = _catalogue_problems(g, ids, metas)
    problems += catalogue_trouble
    index_note = col.verify_id_index(ids)  # (lookalike's own id index, for paging by cursor: rebuilt when it differs)

    unreadable = _unreadable_vectors(col, ids, g.record.embedder.dim)
    if unreadable:
        problems.append(f"{len(unreadable)} of {len(ids)} items have no readable vector (e.g. {unreadable[0]!r})")
    bad = set(unreadable)
    readable = [i for i in ids if i not in bad]
    notes: list[str] = [index_note] if index_note else []
    lost, missed = _self_query(col, readable, len(readable) if full else SELF_QUERIES)
    if lost:
        problems.append(lost)
    if missed:
        notes.append(missed)

    partitions: dict[str, int] = {}
    partition_trouble = False
    if g.partitions_behind:
        partition_trouble = True
        problems.append(
            "the label partitions are behind the index (a large ingest or import stopped before filling them): "
            "label filters are answered without them until they are filled"
        )
    if g.record.label_partitions:
        if release:
            g.release_memory()  # (the main collection's index: not asked again)
        for label in range(len(g.label_names)):
            want = by_label.get(label, set())
            part = col.partition(label)
            have = set(part.scan(vectors=False, metadatas=False)[0]) if part is not None else set()
            partitions[g.label_name(label)] = len(have)
            missing, extra = len(want - have), len(have - want)
            n_self = len(have) if full else PARTITION_SELF_QUERIES
            lost_in_part, missed_in_part = _self_query(part, sorted(have), n_self) if part is not None else ("", "")
            if lost_in_part:
                partition_trouble = True
                problems.append(f"label partition {g.label_name(label)!r}: {lost_in_part}")
            if missed_in_part:
                notes.append(f"label partition {g.label_name(label)!r}: {missed_in_part}")
            if release and part is not None:
                g.release_memory()
            if missing or extra:
                partition_trouble = True
                problems.append(
                    f"label partition {g.label_name(label)!r} lacks {missing} of the main collection's {len(want)} items of its "
                    f"label and has {extra} entries without a main item"
                )
        for label in _stray_partitions(g):
            partition_trouble = True
            part = col.partition(label)
            n = part.count() if part is not None else 0
            problems.append(f"label partition {label} names no label of the record: its {n} entries have no main item")
    fix = ""
    if problems:
        if (partition_trouble or lost) and not (unreadable or bad_meta or catalogue_trouble):
            fix = (
                f"run `lookalike check --collection {g.name} --repair` (it rebuilds the index and the label partitions "
                "from the stored vectors; nothing is embedded again)"
            )
        elif catalogue_trouble and g.record.dataset == "folder" and not (unreadable or lost or bad_meta):
            fix = f"run `lookalike sync --collection {g.name}` (it upgrades, de-duplicates and fingerprints folder items)"
        else:
            fix = f"drop it (`lookalike drop {g.name}`) and ingest again"
    return CheckReport(g.name, g.db, not problems, len(ids), counts, problems, fix, unreadable[:100], partitions, notes)


def _catalogue_problems(g: Gallery, ids: Sequence[str], metas: Sequence[dict[str, Any]]) -> list[str]:
    """A file stored under two ids, an item whose split breaks the rule, a folder item without its fingerprint."""
    out: list[str] = []
    rec = g.record
    added = [(i, m) for i, m in zip(ids, metas) if i.startswith(ADDED)]  # images added one by one (lookalike.core.items)
    wrong = [i for i, m in added if i != ADDED + str(m.get("sha256", ""))[:16] or not m.get("file")]
    if wrong:
        out.append(f"{len(wrong)} added images have an id that is not their content's, or no kept file (e.g. {wrong[0]!r})")
    kept = [j for j, i in enumerate(ids) if not i.startswith(ADDED)]  # the rest: the source's own items
    ids, metas = [ids[j] for j in kept], [metas[j] for j in kept]
    if rec.dataset == "folder":
        by_path: dict[str, list[str]] = {}
        for id_, m in zip(ids, metas):
            by_path.setdefault(str(m.get("path")), []).append(id_)
        twice = sorted(p for p, got in by_path.items() if len(got) > 1)
        if twice:
            out.append(f"{len(twice)} files are stored under two ids or more (e.g. {twice[0]!r}: {', '.join(by_path[twice[0]])})")
    moved = []
    for id_, m in zip(ids, metas):
        parts = id_.split(":", 2)
        if rec.living:
            if id_ != f"{FOLDER_PREFIX}{m.get('path')}":
                moved.append(id_)  # a lasting folder id is its path and nothing else (no split)
        elif len(parts) == 3 and parts[1] in SPLITS and parts[1] != m.get("split"):
            moved.append(id_)  # the split its id was given is not the split it is stored under
    if moved:
        out.append(f"{len(moved)} items break the split rule (their id and stored split disagree, e.g. {moved[0]!r})")
    if rec.living:
        missing = [i for i, m in zip(ids, metas) if fingerprint_missing(m)]
        if missing:
            out.append(f"{len(missing)} folder items have no fingerprint (size, modification time, SHA-256; e.g. {missing[0]!r})")
    elif rec.legacy_folder:
        out.append("the folder collection was written by an earlier release (ids with the split, no fingerprints)")
    return out


def _stray_partitions(g: Gallery) -> list[int]:
    """Label partitions of ``g`` whose label the record does not name."""
    out = []
    for part, owner in g.store.all_collections():
        if owner == g.name and part.startswith(g.name) and re.fullmatch(r"\.p\d+", part[len(g.name) :]):
            label = int(part[len(g.name) + 2 :])
            if not 0 <= label < len(g.label_names):
                out.append(label)
    return sorted(out)


def _unreadable_vectors(col: VectorCollection, ids: Sequence[str], dim: int) -> list[str]:
    """Ids whose vector cannot be read back, or is not a finite vector of ``dim`` numbers."""
    bad: list[str] = []

    def probe(chunk: Sequence[str]) -> None:
        try:
            got_ids, vecs, _ = col.get(chunk, vectors=True)
        except StoreError:
            if len(chunk) == 1:
                bad.append(chunk[0])
                return
            half = len(chunk) // 2
            probe(chunk[:half])
            probe(chunk[half:])
            return
        assert vecs is not None
        bad.extend(sorted(set(chunk) - set(got_ids)))
        if len(got_ids) and (vecs.ndim != 2 or vecs.shape[1] != dim):
            bad.extend(got_ids)
        elif len(got_ids):
            bad.extend(i for i, ok in zip(got_ids, np.isfinite(vecs).all(axis=1)) if not ok)

    for start in range(0, len(ids), CHUNK):
        probe(list(ids[start : start + CHUNK]))
    return bad


def _self_query(col: VectorCollection, ids: Sequence[str], n: int = SELF_QUERIES) -> tuple[str, str]:
    """(a problem line when stored vectors do not find themselves, or a vector at distance 0, even ``WIDE`` deep;
    a note when some are found only that deep: HNSW's own misses), each '' when there is nothing to say."""
    if not ids:
        return "", ""
    rng = np.random.default_rng(0)
    sample = [ids[i] for i in sorted(rng.choice(len(ids), size=min(n, len(ids)), replace=False))]
    try:
        got_ids, vecs, _ = col.get(sample, vectors=True)
        assert vecs is not None
        rows = col.query(vecs, 1, metadata=False)
        first = [i for i, row in enumerate(rows) if not row or row[0].distance > 1e-3]
        wide = col.query(vecs[first], WIDE, metadata=False) if first else []
    except StoreError as exc:
        return f"the index fails to answer queries ({exc})", ""
    lost = sum(1 for row in wide if not row or row[0].distance > 1e-3)
    problem = f"the index does not find {lost} of {len(got_ids)} stored vectors queried" if lost else ""
    missed = len(first) - lost
    note = (
        f"{missed} of {len(got_ids)} stored vectors queried are found only by a search {WIDE} deep, not by the collection's own"
        " (HNSW's misses: their neighbours may be missed too; not damage)"
        if missed
        else ""
    )
    return problem, note


def repair(store: Store, name: str | None = None, *, release_store_memory: bool = False) -> CheckReport:
    """Rebuild the index (when stored vectors no longer find themselves) and the label partitions, from the stored
    vectors, when only those are wrong; returns the full check after the repair (or the check alone).
    ``release_store_memory``: the store drops its indexes after each label partition (for a process of its own:
    see :meth:`Store.release_memory`)."""
    report = check(store, name, full=True, release_store_memory=release_store_memory)
    if report.ok or "--repair" not in report.fix:
        return report
    if any(p.startswith(("the index does not find", "the index fails to answer")) for p in report.problems):
        store.rebuild(report.collection)
    name = report.collection
    gallery = Gallery(store, name)
    if gallery.record.label_partitions:
        gallery.collection().mark_partitions_behind(True)  # (a repair killed midway leaves label filters exact, without them)
        # partitions that only lack entries or hold extra ones are filled in place; any other damage (an index
        # that loses its own items, a partition of no label) drops them all first
        in_place = ("the label partitions are behind", "label partition ")
        damaged = [p for p in report.problems if p.startswith("label partition ") and " lacks " not in p]
        if damaged or not all(p.startswith(in_place) for p in report.problems):
            store.drop_partitions(name)
            gallery = Gallery(store, name)
        gallery.fill_partitions(release=release_store_memory)  # (read back label by label)
    return check(store, name, full=True, release_store_memory=release_store_memory)
