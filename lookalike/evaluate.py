"""Evaluate: held-out k-NN accuracy through the store, audited against exact search.

Every held-out (``split="test"``) item queries the indexed (``split="train"``) items through Chroma.
The same queries are then answered by brute force over the indexed vectors read back from the
store, which gives ``recall_at_1`` (how often the store's first answer is an exact nearest
neighbour; ties at equal distance count) and ``exact_accuracy`` (the accuracy exact search gets).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.errors import InputError, StoreError
from lookalike.gallery import Gallery
from lookalike.metrics import confusion, exact_neighbours, per_class_accuracy, recall_hits, vote
from lookalike.util import json_safe

log = logging.getLogger(__name__)

SAVED_MISTAKES = 1000  # mistakes kept with a saved report (all are counted)


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(gallery: Gallery, *, k: int = 1) -> EvalReport:
    """k-NN (majority vote; 1-NN by default) accuracy of the held-out items against the indexed ones.

    The store is asked for each held-out item's ``k`` nearest items with every held-out id excluded
    (ids and distances only: the fastest query Chroma has); the same queries are answered exactly
    over the vectors read back, which gives ``exact_accuracy`` and ``recall_at_1``.
    """
    if k < 1:
        raise InputError(f"--k must be at least 1, got {k}")
    started = time.perf_counter()
    names = gallery.label_names
    test_ids, test_vecs, test_metas = gallery.scan("test")
    if not test_ids:
        raise StoreError(f"collection {gallery.name!r} has no held-out items: ingest with --test-size N (or the official split)")
    train_ids, train_vecs, train_metas = gallery.scan("train")
    if len(train_ids) < k:
        raise InputError(f"--k {k} is more than the {len(train_ids)} indexed items of {gallery.name!r}")
    y_test = np.array([int(m["label"]) for m in test_metas])
    y_train = np.array([int(m["label"]) for m in train_metas])
    n_labels = max(len(names), int(max(y_test.max(), y_train.max())) + 1)

    t0 = time.perf_counter()
    answers = gallery.neighbours(test_vecs, k, exclude=set(test_ids), metadata=False)
    query_seconds = time.perf_counter() - t0
    row = {id_: i for i, id_ in enumerate(train_ids)}
    if any(len(a) != k for a in answers):
        raise StoreError(
            f"collection {gallery.name!r} gave fewer than {k} neighbours for some items: run `lookalike check --collection {gallery.name}`"
        )
    try:
        store_nn = np.array([[row[n.id] for n in a] for a in answers])
    except KeyError as exc:
        raise StoreError(
            f"collection {gallery.name!r} answered with {exc}, an id it does not list: run `lookalike check --collection {gallery.name}`"
        ) from None
    exact_nn, exact_d2 = exact_neighbours(test_vecs, train_vecs, k)

    pred = vote(y_train[store_nn])
    exact_pred = vote(y_train[exact_nn])
    hit = recall_hits(test_vecs, train_vecs, store_nn[:, 0], exact_d2[:, 0])
    matrix = confusion(y_test, pred, n_labels)
    return EvalReport(
        collection=gallery.name,
        embedder=gallery.record.embedder.describe(),
        k=k,
        n_queries=len(test_ids),
        n_indexed=len(train_ids),
        accuracy=float((pred == y_test).mean()),
        exact_accuracy=float((exact_pred == y_test).mean()),
        recall_at_1=float(hit.mean()),
        per_class=per_class_accuracy(matrix, names),
        confusion=matrix.tolist(),
        label_names=names,
        queries_per_s=len(test_ids) / query_seconds if query_seconds > 0 else float("inf"),
        query_seconds=query_seconds,
        seconds=time.perf_counter() - started,
        accuracy_1nn=float((y_train[store_nn[:, 0]] == y_test).mean()),
        mistakes=[
            {"id": test_ids[i], "nearest_id": train_ids[store_nn[i, 0]], "true": int(y_test[i]), "predicted": int(pred[i])}
            for i in np.flatnonzero(pred != y_test)
        ],
    )


def save_report(gallery: Gallery, report: EvalReport) -> dict[str, Any]:
    """Keep ``report`` with its collection (what ``GET /collections/NAME/evaluation`` answers), replacing the last one.

    The first ``SAVED_MISTAKES`` mistakes are kept, all are counted (``n_mistakes``); ``saved_at`` is UTC.
    Returns what was saved.
    """
    saved = report.to_dict()
    saved["n_mistakes"] = len(report.mistakes)
    saved["mistakes"] = saved["mistakes"][:SAVED_MISTAKES]
    saved["saved_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    saved = json_safe(saved)
    gallery.save_evaluation(saved)
    return saved


def saved_report(gallery: Gallery) -> dict[str, Any] | None:
    """The last report :func:`save_report` kept with ``gallery``'s collection, or None."""
    return gallery.evaluation()


def save_confusion_picture(report: EvalReport, out: str | os.PathLike[str]) -> Path:
    """Write the confusion matrix of ``report`` as a PNG."""
    from lookalike.plots import confusion_figure, save_figure

    title = f"{report.k}-NN confusion, {report.collection} ({report.n_queries} held out, accuracy {report.accuracy:.4f})"
    return save_figure(confusion_figure(report.confusion, report.label_names, title), out)


def save_errors_picture(gallery: Gallery, report: EvalReport, out: str | os.PathLike[str], *, limit: int = 32) -> Path:
    """Write a gallery of misclassified held-out items, each beside its nearest indexed item ("true -> predicted")."""
    from lookalike.plots import pairs_figure, save_figure

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
