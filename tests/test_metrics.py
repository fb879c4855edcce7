"""The evaluation arithmetic, without a store."""

from __future__ import annotations

import numpy as np
import pytest

from lookalike.metrics import confusion, exact_neighbours, per_class_accuracy, recall_hits, vote


def test_vote_majority_and_ties() -> None:
    assert vote(np.array([[3, 1, 1], [2, 5, 5], [4, 7, 9]])).tolist() == [1, 5, 4]
    assert vote(np.array([[6, 8, 8, 6], [2, 3, 3, 2]])).tolist() == [6, 2]  # tie: the nearer label wins


def test_exact_neighbours_matches_a_loop() -> None:
    rng = np.random.default_rng(0)
    index, queries = rng.random((300, 16), dtype=np.float32), rng.random((40, 16), dtype=np.float32)
    idx, d2 = exact_neighbours(queries, index, 3, chunk=7)
    for q, row, drow in zip(queries, idx, d2):
        full = ((index - q) ** 2).sum(1)
        assert row.tolist() == np.argsort(full)[:3].tolist()
        assert np.allclose(drow, np.sort(full)[:3], rtol=1e-5)


def test_exact_neighbours_reranks_near_ties_in_float64() -> None:
    base = np.ones((1, 4), np.float32) * 1000
    index = np.vstack([base + np.float32(0.0005), base])  # row 1 is the exact match, float32 matmul cannot tell
    idx, d2 = exact_neighbours(base, index, 1)
    assert idx[0, 0] == 1 and d2[0, 0] == 0.0


def test_confusion_and_per_class() -> None:
    m = confusion(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 0, 2]), 4)
    assert m.tolist() == [[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]]
    assert per_class_accuracy(m, ["a", "b", "c"]) == {"a": 0.5, "b": 1.0, "c": pytest.approx(2 / 3)}  # label 3 absent, unnamed


def test_recall_hits_counts_ties_as_hits() -> None:
    index = np.array([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [5.0, 5.0]])
    queries = np.array([[0.0, 0.1], [0.0, 0.0], [3.0, 3.0]])
    _, d2 = exact_neighbours(queries, index, 1)
    hits = recall_hits(queries, index, np.array([0, 0, 0]), d2[:, 0])
    assert hits.tolist() == [True, True, False]  # row 2's nearest is [5, 5]
    tie = recall_hits(np.array([[0.0, 0.0]]), index, np.array([2]), np.array([1.0]))  # [-1, 0] is as near as [1, 0]
    assert tie.tolist() == [True]
