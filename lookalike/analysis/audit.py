"""Audit a collection from its stored vectors: probable label errors, near-duplicates, leaks, outliers.

Every item (both splits) gets its ``k`` nearest other items by a chunked exact computation over
the vectors read back from the store (never re-embedded): on 70,000 MNIST vectors it took 49 s
here, against 29 s for 70,000 store queries whose answers are approximate (0.9994 of the exact
neighbours); exact answers keep the scores independent of HNSW's misses, and the store's own
answers are audited on a seeded sample (``store_recall_at_k``), as ``evaluate`` does. Exact search
grows as the square of the collection: past ``EXACT_MAX`` items the neighbours are approximate (n log n), and the
seeded sample measures them against exact search (``store_recall_at_k``); held-out leaks then use the store's
nearest indexed item, and exact search on evaluate's sample of queries. The approximate neighbours come from a
faiss HNSW graph built for the audit (:mod:`lookalike.analysis.ann`, ``neighbours_by="faiss"``) when faiss is installed,
else from the store, one query an item (``neighbours_by="store"``: ~5x slower on 100,000 digits).

- Label issues: how strongly an item's neighbours contradict its label (:func:`label_issue_scores`,
  a distance-weighted vote by default: chosen by the flipped-label validation in docs/audit.md).
- Near-duplicates: pairs at most a threshold apart, by default ``DUPLICATE_FACTOR`` times the
  median nearest-neighbour distance of the items without an exact copy (scale-free across
  embedders; measured with planted copies in docs/audit.md), grouped (a group holding held-out and
  indexed items is marked across splits). A held-out item whose exact nearest indexed item is that
  close is a leak; leaks are removed from a second, leak-free accuracy.
- Outliers: the items farthest from their ``k`` neighbours (lowest local density).
"""

from __future__ import annotations

import csv
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from lookalike.analysis import ann
from lookalike.analysis.metrics import duplicate_groups, exact_neighbours, label_issue_scores, outlier_scores
from lookalike.core.gallery import Gallery
from lookalike.errors import InputError, StoreError

log = logging.getLogger(__name__)

DUPLICATE_FACTOR = 0.25  # default threshold = this x the median nearest-neighbour distance (docs/audit.md)
METHODS = ("vote", "margin")
CHUNK = 2048  # items whose neighbours are computed at once (progress is reported per chunk)
STORE_SAMPLE = 1000  # items whose store answers are checked against the exact ones
EXACT_MAX = 100_000  # items whose neighbours are computed exactly (audit: 350 s here at 100,000); past it, approximate
NEIGHBOURS = ("auto", "exact", "faiss", "store")  # how: auto is exact up to EXACT_MAX, then faiss when installed, else the store
QUERY_CHUNK = 1000  # store queries asked at once past EXACT_MAX
MARGIN = 5  # neighbours asked beyond k + 1 past EXACT_MAX
AUDIT_NOTE = "lookalike_audit"  # the collection metadata key of the last saved audit
SAVED_GROUPS = 500  # duplicate groups kept with a saved audit (all are counted)
SAVED_MEMBERS = 50  # ids kept per saved group (``size`` counts them all)
SAVED_LEAKS = 1000  # leaked ids kept with a saved audit (``n_leaked`` counts them all)


@dataclass
class ItemScores:
    """Every item's scores, most suspicious first, as rows (dicts of ``FIELDS``) made one at a time: a million
    items' rows held as dicts took about half a gigabyte; these are arrays."""

    FIELDS: ClassVar[tuple[str, ...]] = ("id", "split", "label", "suggested_label", "score", "outlier_score", "duplicate_group")

    ids: list[str]
    splits: list[str]
    labels: np.ndarray
    suggested: np.ndarray
    score: np.ndarray
    spread: np.ndarray
    order: np.ndarray  # rows, most suspicious first
    group_of: dict[str, int]  # ids in a duplicate group: its number
    names: dict[int, str]  # each label (and suggested label) met: its name

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in self.order:
            yield {
                "id": self.ids[i],
                "split": self.splits[i],
                "label": self.names[int(self.labels[i])],
                "suggested_label": self.names[int(self.suggested[i])],
                "score": round(float(self.score[i]), 6),
                "outlier_score": round(float(self.spread[i]), 6),
                "duplicate_group": self.group_of.get(self.ids[i], ""),
            }


