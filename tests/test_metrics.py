"""The evaluation arithmetic, without a store."""

from __future__ import annotations

import numpy as np
import pytest

import lookalike.analysis.metrics as metrics
from lookalike.analysis.metrics import (
    confusion,
    duplicate_groups,
    exact_neighbours,
    exact_ranking,
    label_issue_scores,
    outlier_scores,
    per_class_accuracy,
    recall_hits,
    retrieval_scores,
    summarise_retrieval,
    vote,
)


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


def test_retrieval_scores_by_hand() -> None:
    """Musgrave et al.'s definitions on rankings worked out on paper."""
    relevant = np.array(
        [
            [1, 0, 1, 1, 0, 1],  # R=4: R-prec 3/4; MAP@R (1 + 2/3 + 3/4) / 4
            [0, 1, 1, 0, 0, 0],  # R=2: R-prec 1/2; MAP@R (0 + 1/2) / 2
            [1, 0, 0, 0, 0, 0],  # R=9, ranking longer than given: R-prec 1/9; MAP@R 1/9
            [0, 0, 0, 0, 0, 0],  # R=0: nothing to find
        ],
        bool,
    )
    got = retrieval_scores(relevant, np.array([4, 2, 9, 0]), ks=(1, 5))
    assert got["precision_at_1"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert got["precision_at_5"].tolist() == pytest.approx([3 / 5, 2 / 5, 1 / 5, 0.0])
    assert got["r_precision"][:3].tolist() == pytest.approx([3 / 4, 1 / 2, 1 / 9]) and np.isnan(got["r_precision"][3])
    assert got["map_at_r"][:3].tolist() == pytest.approx([(1 + 2 / 3 + 3 / 4) / 4, 0.25, 1 / 9]) and np.isnan(got["map_at_r"][3])
    summary = summarise_retrieval(got, np.array([0, 0, 1, 1]), ["a", "b"])
    assert summary["map_at_r"] == pytest.approx(((1 + 2 / 3 + 3 / 4) / 4 + 0.25 + 1 / 9) / 3)  # the R=0 query left out
    assert summary["per_class"]["b"]["r_precision"] == pytest.approx(1 / 9)
    assert summary["per_class"]["a"]["precision_at_1"] == 0.5


def _independent_r_metrics(queries: np.ndarray, q_labels: np.ndarray, refs: np.ndarray, r_labels: np.ndarray) -> tuple[float, float]:
    """R-precision and MAP@R with plain loops over a full sort (the test's own computation)."""
    rp, ap = [], []
    for q, lab in zip(queries, q_labels):
        order = np.argsort(((refs - q) ** 2).sum(1), kind="stable")
        r = int((r_labels == lab).sum())
        if r == 0:
            continue
        found, total = 0, 0.0
        for i in range(r):
            if r_labels[order[i]] == lab:
                found += 1
                total += found / (i + 1)
        rp.append(found / r)
        ap.append(total / r)
    return float(np.mean(rp)), float(np.mean(ap))


def test_retrieval_scores_match_an_independent_computation() -> None:
    rng = np.random.default_rng(3)
    refs = rng.normal(size=(300, 8)).astype(np.float32)
    r_labels = rng.integers(0, 4, 300)
    refs[:, 0] += r_labels  # some structure: labels matter, not perfectly
    queries = rng.normal(size=(40, 8)).astype(np.float32)
    q_labels = rng.integers(0, 5, 40)  # label 4: no reference
    queries[:, 0] += q_labels
    ranking = exact_ranking(queries, refs, 300)
    r = np.array([(r_labels == lab).sum() for lab in q_labels])
    got = summarise_retrieval(retrieval_scores(r_labels[ranking] == q_labels[:, None], r, ()), q_labels, [])
    assert (got["r_precision"], got["map_at_r"]) == pytest.approx(_independent_r_metrics(queries, q_labels, refs, r_labels))
    full = np.argsort(((refs[None] - queries[:, None]) ** 2).sum(-1), axis=1, kind="stable")
    assert (ranking[:, :50] == full[:, :50]).mean() > 0.99  # float32 ranking: only near-ties may swap


def test_label_issue_scores_vote_and_margin() -> None:
    own = np.array([0, 0, 1])
    labels = np.array([[0, 0, 1], [2, 1, 1], [1, 0, 0]])
    dists = np.array([[1.0, 1.0, 1.0], [0.5, 1.0, 2.0], [1.0, 2.0, 2.0]])  # nearest first
    score, suggested = label_issue_scores(own, labels, dists, 3, "vote")
    eps = np.median(dists) * 1e-2
    w = 1 / (dists + eps)
    assert score[0] == pytest.approx(w[0, 2] / w[0].sum()) and score[1] == pytest.approx(1.0)
    assert suggested.tolist()[:2] == [1, 2]  # item 1: label 2's single close neighbour outweighs label 1's two
    assert score[2] == pytest.approx(1 - w[2, 0] / w[2].sum()) and suggested[2] == 0
    m_score, m_suggested = label_issue_scores(own, labels, dists, 3, "margin")
    assert m_score[0] == pytest.approx(0.5) and m_score[2] == pytest.approx(1 / 3)
    assert m_score[1] == pytest.approx(2.0 / 2.5) and m_suggested[1] == 2  # no same label among k: counted at the k-th distance
    with pytest.raises(ValueError):
        label_issue_scores(own, labels, dists, 3, "nope")
    calm, own_label = label_issue_scores(np.array([2]), np.array([[2, 2]]), np.array([[1.0, 2.0]]), 3)
    assert calm[0] == 0.0 and own_label[0] == 2  # nothing disagrees: no other label suggested


def test_duplicate_groups_are_connected_components() -> None:
    groups = duplicate_groups(np.array([[5, 1], [1, 2], [7, 8], [2, 5], [9, 9]]), 10)
    assert [g.tolist() for g in groups] == [[1, 2, 5], [7, 8]]
    assert duplicate_groups(np.zeros((0, 2), int), 4) == []
    assert outlier_scores(np.array([[1.0, 3.0], [0.0, 0.0]])).tolist() == [2.0, 0.0]


def test_exact_search_in_small_blocks_gives_the_same_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """A million indexed items would make a block of 512 queries 2 GB of scores: blocks shrink to stay under SCORES_MB."""
    rng = np.random.default_rng(3)
    index, queries = rng.standard_normal((3000, 12)).astype(np.float32), rng.standard_normal((40, 12)).astype(np.float32)
    whole = metrics.exact_neighbours(queries, index, 5), metrics.exact_ranking(queries, index, 50)
    assert metrics._block(512, 3000) == 512 and metrics._block(512, 1_000_000) == 33
    monkeypatch.setattr(metrics, "SCORES_MB", 0.1)  # 4 queries a block here
    assert metrics._block(512, 3000) == 4
    idx, d2 = metrics.exact_neighbours(queries, index, 5)
    assert np.array_equal(idx, whole[0][0]) and np.allclose(d2, whole[0][1])
    assert np.array_equal(metrics.exact_ranking(queries, index, 50), whole[1])
    assert np.allclose(metrics.squared_norms(index, rows=7), (index.astype(np.float64) ** 2).sum(1))
