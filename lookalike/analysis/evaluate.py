"""Evaluate: held-out k-NN accuracy through the store, audited against exact search.

Every held-out (``split="test"``) item queries the indexed (``split="train"``) items through Chroma (past
``STORE_QUERIES`` held-out items, a seeded sample of that many: a million digits' 100,000 would take ~170 s).
The same queries are then answered by brute force over the indexed vectors read back from the
store, which gives ``recall_at_1`` (how often the store's first answer is an exact nearest
neighbour; ties at equal distance count) and ``exact_accuracy`` (the accuracy exact search gets).

Retrieval metrics (Musgrave, Belongie and Lim 2020, section 3.2), through the store and exactly:
precision@1/5/10 over every held-out query; R-precision and MAP@R, which rank R items per query
(R = the indexed items of its label: ~6,000 on MNIST), over every query when that is at most
``R_BUDGET`` ranked items in all, else over a seeded sample of ``r_sample`` queries, fewer (at least
``R_MIN``) when R is so long that they would rank more than ``R_RESULTS`` items (the exact ranking over
the queries exact search answered while they fit in ``EXACT_R_CELLS`` ranks, and over the sample too
for comparison).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.analysis.metrics import (
    confusion,
    exact_neighbours,
    exact_ranking,
    per_class_accuracy,
    recall_hits,
    retrieval_scores,
    summarise_retrieval,
    vote,
)
from lookalike.core.gallery import Gallery, Scanned
from lookalike.errors import InputError, StoreError
from lookalike.util import trim_memory

log = logging.getLogger(__name__)

SAVED_MISTAKES = 1000  # mistakes kept with a saved report (all are counted)
PRECISION_KS = (1, 5, 10)
R_BUDGET = 2_000_000  # ranked items the R metrics may ask the store for (queries x largest R) before sampling
R_SAMPLE = 300  # held-out queries the store's R metrics use past that budget (~50 ms each at R ~ 6,000)
# ... and fewer when R is so long that they would rank more than R_RESULTS items (a million digits: R ~ 90,000, 27
# queries, ~2 s each), at least R_MIN; the store is asked RANK_CHUNK ranked items at a time (each is a Python object when answered)
R_RESULTS = 2_500_000
R_MIN = 20
RANK_CHUNK = 1_000_000
# exact search costs queries x indexed items: past EXACT_PAIRS (70,000 MNIST digits: 6e8, every query exact), a
# seeded sample of max(EXACT_MIN, EXACT_PAIRS // indexed) queries is answered exactly (1,111 at 1,000,000 items)
EXACT_PAIRS = 1_000_000_000
EXACT_MIN = 1000
EXACT_R_CELLS = 100_000_000  # exact ranks the R metrics may hold (queries x largest R; MNIST: 6.7e7) before sampling
# the store answers every held-out item up to STORE_QUERIES of them, else a seeded sample of that many (a million
# digits: 100,000 held out, ~170 s through the store on one core; the sample's 1-NN accuracy is within ~0.1 point)
STORE_QUERIES = 20_000


@dataclass
class EvalReport:
    """Held-out accuracy of one collection. ``confusion[t][p]`` counts true label t predicted p."""

    collection: str
    embedder: str
    k: int
    n_queries: int
    n_indexed: int
    accuracy: float
    exact_accuracy: float
    recall_at_1: float
    per_class: dict[str, float]
    confusion: list[list[int]]
    label_names: list[str]
    queries_per_s: float
    query_seconds: float
    seconds: float
    mistakes: list[dict[str, Any]] = field(default_factory=list)  # {id, nearest_id, true, predicted}
    accuracy_1nn: float = 0.0  # the same store answers read as 1-NN (equals ``accuracy`` when k=1)
    # {"store": {...}, "exact": {...}}: precision_at_1/5/10, r_precision, map_at_r and per_class of each;
    # "r_queries_store"/"r_queries_exact": how many queries the R metrics used (the store's may be a seeded
    # sample: then "exact_same_queries" has the exact R metrics over it), "r_max": the largest R
    retrieval: dict[str, Any] = field(default_factory=dict)
    # exact search over a seeded sample of the queries past EXACT_PAIRS: ``exact_accuracy`` and ``recall_at_1`` are the
    # sample's, ``accuracy_same_queries`` the store's accuracy on it (``exact_queries == n_queries``: every query)
    exact_queries: int = 0
    accuracy_same_queries: float | None = None
    # wall seconds of each stage: read (the scans), store (held-out queries), exact, r_store and r_exact (R rankings)
    timings: dict[str, float] = field(default_factory=dict)
    # every held-out item; past STORE_QUERIES, ``n_queries`` of them (a seeded sample) are asked: the figures are the sample's
    n_held_out: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def queries_asked(self) -> str:
        """The held-out queries asked, in words: all of them, or a seeded sample past ``STORE_QUERIES``."""
        if self.n_held_out > self.n_queries:
            return f"{self.n_queries:,} of {self.n_held_out:,} held-out items asked, a seeded sample"
        return f"{self.n_queries:,} held-out queries"


@dataclass
class HeldOut:
    """Every held-out item's store answers and exact answers among the indexed items (what evaluate and audit share)."""

    test_ids: list[str]
    test_vecs: np.ndarray
    y_test: np.ndarray
    train_ids: list[str]
    train_vecs: np.ndarray
    y_train: np.ndarray
    k: int  # neighbours in the vote
    store_nn: np.ndarray  # (queries, width) rows of the indexed items, nearest first (width >= k)
    store_d1: np.ndarray  # (queries,) Euclidean distance of the store's first answer
    exact_rows: np.ndarray  # the queries answered exactly too: all, or a seeded sample past EXACT_PAIRS
    exact_nn: np.ndarray  # (len(exact_rows), width), as store_nn
    exact_d2: np.ndarray  # their squared distances
    query_seconds: float
    timings: dict[str, float] = field(default_factory=dict)  # read, store, exact (wall seconds)
    n_held_out: int = 0  # every held-out item (``test_ids`` may be a seeded sample of them: ``max_queries``)
    excluded: list[str] = field(default_factory=list)  # every held-out id (kept out of the store's answers)

    @property
    def sampled(self) -> bool:
        return len(self.exact_rows) < len(self.test_ids)

    def predictions(self, exact: bool = False) -> np.ndarray:
        """The k-NN vote of each held-out item (store answers), or of each of ``exact_rows`` (exact answers)."""
        nn = self.exact_nn if exact else self.store_nn
        return vote(self.y_train[nn[:, : self.k]])