@dataclass
class Suspect:
    """An item whose neighbours disagree with its label."""

    id: str
    split: str
    label: str
    suggested_label: str
    score: float
    neighbours: list[str]
    neighbour_labels: list[str]
    neighbour_distances: list[float]


@dataclass
class DuplicateGroup:
    """Items closer to one another than the threshold (linked pair by pair)."""

    ids: list[str]
    splits: list[str]
    labels: list[str]
    cross_split: bool  # held-out and indexed items together: a leak
    max_distance: float  # the longest link that joined the group


@dataclass
class Outlier:
    id: str
    split: str
    label: str
    score: float  # mean distance to its k nearest neighbours


@dataclass
class AuditReport:
    collection: str
    embedder: str
    n_items: int
    k: int
    method: str
    suspects: list[Suspect]  # the ``top`` most suspicious, most suspicious first
    n_disputed: int  # items whose neighbours give the majority of their weight to another label
    threshold: float
    threshold_rule: str
    median_nn_distance: float
    groups: list[DuplicateGroup]  # every group, cross-split ones first, then the largest
    n_duplicate_pairs: int
    leaked_ids: list[str]  # held-out items with a copy among the indexed ones
    accuracy: float | None  # evaluate's 1-NN accuracy (None without a held-out split)
    leak_free_accuracy: float | None  # the same with the leaked queries removed
    n_queries: int
    outliers: list[Outlier]
    store_recall_at_k: float  # share of the exact k neighbours the store also returns, on a sample
    store_sample: int
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    all_scores: ItemScores | None = field(default=None, repr=False)  # every item, for --csv (not in to_dict)
    labelled: bool = True  # False: the collection has no labels (or one), so no label issues were looked for
    # "exact"; past EXACT_MAX items "faiss" (an HNSW graph built for the audit) or "store" (one store query an item),
    # checked against exact search on the sample
    neighbours_by: str = "exact"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(replace(self, all_scores=None))  # (every item's scores go to --csv, not here)
        out.pop("all_scores")
        out["n_leaked"] = len(self.leaked_ids)
        out["n_groups"] = len(self.groups)
        out["n_cross_split_groups"] = sum(g.cross_split for g in self.groups)
        return out


