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
from pathlib import Path
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from lookalike.embedder import EmbedderSpec
from lookalike.errors import InputError, StoreError
from lookalike.store import Neighbor, Store, VectorCollection

log = logging.getLogger(__name__)

TIE_RTOL = 1e-5  # relative tolerance on squared distance for a tie in the recall audit
EXTRA = 16  # extra neighbours asked for, so that held-out ones can be dropped without a where filter


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
    answers = query_indexed(col, test_vecs, k, set(train_ids))
    query_seconds = time.perf_counter() - t0
    row = {id_: i for i, id_ in enumerate(train_ids)}
    store_nn = np.array([[row[n.id] for n in a] for a in answers])
    exact_nn, exact_d2 = exact_neighbours(test_vecs, train_vecs, k)

    pred = vote(y_train[store_nn])
    exact_pred = vote(y_train[exact_nn])
    store_d2 = ((test_vecs.astype(np.float64) - train_vecs[store_nn[:, 0]]) ** 2).sum(1)
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
        accuracy_1nn=float((y_train[store_nn[:, 0]] == y_test).mean()),
        mistakes=[
            {"id": test_ids[i], "nearest_id": train_ids[store_nn[i, 0]], "true": int(y_test[i]), "predicted": int(pred[i])}
            for i in np.flatnonzero(pred != y_test)
        ],
    )


def query_indexed(col: VectorCollection, vectors: np.ndarray, k: int, indexed: set[str], margin: int = EXTRA) -> list[list[Neighbor]]:
    """The ``k`` nearest indexed items (ids in ``indexed``) to each vector, through the store.

    A ``where`` filter makes a Chroma query 10-20x slower and reading metadata back costs a third of
    an unfiltered query, so the collection is asked unfiltered, ids and distances only, for
    ``k + margin`` neighbours and the held-out ones are dropped; the first ``k`` indexed items
    among them are the answer (the same ones a filtered query gives). Rows left with fewer than
    ``k`` are asked again with the filter.
    """
    rows = col.query(vectors, k + margin, metadata=False)
    answers = [[n for n in a if n.id in indexed][:k] for a in rows]
    short = [i for i, a in enumerate(answers) if len(a) < k]
    if short:
        log.info("%d queries had fewer than %d indexed items in the first %d: asking with a filter", len(short), k, k + margin)
        for i, a in zip(short, col.query(vectors[short], k, where={"split": "train"})):
            answers[i] = a
    return answers


def exact_neighbours(queries: np.ndarray, index: np.ndarray, k: int, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force k nearest rows of ``index`` (n, d) for each query (m, d): (indices, squared distances), (m, k).

    Candidates (``k + 8``) come from a float32 matrix product; they are re-ranked with float64
    distances, so float32 rounding cannot reorder near-ties among them.
    """
    n = len(index)
    cand = min(k + 8, n)
    index32 = np.ascontiguousarray(index, dtype=np.float32)
    norms = (index32.astype(np.float64) ** 2).sum(1).astype(np.float32)
    idx = np.empty((len(queries), k), dtype=int)
    d2 = np.empty((len(queries), k))
    for start in range(0, len(queries), chunk):
        q = np.asarray(queries[start : start + chunk], dtype=np.float32)
        approx = (q * np.float32(-2.0)) @ index32.T
        approx += norms  # |x|^2 - 2 q.x ranks like |q - x|^2
        part = np.empty((len(q), cand), dtype=int)
        rows = np.arange(len(q))
        for j in range(cand):  # a few argmins beat argpartition over the whole row
            part[:, j] = approx.argmin(axis=1)
            approx[rows, part[:, j]] = np.inf
        diff = index32[part].astype(np.float64) - q.astype(np.float64)[:, None, :]
        exact = (diff**2).sum(-1)
        order = np.argsort(exact, axis=1, kind="stable")[:, :k]
        idx[start : start + len(q)] = np.take_along_axis(part, order, axis=1)
        d2[start : start + len(q)] = np.take_along_axis(exact, order, axis=1)
    return idx, d2


def vote(neighbour_labels: np.ndarray) -> np.ndarray:
    """Majority label per row of (m, k) labels, nearest first; a tie goes to the label seen first."""
    out = np.empty(len(neighbour_labels), dtype=int)
    for i, labels in enumerate(neighbour_labels):
        values, first, counts = np.unique(labels, return_index=True, return_counts=True)
        best = counts == counts.max()
        out[i] = values[best][np.argmin(first[best])]
    return out


def _name(names: list[str], label: int) -> str:
    return names[label] if label < len(names) else str(label)


def save_confusion_picture(report: EvalReport, out: str | os.PathLike[str]) -> Path:
    """Write the confusion matrix of ``report`` as a PNG."""
    from lookalike.plots import confusion_figure, save_figure

    title = f"{report.k}-NN confusion, {report.collection} ({report.n_queries} held out, accuracy {report.accuracy:.4f})"
    return save_figure(confusion_figure(report.confusion, report.label_names, title), out)


def save_errors_picture(report: EvalReport, out: str | os.PathLike[str], *, limit: int = 32, db: str | None = None) -> Path:
    """Write a gallery of misclassified held-out items, each beside its nearest indexed item ("true -> predicted")."""
    from lookalike.datasets import load_images_by_metadata
    from lookalike.plots import pairs_figure, save_figure

    col = Store(db).open(report.collection)
    shown = report.mistakes[:limit]
    pairs = []
    if shown:
        ids = [m["id"] for m in shown] + [m["nearest_id"] for m in shown]
        got_ids, _, metas = col.get(ids)
        by_id = dict(zip(got_ids, metas))
        images = load_images_by_metadata(col.record["protocol"], [by_id[i] for i in ids])
        names = report.label_names
        for j, m in enumerate(shown):
            caption = f"{_name(names, m['true'])} -> {_name(names, m['predicted'])}"
            pairs.append((images[j], images[len(shown) + j], caption))
    title = (f"{len(shown)} of {len(report.mistakes)} misclassified held-out items, {report.collection} "
             f"(true -> predicted)")  # fmt: skip
    return save_figure(pairs_figure(pairs, title), out)
