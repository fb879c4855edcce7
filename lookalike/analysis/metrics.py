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
SCORES_MB = 256  # the most memory a block of query x index scores takes (a million indexed items: 64 queries a block)


def _block(chunk: int, n: int) -> int:
    """Queries per block: at most ``chunk``, and fewer when ``n`` indexed items would pass ``SCORES_MB`` of scores."""
    return max(1, min(chunk, int(SCORES_MB * 2**20 // (8 * max(n, 1)))))


def squared_norms(x: np.ndarray, rows: int = 8192) -> np.ndarray:
    """``|x_i|^2`` of each row, summed in float64 a block of rows at a time (no float64 copy of all of ``x``; a block
    of 784-d rows is 51 MB: blocks of 65,536 took 411 MB, the top of evaluate's memory at a million items)."""
    out = np.empty(len(x))
    for start in range(0, len(x), rows):
        block = np.asarray(x[start : start + rows], np.float64)
        out[start : start + rows] = np.einsum("ij,ij->i", block, block)
    return out


def exact_neighbours(queries: np.ndarray, index: np.ndarray, k: int, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force k nearest rows of ``index`` (n, d) for each query (m, d): (indices, squared distances), (m, k).

    Candidates (``k + 8``) come from a float32 matrix product; they are re-ranked with float64
    distances, so float32 rounding cannot reorder near-ties among them.
    """
    n = len(index)
    k = min(k, n)
    cand = min(k + 8, n)
    index32 = np.ascontiguousarray(index, dtype=np.float32)
    norms = squared_norms(index32).astype(np.float32)
    idx = np.empty((len(queries), k), dtype=int)
    d2 = np.empty((len(queries), k))
    chunk = _block(chunk, n)
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
    got = ((np.asarray(queries, np.float64) - np.asarray(index[first], np.float64)) ** 2).sum(1)  # (not a float64 copy of all)
    return got <= exact_d2 * (1 + rtol) + 1e-9


# -- retrieval metrics (Musgrave, Belongie and Lim, "A Metric Learning Reality Check", 2020, section 3.2) ---------


def exact_ranking(queries: np.ndarray, index: np.ndarray, k: int, chunk: int = 256) -> np.ndarray:
    """Indices ``(m, k)`` of the ``k`` nearest rows of ``index`` for each query, nearest first (brute force).

    For long rankings (R-precision and MAP@R rank thousands of items): rows are ranked by float32
    ``|x|^2 - 2 q.x``, so items whose distances differ by less than float32's rounding may swap.
    """
    n = len(index)
    k = min(k, n)
    index32 = np.ascontiguousarray(index, dtype=np.float32)
    norms = squared_norms(index32).astype(np.float32)
    out = np.empty((len(queries), k), dtype=int)
    chunk = _block(chunk, n)
    for start in range(0, len(queries), chunk):
        q = np.asarray(queries[start : start + chunk], dtype=np.float32)
        score = (q * np.float32(-2.0)) @ index32.T
        score += norms
        part = np.argpartition(score, k - 1, axis=1)[:, :k] if k < n else np.tile(np.arange(n), (len(q), 1))
        order = np.argsort(np.take_along_axis(score, part, axis=1), axis=1, kind="stable")
        out[start : start + len(q)] = np.take_along_axis(part, order, axis=1)
    return out


def retrieval_scores(relevant: np.ndarray, r: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, np.ndarray]:
    """Per-query retrieval metrics from ranked relevance.

    ``relevant`` ``(m, K)``: whether each query's i-th retrieved item has the query's label (nearest
    first; for the R metrics a ranking shorter than R counts its missing places as not relevant,
    precision@k of a ranking shorter than k is over the places it has). ``r`` ``(m,)``:
    how many references share the query's label (R). Returns per-query arrays: ``precision_at_k``
    for each k (same-label share of the first k), ``r_precision`` (same-label share of the first R)
    and ``map_at_r`` (``1/R * sum_{i<=R} P(i) * rel(i)``, ``P(i)`` the precision at i). The R
    metrics are NaN where R = 0 (no reference to find).
    """
    relevant = np.asarray(relevant, dtype=bool)
    r = np.asarray(r, dtype=int)
    m, width = relevant.shape
    out: dict[str, np.ndarray] = {}
    for k in ks:  # over the first k places (all of them when the ranking is shorter: fewer items than k)
        out[f"precision_at_{k}"] = relevant[:, :k].sum(1) / max(1, min(k, width))
    need = int(r.max()) if m else 0
    if width < need:  # places past the ranking are not relevant
        relevant = np.concatenate([relevant, np.zeros((m, need - width), dtype=bool)], axis=1)
    hits = np.cumsum(relevant[:, :need], axis=1)  # same-label items among the first i
    ranks = np.arange(1, need + 1)
    within = ranks[None, :] <= r[:, None]  # the first R places of each query
    r_safe = np.maximum(r, 1)
    r_precision = hits[np.arange(m), np.maximum(r - 1, 0)] / r_safe if need else np.zeros(m)
    map_at_r = ((hits / ranks) * relevant[:, :need] * within).sum(1) / r_safe
    none = r == 0
    out["r_precision"] = np.where(none, np.nan, r_precision)
    out["map_at_r"] = np.where(none, np.nan, map_at_r)
    return out


def summarise_retrieval(scores: dict[str, np.ndarray], labels: np.ndarray, label_names: Sequence[str]) -> dict[str, object]:
    """Means of :func:`retrieval_scores` overall and per label (NaN rows left out), keyed by metric and label name."""
    labels = np.asarray(labels, dtype=int)

    def mean(values: np.ndarray) -> float:
        values = values[~np.isnan(values)]
        return float(values.mean()) if len(values) else float("nan")

    overall: dict[str, object] = {name: mean(values) for name, values in scores.items()}
    overall["per_class"] = {
        label_name(label_names, int(lab)): {name: mean(values[labels == lab]) for name, values in scores.items()}
        for lab in np.unique(labels)
    }
    return overall


# -- audit: label issues, near-duplicates, outliers ---------------------------------------------------------------


def label_issue_scores(
    own: np.ndarray, neighbour_labels: np.ndarray, neighbour_distances: np.ndarray, n_labels: int, method: str = "vote"
) -> tuple[np.ndarray, np.ndarray]:
    """How strongly each item's neighbours (itself excluded) contradict its label, and the label they suggest.

    ``own`` ``(n,)``, ``neighbour_labels`` / ``neighbour_distances`` ``(n, k)`` nearest first. Scores
    in [0, 1], higher = more suspicious; the suggestion is the best-supported label other than the
    item's own (its own when no neighbour carries another).

    - ``vote``: a distance-weighted k-NN vote (weight ``1 / (d + eps)``, eps a hundredth of the
      median neighbour distance): the share of the weight that goes to other labels.
    - ``margin``: ``d_same / (d_same + d_other)``, the nearest same-label against the nearest
      other-label neighbour (a label absent from the k counts at the k-th distance).
    """
    own = np.asarray(own, dtype=int)
    lab = np.asarray(neighbour_labels, dtype=int)
    d = np.asarray(neighbour_distances, dtype=np.float64)
    n, k = lab.shape
    eps = max(float(np.median(d)) * 1e-2, 1e-12) if d.size else 1e-12
    w = 1.0 / (d + eps)
    weight = np.zeros((n, n_labels))
    np.add.at(weight, (np.repeat(np.arange(n), k), lab.ravel()), w.ravel())
    others = weight.copy()
    others[np.arange(n), own] = -1.0
    suggested = np.where(others.max(1) > 0, others.argmax(1), own)  # no other label among the neighbours: its own
    if method == "vote":
        total = weight.sum(1)
        score = 1.0 - weight[np.arange(n), own] / np.where(total > 0, total, 1.0)
    elif method == "margin":
        same = lab == own[:, None]
        far = d[:, -1] if k else np.zeros(n)
        d_same = np.where(same.any(1), np.where(same, d, np.inf).min(1), far)
        d_other = np.where((~same).any(1), np.where(~same, d, np.inf).min(1), far)
        total = d_same + d_other
        score = np.where(total > 0, d_same / np.where(total > 0, total, 1.0), 0.5)
        nearest_other = np.where(~same, lab, -1)[np.arange(n), np.argmax(~same, axis=1)]
        suggested = np.where((~same).any(1), nearest_other, suggested)
    else:
        raise ValueError(f"unknown label-issue method {method!r}: vote or margin")
    return score, suggested


def duplicate_groups(pairs: np.ndarray, n: int) -> list[np.ndarray]:
    """Connected components (two or more items) of the graph whose edges are ``pairs`` ``(p, 2)`` over ``n`` items.

    Each group's item indices ascending; groups ordered by their first item.
    """
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    for a, b in np.asarray(pairs, dtype=int).reshape(-1, 2):
        ra, rb = root(int(a)), root(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    members: dict[int, list[int]] = {}
    for i in np.unique(np.asarray(pairs, dtype=int)):
        members.setdefault(root(int(i)), []).append(int(i))
    return [np.array(sorted(g)) for _, g in sorted(members.items()) if len(g) > 1]


def outlier_scores(neighbour_distances: np.ndarray) -> np.ndarray:
    """Mean distance to the k nearest neighbours (itself excluded): large = low local density."""
    return np.asarray(neighbour_distances, dtype=np.float64).mean(1)