def exact_sample(n_queries: int, n_indexed: int, seed: int = 0) -> np.ndarray:
    """The queries exact search answers: every one while ``queries x indexed <= EXACT_PAIRS``, else a seeded sample
    of ``max(EXACT_MIN, EXACT_PAIRS // indexed)`` (sorted rows), so its cost grows as the index, not its square."""
    if n_queries * n_indexed <= EXACT_PAIRS:
        return np.arange(n_queries)
    size = min(n_queries, max(EXACT_MIN, EXACT_PAIRS // max(n_indexed, 1)))
    return np.sort(np.random.default_rng(seed).choice(n_queries, size, replace=False))


def held_out(
    gallery: Gallery,
    k: int = 1,
    width: int | None = None,
    items: Scanned | None = None,
    seed: int = 0,
    sample_exact: bool = True,
    max_queries: int | None = None,
    consume: bool = False,
) -> HeldOut:
    """Ask the store for each held-out item's ``max(k, width)`` nearest indexed items, and brute force for those of
    every item or of a seeded sample (:func:`exact_sample`).

    ``items``: the whole collection as :meth:`Gallery.scan_by_split` read it, when the caller has it already;
    ``sample_exact=False``: every item exact (an audit that computes exact neighbours anyway); ``max_queries``:
    past that many held-out items, a seeded sample of that many are the queries (``n_held_out`` counts them all).
    ``consume``: the caller hands ``items`` over and keeps no other reference to its vectors: after exact search,
    ``items.vectors`` is emptied, the result keeps a copy of the held-out rows and no ``train_vecs`` (empty), so the
    store's index is loaded for its queries without every vector beside it (an audit of a million 784-d items held
    both: 3.8 GB and 3.1 GB).
    """
    if k < 1:
        raise InputError(f"--k must be at least 1, got {k}")
    t_read = time.perf_counter()
    if items is None:  # the held-out ids listed, the sample drawn, then only the sample's vectors read (no metadata)
        listed = gallery.listed_labels()  # (label by label, before the vectors: cheaper than reading the metadata)
        excluded = gallery.ids("test")  # (every held-out item stays out of the answers, also when a sample of them asks)
        _any_held_out(gallery, excluded)
        keep = _query_sample(len(excluded), max_queries, seed)
        test_ids, test_vecs, _ = gallery.scan(only=excluded if keep is None else [excluded[i] for i in keep], metadata=False)
        _any_held_out(gallery, test_ids)  # (all removed since they were listed)
        train_ids, train_vecs, _ = gallery.scan("train", metadata=False)
        y = gallery.labels_of(test_ids + train_ids, listed)
        y_test, y_train = y[: len(test_ids)], y[len(test_ids) :]
    else:
        test_ids, test_vecs, y_test = items.split("test")
        excluded = _any_held_out(gallery, test_ids)
        keep = _query_sample(len(test_ids), max_queries, seed)
        if keep is not None:
            test_ids, test_vecs, y_test = [test_ids[i] for i in keep], test_vecs[keep], y_test[keep]
        train_ids, train_vecs, y_train = items.split("train")
    n_held_out = len(excluded)
    if gallery.record.labelled and ((y_test < 0).any() or (y_train < 0).any()):
        raise StoreError(f"collection {gallery.name!r} holds items without a label: run `lookalike check --collection {gallery.name}`")
    if len(train_ids) < k:
        raise InputError(f"--k {k} is more than the {len(train_ids)} indexed items of {gallery.name!r}")
    wide = min(max(k, width or k), len(train_ids))
    t0 = time.perf_counter()
    rows = exact_sample(len(test_ids), len(train_ids), seed) if sample_exact else np.arange(len(test_ids))
    exact_nn, exact_d2 = exact_neighbours(test_vecs[rows], train_vecs, wide)
    exact_seconds = time.perf_counter() - t0
    if consume and items is not None:
        test_vecs = np.array(test_vecs)  # (a copy: the held-out rows alone outlive the read)
        train_vecs = items.vectors = np.zeros((0, test_vecs.shape[1]), test_vecs.dtype)
        trim_memory()
    t1 = time.perf_counter()
    store_nn, store_d1 = _store_ranking(gallery, test_vecs, wide, excluded, train_ids, distances=True)
    query_seconds = time.perf_counter() - t1
    timings = {"read": t0 - t_read, "store": query_seconds, "exact": exact_seconds}
    return HeldOut(
        test_ids,
        test_vecs,
        y_test,
        train_ids,
        train_vecs,
        y_train,
        k,
        store_nn,
        store_d1,
        rows,
        exact_nn,
        exact_d2,
        query_seconds,
        timings,
        n_held_out,
        excluded,
    )


def _any_held_out(gallery: Gallery, test_ids: list[str]) -> list[str]:
    if not test_ids:
        raise StoreError(f"collection {gallery.name!r} has no held-out items: ingest with --test-size N (or the official split)")
    return test_ids


def _query_sample(n_held_out: int, max_queries: int | None, seed: int) -> np.ndarray | None:
    """The rows of the held-out items that ask the store: None for all of them, else a seeded sample of ``max_queries``."""
    if max_queries is None or n_held_out <= max_queries:
        return None
    return np.sort(np.random.default_rng(seed).choice(n_held_out, max_queries, replace=False))


def _store_ranking(
    gallery: Gallery, queries: np.ndarray, k: int, held_out_ids: list[str], train_ids: list[str], distances: bool = False
) -> Any:
    """The store's ``k`` nearest indexed items of each query (none of ``held_out_ids``), as rows of ``train_ids`` (and,
    with ``distances``, the distance of each first answer)."""
    excluded = set(held_out_ids)
    step = max(1, RANK_CHUNK // max(k, 1))
    answers = [
        a
        for start in range(0, len(queries), step)
        for a in gallery.neighbours(queries[start : start + step], k, exclude=excluded, metadata=False)
    ]
    row = {id_: i for i, id_ in enumerate(train_ids)}
    if any(len(a) != k for a in answers):
        raise StoreError(
            f"collection {gallery.name!r} gave fewer than {k} neighbours for some items: run `lookalike check --collection {gallery.name}`"
        )
    try:
        ranked = np.array([[row[n.id] for n in a] for a in answers], dtype=int).reshape(len(answers), k)
    except KeyError as exc:
        raise StoreError(
            f"collection {gallery.name!r} answered with {exc}, an id it does not list: run `lookalike check --collection {gallery.name}`"
        ) from None
    return (ranked, np.array([a[0].distance for a in answers])) if distances else ranked


def evaluate(gallery: Gallery, *, k: int = 1, r_sample: int = R_SAMPLE, seed: int = 0) -> EvalReport:
    """k-NN (majority vote; 1-NN by default) accuracy of the held-out items against the indexed ones.

    The store is asked for each held-out item's nearest items with every held-out id excluded
    (ids and distances only: the fastest query Chroma has); the same queries are answered exactly
    over the vectors read back, which gives ``exact_accuracy`` and ``recall_at_1``. ``retrieval``
    holds precision@1/5/10, R-precision and MAP@R (store and exact); ``r_sample`` and ``seed``
    choose the queries of the R metrics when ranking R items for every query would be too long.
    """
    if r_sample < 1:
        raise InputError(f"--r-sample must be at least 1, got {r_sample}")
    started = time.perf_counter()
    if not gallery.record.labelled:
        return _evaluate_unlabelled(gallery, k, started)
    names = gallery.label_names
    h = held_out(gallery, k, width=max(PRECISION_KS), seed=seed, max_queries=STORE_QUERIES)
    y_test, y_train, store_nn, rows = h.y_test, h.y_train, h.store_nn, h.exact_rows
    n_labels = max(len(names), int(max(y_test.max(), y_train.max())) + 1)
    pred = h.predictions()
    exact_pred = h.predictions(exact=True)
    hit = recall_hits(h.test_vecs[rows], h.train_vecs, store_nn[rows, 0], h.exact_d2[:, 0])
    matrix = confusion(y_test, pred, n_labels)
    retrieval = _retrieval(gallery, h, names, r_sample, seed)
    test_ids, train_ids = h.test_ids, h.train_ids
    return EvalReport(
        collection=gallery.name,
        embedder=gallery.record.embedder.describe(),
        k=k,
        n_queries=len(test_ids),
        n_indexed=len(train_ids),
        accuracy=float((pred == y_test).mean()),
        exact_accuracy=float((exact_pred == y_test[rows]).mean()),
        recall_at_1=float(hit.mean()),
        per_class=per_class_accuracy(matrix, names),
        confusion=matrix.tolist(),
        label_names=names,
        queries_per_s=len(test_ids) / h.query_seconds if h.query_seconds > 0 else float("inf"),
        query_seconds=h.query_seconds,
        seconds=time.perf_counter() - started,
        accuracy_1nn=float((y_train[store_nn[:, 0]] == y_test).mean()),
        mistakes=[
            {"id": test_ids[i], "nearest_id": train_ids[store_nn[i, 0]], "true": int(y_test[i]), "predicted": int(pred[i])}
            for i in np.flatnonzero(pred != y_test)
        ],
        retrieval=retrieval,
        exact_queries=len(rows),
        accuracy_same_queries=float((pred[rows] == y_test[rows]).mean()) if h.sampled else None,
        timings=h.timings,
        n_held_out=h.n_held_out,
    )


def _evaluate_unlabelled(gallery: Gallery, k: int, started: float) -> EvalReport:
    """An unlabelled collection has no accuracy to measure: what remains is how well the store answers. Each
    held-out item's nearest indexed items through the store, against exact search (``recall_at_1``, and in
    ``retrieval`` the share of the exact ``k`` nearest the store returns: ``store_recall_at_k``)."""
    width = max(k, max(PRECISION_KS))
    h = held_out(gallery, k, width=width, max_queries=STORE_QUERIES)
    rows = h.exact_rows
    hit = recall_hits(h.test_vecs[rows], h.train_vecs, h.store_nn[rows, 0], h.exact_d2[:, 0])
    w = h.store_nn.shape[1]
    overlap = [len(set(a) & set(b)) / w for a, b in zip(h.store_nn[rows].tolist(), h.exact_nn.tolist())]
    nan = float("nan")
    return EvalReport(
        collection=gallery.name,
        embedder=gallery.record.embedder.describe(),
        k=k,
        n_queries=len(h.test_ids),
        n_indexed=len(h.train_ids),
        accuracy=nan,
        exact_accuracy=nan,
        recall_at_1=float(hit.mean()),
        per_class={},
        confusion=[],
        label_names=[],
        queries_per_s=len(h.test_ids) / h.query_seconds if h.query_seconds > 0 else float("inf"),
        query_seconds=h.query_seconds,
        seconds=time.perf_counter() - started,
        accuracy_1nn=nan,
        retrieval={"unlabelled": True, "store_recall_at_k": float(np.mean(overlap)), "recall_k": w},
        exact_queries=len(rows),
        timings=h.timings,
        n_held_out=h.n_held_out,
    )


def _retrieval(gallery: Gallery, h: HeldOut, names: list[str], r_sample: int, seed: int) -> dict[str, Any]:
    """precision@k from the answers already asked; R-precision and MAP@R from rankings R long.

    The store's cost ~50 ms a query at R ~ 6,000: every query when ``queries x R_max <= R_BUDGET``, else a seeded
    sample. Exact rankings (one matrix product) cover the queries exact search answered while they fit in
    ``EXACT_R_CELLS`` ranks, else the store's sample; the exact figures over the store's queries are given beside
    (``exact_same_queries``) whenever the two differ.
    """
    counts = np.bincount(h.y_train, minlength=int(max(h.y_test.max(), h.y_train.max())) + 1)
    r = counts[h.y_test]  # R of each query: the indexed items sharing its label
    everyone = np.arange(len(h.y_test))
    r_max = int(r.max())
    # the store's R queries: every query, or when exact search was sampled its sample (so the exact figures over the
    # same queries never need a ranking of every query), a seeded r_sample of them past R_BUDGET
    pool = h.exact_rows if h.sampled else everyone
    sample = pool
    n_sample = min(r_sample, max(R_MIN, R_RESULTS // max(r_max, 1)))
    if len(pool) * r_max > R_BUDGET and len(pool) > n_sample:
        sample = np.sort(pool[np.random.default_rng(seed).choice(len(pool), n_sample, replace=False)])
    exact_r = h.exact_rows if len(h.exact_rows) * r_max <= EXACT_R_CELLS else sample
    nothing = np.zeros((0, 0), int)
    # a held-out label with no indexed item has no R metrics; when no label has any, nothing to rank
    t0 = time.perf_counter()
    long_store = _store_ranking(gallery, h.test_vecs[sample], r_max, h.excluded, h.train_ids) if r_max else nothing
    t1 = time.perf_counter()
    long_exact = exact_ranking(h.test_vecs[exact_r], h.train_vecs, r_max) if r_max else nothing
    h.timings.update(r_store=t1 - t0, r_exact=time.perf_counter() - t1)

    def summary(short: np.ndarray, short_rows: np.ndarray, long: np.ndarray, long_rows: np.ndarray) -> dict[str, Any]:
        relevant = h.y_train[short[:, : max(PRECISION_KS)]] == h.y_test[short_rows, None]
        p_scores = retrieval_scores(relevant, np.zeros(len(short_rows), int), PRECISION_KS)
        p_scores = {key: v for key, v in p_scores.items() if key.startswith("precision")}
        if r_max:
            r_scores = retrieval_scores(h.y_train[long] == h.y_test[long_rows, None], r[long_rows], ())
        else:
            r_scores = {key: np.full(len(long_rows), np.nan) for key in ("r_precision", "map_at_r")}
        p_summary = summarise_retrieval(p_scores, h.y_test[short_rows], names)
        r_summary = summarise_retrieval({key: r_scores[key] for key in ("r_precision", "map_at_r")}, h.y_test[long_rows], names)
        p_per, r_per = p_summary.pop("per_class"), r_summary.pop("per_class")
        none = {"r_precision": float("nan"), "map_at_r": float("nan")}  # a label the (sampled) R queries did not meet
        per_class = {label: {**metrics, **r_per.get(label, none)} for label, metrics in p_per.items()}  # type: ignore[union-attr]
        return {**p_summary, **r_summary, "per_class": per_class}

    out: dict[str, Any] = {
        "store": summary(h.store_nn, everyone, long_store, sample),
        "exact": summary(h.exact_nn, h.exact_rows, long_exact, exact_r),
        "r_max": r_max,
        "r_queries_store": len(sample),
        "r_queries_exact": len(exact_r),
        "precision_queries_exact": len(h.exact_rows),
        "queries": len(everyone),
        "seed": seed,
    }
    if r_max and not np.array_equal(sample, exact_r):
        pos = np.minimum(np.searchsorted(exact_r, sample), len(exact_r) - 1)
        same_rows = long_exact[pos] if np.array_equal(exact_r[pos], sample) else exact_ranking(h.test_vecs[sample], h.train_vecs, r_max)
        same = retrieval_scores(h.y_train[same_rows] == h.y_test[sample, None], r[sample], ())
        out["exact_same_queries"] = {key: float(np.nanmean(same[key])) for key in ("r_precision", "map_at_r")}
    return out


def save_report(gallery: Gallery, report: EvalReport) -> dict[str, Any]:
    """Keep ``report`` with its collection (what ``GET /collections/NAME/evaluation`` answers), replacing the last one.

    The first ``SAVED_MISTAKES`` mistakes are kept, all are counted (``n_mistakes``); ``saved_at`` is UTC.
    Returns what was saved.
    """
    saved = report.to_dict()
    saved["n_mistakes"] = len(report.mistakes)
    saved["mistakes"] = saved["mistakes"][:SAVED_MISTAKES]
    return gallery.save_evaluation(saved)


def saved_report(gallery: Gallery) -> dict[str, Any] | None:
    """The last report :func:`save_report` kept with ``gallery``'s collection, or None."""
    return gallery.evaluation()


def save_confusion_picture(report: EvalReport, out: str | os.PathLike[str]) -> Path:
    """Write the confusion matrix of ``report`` as a PNG."""
    from lookalike.analysis.plots import confusion_figure, save_figure

    if report.retrieval.get("unlabelled"):
        raise InputError(f"collection {report.collection!r} is unlabelled: it has no confusion matrix (leave out --plot)")

    title = f"{report.k}-NN confusion, {report.collection} ({report.queries_asked()}, accuracy {report.accuracy:.4f})"
    return save_figure(confusion_figure(report.confusion, report.label_names, title), out)


def save_errors_picture(gallery: Gallery, report: EvalReport, out: str | os.PathLike[str], *, limit: int = 32) -> Path:
    """Write a gallery of misclassified held-out items, each beside its nearest indexed item ("true -> predicted")."""
    from lookalike.analysis.plots import pairs_figure, save_figure

    if report.retrieval.get("unlabelled"):
        raise InputError(f"collection {report.collection!r} is unlabelled: it has no misclassified items (leave out --errors)")

    shown = report.mistakes[:limit]
    pairs = []
    if shown:
        ids = [m["id"] for m in shown] + [m["nearest_id"] for m in shown]
        got_ids, _, metas = gallery.get(ids)
        by_id = dict(zip(got_ids, metas))
        images = gallery.images([by_id[i] for i in ids])
        for j, m in enumerate(shown):
            caption = f"{gallery.label_name(m['true'])} -> {gallery.label_name(m['predicted'])}"
            pairs.append((images[j], images[len(shown) + j], caption))
    title = f"{len(shown)} of {len(report.mistakes)} misclassified held-out items, {report.collection} (true -> predicted)"
    return save_figure(pairs_figure(pairs, title), out)
