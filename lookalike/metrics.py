"""Evaluation arithmetic as pure functions over arrays: no store, no model.

``exact_neighbours`` is brute-force k-NN, ``vote`` the k-NN majority label, ``confusion`` and
``per_class_accuracy`` the usual tables, and ``recall_hits`` says, per query, whether an index's
first answer is an exact nearest neighbour (a tie at equal distance counts).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lookalike.util import label_name

TIE_RTOL = 1e-5  # relative tolerance on squared distance for a tie in the recall audit


def exact_neighbours(queries: np.ndarray, index: np.ndarray, k: int, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force k nearest rows of ``index`` (n, d) for each query (m, d): (indices, squared distances), (m, k).

    Candidates (``k + 8``) come from a float32 matrix product; they are re-ranked with float64
    distances, so float32 rounding cannot reorder near-ties among them.
    """
    n = len(index)
    k = min(k, n)
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


def confusion(true: np.ndarray, predicted: np.ndarray, n_labels: int) -> np.ndarray:
    """``(n_labels, n_labels)`` counts: row = true label, column = predicted label."""
    m = np.zeros((n_labels, n_labels), dtype=int)
    np.add.at(m, (np.asarray(true, int), np.asarray(predicted, int)), 1)
    return m


def per_class_accuracy(matrix: np.ndarray, label_names: Sequence[str]) -> dict[str, float]:
    """Share of each true label predicted right, keyed by label name (labels with no item left out)."""
    out = {}
    for lab in range(len(matrix)):
        total = matrix[lab].sum()
        if total:
            out[label_name(label_names, lab)] = float(matrix[lab, lab] / total)
    return out


def recall_hits(queries: np.ndarray, index: np.ndarray, first: np.ndarray, exact_d2: np.ndarray, rtol: float = TIE_RTOL) -> np.ndarray:
    """Per query, whether row ``first[i]`` of ``index`` is as near as the exact nearest (squared distance ``exact_d2[i]``)."""
    got = ((np.asarray(queries, np.float64) - np.asarray(index, np.float64)[first]) ** 2).sum(1)
    return got <= exact_d2 * (1 + rtol) + 1e-9