def self_neighbours(
    vectors: np.ndarray, k: int, progress: Callable[[int, int], None] | None = None, rows: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` nearest other rows (exact): (indices, Euclidean distances), ``(n, k)``, nearest first; with
    ``rows``, those of these rows only (``(len(rows), k)``).

    The row itself is dropped by index, so an exact copy of it still counts as a neighbour.
    """
    n = len(vectors)
    rows = np.arange(n) if rows is None else np.asarray(rows)
    k = min(k, n - 1)
    idx = np.empty((len(rows), k), dtype=int)
    dist = np.empty((len(rows), k))
    for start in range(0, len(rows), CHUNK):
        chunk = rows[start : start + CHUNK]
        got, d2 = exact_neighbours(vectors[chunk], vectors, k + 1)
        for row, item in enumerate(chunk):
            keep = got[row] != item
            if keep.all():  # itself not among the k+1 (more than k exact copies): drop the farthest
                keep[-1] = False
            idx[start + row] = got[row][keep][:k]
            dist[start + row] = np.sqrt(np.maximum(d2[row][keep][:k], 0.0))
        if progress is not None:
            progress(start + len(chunk), len(rows))
    return idx, dist


def store_neighbours(
    gallery: Gallery, ids: list[str], vectors: np.ndarray, k: int, progress: Callable[[int, int], None] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Each item's ``k`` nearest other items as the store answers them (as :func:`self_neighbours` returns them)."""
    n = len(ids)
    k = min(k, n - 1)
    row = {id_: i for i, id_ in enumerate(ids)}
    idx = np.empty((n, k), dtype=int)
    dist = np.empty((n, k))
    for start in range(0, n, QUERY_CHUNK):
        stop = min(start + QUERY_CHUNK, n)
        # (a few more than k + 1: items added since the scan are answers this audit does not know, and are left out)
        for r, answer in enumerate(gallery.neighbours(vectors[start:stop], min(k + 1 + MARGIN, n), metadata=False)):
            got = [(row[a.id], a.distance) for a in answer if a.id != ids[start + r] and a.id in row][:k]
            if len(got) < k:
                raise StoreError(
                    f"collection {gallery.name!r} gave fewer than {k} neighbours for {ids[start + r]!r}: "
                    f"run `lookalike check --collection {gallery.name}`"
                )
            idx[start + r], dist[start + r] = zip(*got)
        if progress is not None:
            progress(stop, n)
    return idx, dist


def audit(
    gallery: Gallery,
    *,
    k: int = 10,
    top: int = 20,
    threshold: float | None = None,
    method: str = "vote",
    n_outliers: int = 10,
    store_sample: int = STORE_SAMPLE,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    neighbours: str = "auto",
    release_store_memory: bool = False,
) -> AuditReport:
    """Audit ``gallery`` from its stored vectors (see the module's text). ``progress(done, total)`` is called per chunk;
    ``neighbours``: one of :data:`NEIGHBOURS`; ``release_store_memory``: before a faiss graph is built, let the store
    drop its loaded index (a command's own process: a million 784-d items peaked at 8.5 GB with both in memory)."""
    if neighbours not in NEIGHBOURS:
        raise InputError(f"--neighbours must be one of {', '.join(NEIGHBOURS)}, got {neighbours!r}")
    if neighbours == "faiss":
        ann.require()
    if k < 1:
        raise InputError(f"--k must be at least 1, got {k}")
    if n_outliers < 0:
        raise InputError(f"--outliers must be 0 or more, got {n_outliers}")
    if top < 1:
        raise InputError(f"--top must be at least 1, got {top}")
    if threshold is not None and not (np.isfinite(threshold) and threshold >= 0):
        raise InputError(f"--threshold must be a distance >= 0, got {threshold}")
    if method not in METHODS:
        raise InputError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    started = time.perf_counter()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    # held-out then indexed items, without their metadata (evaluate's two splits are then views, not copies)
    items = gallery.scan_by_split()
    ids, vecs, labels, splits = items.ids, items.vectors, items.labels, items.splits
    timings["read"] = time.perf_counter() - t0
    if len(ids) < 2:
        raise InputError(f"collection {gallery.name!r} has {len(ids)} item(s): the audit compares items, so it needs at least two")
    # label issues need labels: two or more (an unlabelled collection gets duplicates, leaks and outliers only)
    labelled = gallery.record.labelled and not (labels < 0).any() and len(np.unique(labels)) >= 2
    if k >= len(ids):
        raise InputError(f"--k {k} needs more than the {len(ids)} items of {gallery.name!r}: choose a k below {len(ids)}")
    names = gallery.label_names
    n_labels = max(len(names), int(labels.max()) + 1, 1)

    t0 = time.perf_counter()
    how = neighbours
    if how == "auto":
        how = "exact" if len(ids) <= EXACT_MAX else "faiss" if ann.available() else "store"
    if how == "faiss":
        if release_store_memory:
            gallery.release_memory()  # (the leaks' store queries below load the index again)
        nn, dist, short = ann.self_neighbours(vecs, k, margin=MARGIN, seed=seed, progress=progress)
        if len(short):  # (rows the graph answered short: exact search for them)
            nn[short], dist[short] = self_neighbours(vecs, k, rows=short)
    elif how == "store":
        nn, dist = store_neighbours(gallery, ids, vecs, k, progress)
    else:
        nn, dist = self_neighbours(vecs, k, progress)
    by_store = how != "exact"  # (approximate neighbours: checked on a sample, and leaks through the store)
    timings["neighbours"] = time.perf_counter() - t0

    # label issues
    if labelled:
        score, suggested = label_issue_scores(labels, labels[nn], dist, n_labels, method)
        other, _ = label_issue_scores(labels, labels[nn], dist, n_labels, "margin" if method == "vote" else "vote")
    else:
        score, suggested, other = np.zeros(len(ids)), labels, np.zeros(len(ids))
    order = np.lexsort((np.arange(len(ids)), -other, -score))  # most suspicious first; ties by the other score

    def suspect(i: int) -> Suspect:
        return Suspect(
            ids[i],
            splits[i],
            gallery.label_name(int(labels[i])),
            gallery.label_name(int(suggested[i])),
            float(score[i]),
            [ids[j] for j in nn[i]],
            [gallery.label_name(int(labels[j])) for j in nn[i]],
            [float(d) for d in dist[i]],
        )

    # near-duplicates
    # the median over items without an exact copy: a collection ingested twice still gets a threshold above 0
    positive = dist[:, 0][dist[:, 0] > 0]
    median_nn = float(np.median(positive)) if len(positive) else 0.0
    if threshold is None:
        threshold = DUPLICATE_FACTOR * median_nn
        rule = f"{DUPLICATE_FACTOR} x the median nearest-neighbour distance {median_nn:.4g}"
    else:
        rule = "--threshold"
    close = dist <= threshold  # at 0: exact copies
    link: dict[tuple[int, int], float] = {}  # each close pair (lower index first) and its distance
    for r, c in zip(*np.nonzero(close)):
        a, b = sorted((int(r), int(nn[r, c])))
        link[(a, b)] = float(dist[r, c])
    pairs = np.array(sorted(link), dtype=int).reshape(-1, 2)
    found = duplicate_groups(pairs, len(ids))
    group_index = {int(i): n for n, members in enumerate(found) for i in members}
    longest = [0.0] * len(found)
    for (a, _), d in link.items():
        longest[group_index[a]] = max(longest[group_index[a]], d)
    groups = []
    for members, longest_link in zip(found, longest):
        group_splits = [splits[i] for i in members]
        groups.append(
            DuplicateGroup(
                [ids[i] for i in members],
                group_splits,
                [gallery.label_name(int(labels[i])) for i in members],
                "test" in group_splits and "train" in group_splits,
                longest_link,
            )
        )
    groups.sort(key=lambda g: (not g.cross_split, -len(g.ids), g.ids[0]))

    # the store's answers against the exact ones, on a sample (before the leaks, which take the vectors over)
    t0 = time.perf_counter()
    if by_store:
        recall, sample = _sample_recall(ids, vecs, nn, dist, k, store_sample, seed)
    else:
        recall, sample = _store_recall(gallery, ids, vecs, nn, dist, k, store_sample, seed)
    timings["store_check"] = time.perf_counter() - t0

    # leaks: held-out items whose exact nearest indexed item is within the threshold (not read off the
    # groups, which chain and see only k neighbours); evaluate's accuracy with and without them
    accuracy = leak_free = None
    n_queries = 0
    leaked: list[str] = []
    if "test" in splits and "train" in splits:
        from lookalike.analysis.evaluate import held_out

        t0 = time.perf_counter()
        # the vectors already read, not read again; every held-out item exact unless the neighbours came from the store
        # (the vectors handed over: the store's index is loaded for the queries without every vector beside it)
        del vecs
        h = held_out(gallery, 1, items=items, seed=seed, sample_exact=by_store, consume=True)
        n_queries = len(h.test_ids)
        nearest = h.store_d1.copy()  # each held-out item's nearest indexed item: exact where exact search answered
        nearest[h.exact_rows] = np.minimum(nearest[h.exact_rows], np.sqrt(np.maximum(h.exact_d2[:, 0], 0.0)))
        copied = nearest <= threshold
        leaked = sorted(h.test_ids[i] for i in np.flatnonzero(copied))
        if labelled:
            right = h.predictions() == h.y_test
            accuracy = float(right.mean())
            leak_free = float(right[~copied].mean()) if (~copied).any() else None
        timings["evaluate"] = time.perf_counter() - t0

    # outliers
    spread = outlier_scores(dist)
    far = np.lexsort((np.arange(len(ids)), -spread))[:n_outliers]

    group_of = {i: n for n, g in enumerate(groups) for i in g.ids}
    names = {int(x): gallery.label_name(int(x)) for x in np.unique(np.concatenate([labels, suggested]))}
    all_scores = ItemScores(ids, splits, labels, suggested, score, spread, order, group_of, names)
    return AuditReport(
        collection=gallery.name,
        embedder=gallery.record.embedder.describe(),
        n_items=len(ids),
        k=k,
        method=method,
        suspects=[suspect(int(i)) for i in order[:top]] if labelled else [],
        n_disputed=int((score > 0.5).sum()),
        threshold=float(threshold),
        threshold_rule=rule,
        median_nn_distance=median_nn,
        groups=groups,
        n_duplicate_pairs=len(pairs),
        leaked_ids=leaked,
        accuracy=accuracy,
        leak_free_accuracy=leak_free,
        n_queries=n_queries,
        outliers=[Outlier(ids[i], splits[i], gallery.label_name(int(labels[i])), float(spread[i])) for i in far],
        store_recall_at_k=recall,
        store_sample=sample,
        seconds=time.perf_counter() - started,
        timings={key: round(v, 2) for key, v in timings.items()},
        all_scores=all_scores,
        labelled=labelled,
        neighbours_by=how,
    )


def checked_answers(neighbours_by: str) -> str:
    """Whose answers ``store_recall_at_k`` measures, in words: the faiss graph's, else the store's."""
    return "the faiss graph's answers" if neighbours_by == "faiss" else "the store's answers"


def _store_recall(
    gallery: Gallery, ids: list[str], vecs: np.ndarray, nn: np.ndarray, dist: np.ndarray, k: int, sample: int, seed: int
) -> tuple[float, int]:
    """Share of each sampled item's exact ``k`` neighbours that the store's ``k`` answers hold (a tie at the k-th distance counts)."""
    pick = _pick(len(ids), sample, seed)
    if not len(pick):
        return float("nan"), 0
    answers = gallery.neighbours(vecs[pick], k + 1, metadata=False)
    found = [
        _held([(n.id, n.distance) for n in row if n.id != ids[i]][:k], {ids[j] for j in nn[i]}, dist[i, -1], k)
        for row, i in zip(answers, pick)
    ]
    return float(np.mean(found)), len(pick)


def _sample_recall(ids: list[str], vecs: np.ndarray, nn: np.ndarray, dist: np.ndarray, k: int, sample: int, seed: int) -> tuple[float, int]:
    """Share of each sampled item's exact ``k`` neighbours that the store's answers ``nn`` hold (a tie at the k-th
    distance counts): exact search on the sample only, so it grows as the collection."""
    pick = _pick(len(ids), sample, seed)
    if not len(pick):
        return float("nan"), 0
    exact_nn, exact_dist = self_neighbours(vecs, k, rows=pick)
    found = [_held(list(zip(nn[i], dist[i])), set(exact_nn[r].tolist()), exact_dist[r, -1], k) for r, i in enumerate(pick)]
    return float(np.mean(found)), len(pick)


def _pick(n: int, sample: int, seed: int) -> np.ndarray:
    """The seeded sample of items whose answers are checked (sorted rows)."""
    return np.sort(np.random.default_rng(seed).choice(n, min(sample, n), replace=False))


def _held(answers: list[tuple[Any, float]], exact: set[Any], kth: float, k: int) -> float:
    """Share of the exact ``k`` that ``answers`` (key, distance) hold: a key among ``exact``, or a tie at the k-th distance."""
    return sum(key in exact or d <= kth * (1 + 1e-4) + 1e-9 for key, d in answers) / k


def save_audit(gallery: Gallery, report: AuditReport) -> dict[str, Any]:
    """Keep ``report`` with its collection (what the app's Audit page and ``GET /collections/NAME/audit`` show).

    The suspects and outliers as listed, the first ``SAVED_GROUPS`` duplicate groups (all counted;
    each with its first ``SAVED_MEMBERS`` ids and its ``size``), the first ``SAVED_LEAKS`` leaked
    ids (``n_leaked`` counts all); ``saved_at`` is UTC. Returns what was saved.
    """
    saved = report.to_dict()
    saved["groups"] = saved["groups"][:SAVED_GROUPS]
    for group in saved["groups"]:
        group["size"] = len(group["ids"])
        for key in ("ids", "splits", "labels"):
            group[key] = group[key][:SAVED_MEMBERS]
    saved["leaked_ids"] = saved["leaked_ids"][:SAVED_LEAKS]
    return gallery.save_note(AUDIT_NOTE, saved)


def saved_audit(gallery: Gallery) -> dict[str, Any] | None:
    """The last audit :func:`save_audit` kept with ``gallery``'s collection, or None."""
    return gallery.saved_note(AUDIT_NOTE)


def write_csv(report: AuditReport, out: str | os.PathLike[str]) -> Path:
    """Every item, most suspicious first: id, split, label, suggested_label, score, outlier_score, duplicate_group."""
    path = Path(out)
    try:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(ItemScores.FIELDS))
            writer.writeheader()
            writer.writerows(report.all_scores or ())
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def save_audit_picture(gallery: Gallery, report: AuditReport, out: str | os.PathLike[str], *, suspects: int = 12, groups: int = 8) -> Path:
    """Each of the first ``suspects`` beside its nearest neighbours (captioned given -> suggested), then duplicate groups side by side."""
    from lookalike.analysis.plots import audit_figure, save_figure

    shown = report.suspects[:suspects]
    group_rows = report.groups[:groups]
    width = 6
    wanted = [s.id for s in shown] + [n for s in shown for n in s.neighbours[: width - 1]]
    wanted += [i for g in group_rows for i in g.ids[:width]]
    got_ids, _, metas = gallery.get(wanted)
    by_id = dict(zip(got_ids, gallery.images(metas)))
    rows = []
    for s in shown:
        cells = [(by_id.get(s.id), f"{s.label} -> {s.suggested_label}\n{s.score:.2f}")]
        cells += [(by_id.get(n), f"{lab} d={d:.3g}") for n, lab, d in zip(s.neighbours, s.neighbour_labels, s.neighbour_distances)][
            : width - 1
        ]
        rows.append((f"{s.id} ({s.split})", cells))
    for g in group_rows:
        tag = "LEAK across splits" if g.cross_split else "duplicates"
        rows.append(
            (f"{tag}: {len(g.ids)} items", [(by_id.get(i), f"{lab} {sp}") for i, lab, sp in zip(g.ids, g.labels, g.splits)][:width])
        )
    title = (
        f"audit of {report.collection}: {len(shown)} most suspicious labels (given -> suggested), "
        f"{len(group_rows)} of {len(report.groups)} duplicate groups"
    )
    return save_figure(audit_figure(rows, title, width), out)
