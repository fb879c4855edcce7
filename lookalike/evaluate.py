"""Evaluate: held-out k-NN accuracy through the store, audited against exact search.

Every held-out (``split="test"``) item queries the indexed (``split="train"``) items through Chroma.
The same queries are then answered by brute force over the indexed vectors read back from the
store, which gives ``recall_at_1`` (how often the store's first answer is an exact nearest
neighbour; ties at equal distance count) and ``exact_accuracy`` (the accuracy exact search gets).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from lookalike.embedder import EmbedderSpec
from lookalike.errors import InputError, StoreError
from lookalike.store import Store

log = logging.getLogger(__name__)

TIE_RTOL = 1e-5  # relative tolerance on squared distance for a tie in the recall audit


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(*, k: int = 1, collection: str | None = None, db: str | None = None) -> EvalReport:
    """k-NN (majority vote; 1-NN by default) accuracy of the held-out items against the indexed ones."""
    if k < 1:
        raise InputError(f"--k must be at least 1, got {k}")
    started = time.perf_counter()
    col = Store(db).open(collection)
    names = list(col.record.get("label_names", []))
    test_ids, test_vecs, test_metas = col.scan({"split": "test"})
    if not test_ids:
        raise StoreError(f"collection {col.name!r} has no held-out items: ingest with --test-size N (or the official split)")
    train_ids, train_vecs, train_metas = col.scan({"split": "train"})
    if len(train_ids) < k:
        raise InputError(f"--k {k} is more than the {len(train_ids)} indexed items of {col.name!r}")
    y_test = np.array([int(m["label"]) for m in test_metas])
    y_train = np.array([int(m["label"]) for m in train_metas])
    n_labels = max(len(names), int(max(y_test.max(), y_train.max())) + 1)

    t0 = time.perf_counter()
    answers = col.query(test_vecs, k, where={"split": "train"})
    query_seconds = time.perf_counter() - t0
    row = {id_: i for i, id_ in enumerate(train_ids)}
    store_nn = np.array([[row[n.id] for n in a] for a in answers])
    exact_nn, exact_d2 = exact_neighbours(test_vecs, train_vecs, k)

    pred = vote(y_train[store_nn])
    exact_pred = vote(y_train[exact_nn])
    store_d2 = ((test_vecs - train_vecs[store_nn[:, 0]]).astype(np.float64) ** 2).sum(1)
    hit = store_d2 <= exact_d2[:, 0] * (1 + TIE_RTOL) + 1e-9

    confusion = np.zeros((n_labels, n_labels), dtype=int)
    np.add.at(confusion, (y_test, pred), 1)
    per_class = {}
    for lab in range(n_labels):
        total = confusion[lab].sum()
        if total:
            per_class[names[lab] if lab < len(names) else str(lab)] = float(confusion[lab, lab] / total)
    spec = col.record.get("embedder")
    return EvalReport(
        collection=col.name,
        embedder=EmbedderSpec.from_dict(spec).describe() if spec else "?",
        k=k,
        n_queries=len(test_ids),
        n_indexed=len(train_ids),
        accuracy=float((pred == y_test).mean()),
        exact_accuracy=float((exact_pred == y_test).mean()),
        recall_at_1=float(hit.mean()),
        per_class=per_class,
        confusion=confusion.tolist(),
        label_names=names,
        queries_per_s=len(test_ids) / query_seconds if query_seconds > 0 else float("inf"),
        query_seconds=query_seconds,
        seconds=time.perf_counter() - started,
    )


def exact_neighbours(queries: np.ndarray, index: np.ndarray, k: int, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force k nearest rows of ``index`` (n, d) for each query (m, d): (indices, squared distances), (m, k)."""
    index64 = index.astype(np.float64)
    norms = (index64**2).sum(1)
    idx = np.empty((len(queries), k), dtype=int)
    d2 = np.empty((len(queries), k))
    for start in range(0, len(queries), chunk):
        q = queries[start : start + chunk].astype(np.float64)
        dist = norms[None, :] - 2.0 * q @ index64.T + (q**2).sum(1)[:, None]
        part = np.argpartition(dist, k - 1, axis=1)[:, :k] if k < dist.shape[1] else np.tile(np.arange(dist.shape[1]), (len(q), 1))
        pd = np.take_along_axis(dist, part, axis=1)
        order = np.argsort(pd, axis=1, kind="stable")
        idx[start : start + len(q)] = np.take_along_axis(part, order, axis=1)
        d2[start : start + len(q)] = np.maximum(np.take_along_axis(pd, order, axis=1), 0.0)
    return idx, d2


def vote(neighbour_labels: np.ndarray) -> np.ndarray:
    """Majority label per row of (m, k) labels, nearest first; a tie goes to the label seen first."""
    out = np.empty(len(neighbour_labels), dtype=int)
    for i, labels in enumerate(neighbour_labels):
        values, first, counts = np.unique(labels, return_index=True, return_counts=True)
        best = counts == counts.max()
        out[i] = values[best][np.argmin(first[best])]
    return out
