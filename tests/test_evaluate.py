from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lookalike.errors import InputError, StoreError
from lookalike.evaluate import evaluate, exact_neighbours, vote
from lookalike.ingest import ingest
from lookalike.store import Store


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


def test_separable_data_scores_perfectly(tiny_npz: Path, db: str) -> None:
    ingest("mnist", source=str(tiny_npz), embedder="pixels", db=db)
    r = evaluate(db=db)
    assert (r.n_queries, r.n_indexed, r.k) == (50, 200, 1)
    assert r.accuracy == r.exact_accuracy == r.recall_at_1 == 1.0
    assert np.trace(np.array(r.confusion)) == 50 and np.array(r.confusion).sum() == 50
    assert set(r.per_class.values()) == {1.0} and len(r.per_class) == 10
    assert r.queries_per_s > 0


def test_accuracy_matches_sklearn_on_noisy_data(tmp_path: Path, db: str) -> None:
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(7)
    x = rng.integers(0, 256, (400, 28, 28)).astype(np.uint8)  # labels unrelated to pixels: ~chance accuracy
    y = rng.integers(0, 10, 400).astype(np.uint8)
    path = tmp_path / "noise.npz"
    np.savez(path, x_train=x[:300], y_train=y[:300], x_test=x[300:], y_test=y[300:])
    ingest("mnist", source=str(path), embedder="pixels", db=db)
    for k in (1, 5):
        r = evaluate(k=k, db=db)
        flat = x.reshape(400, -1) / 255.0
        ref = KNeighborsClassifier(n_neighbors=k, algorithm="brute").fit(flat[:300], y[:300])
        assert r.exact_accuracy == pytest.approx(float((ref.predict(flat[300:]) == y[300:]).mean()), abs=0.021)
        assert r.recall_at_1 >= 0.99 and abs(r.accuracy - r.exact_accuracy) <= 0.02
        assert 0.0 < r.accuracy < 0.4
        assert r.accuracy_1nn == evaluate(k=1, db=db).accuracy


def test_bad_evaluations(tiny_npz: Path, db: str) -> None:
    with pytest.raises(StoreError):
        evaluate(db=db)  # no store yet
    ingest("mnist", source=str(tiny_npz), embedder="pixels", db=db)
    with pytest.raises(InputError, match="--k"):
        evaluate(k=0, db=db)
    with pytest.raises(InputError, match="more than"):
        evaluate(k=500, db=db)
    col = Store(db).open()
    Store(db).create("onlytrain", col.record).add(["a:train:1"], np.zeros((1, 784), np.float32),
                                                  [{"label": 1, "label_name": "1", "split": "train"}])  # fmt: skip
    with pytest.raises(StoreError, match="no held-out"):
        evaluate(collection="onlytrain", db=db)
