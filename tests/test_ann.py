from __future__ import annotations

import numpy as np
import pytest

from lookalike.analysis import ann
from lookalike.analysis.audit import self_neighbours
from lookalike.errors import InputError


def test_the_graph_finds_nearly_every_exact_neighbour_measured_exactly() -> None:
    """Each row's neighbours leave the row itself out (an exact copy of it counts), come nearest first with their
    exact float64 distances, and hold nearly all of the exact ones."""
    pytest.importorskip("faiss")
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(20, 32))
    x = (centres[rng.integers(0, 20, 3000)] + 0.3 * rng.normal(size=(3000, 32))).astype(np.float32)
    x[7] = x[11]  # an exact copy
    nn, dist, short = ann.self_neighbours(x, 8, seed=1)
    exact_nn, exact_dist = self_neighbours(x, 8)
    assert nn.shape == dist.shape == (3000, 8) and len(short) == 0
    assert not (nn == np.arange(3000)[:, None]).any()
    assert nn[7, 0] == 11 and dist[7, 0] == 0.0 and nn[11, 0] == 7
    assert (np.diff(dist, axis=1) >= 0).all()
    rows = np.arange(3000)[:, None]
    want = np.sqrt(((x[nn].astype(np.float64) - x[rows].astype(np.float64)) ** 2).sum(-1))
    assert np.allclose(dist, want, rtol=0, atol=1e-12)
    recall = np.mean([len(set(a) & set(b)) / 8 for a, b in zip(nn.tolist(), exact_nn.tolist())])
    assert recall > 0.95, recall
    assert (dist >= exact_dist - 1e-9).all()  # (never nearer than exact search: the distances are true ones)
    assert np.mean(np.isclose(dist[:, 0], exact_dist[:, 0], rtol=0, atol=1e-9)) > 0.98  # (the nearest: mostly the exact one)
    again, _, _ = ann.self_neighbours(x, 8, seed=1)
    assert np.mean(again == nn) > 0.99  # (a graph built on two threads may differ a little from run to run)


def test_without_faiss_one_line_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_faiss(name: str, *args: object, **kw: object) -> object:
        if name == "faiss":
            raise ImportError("No module named 'faiss'")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_faiss)
    assert not ann.available()
    with pytest.raises(InputError, match=r"pip install faiss-cpu"):
        ann.self_neighbours(np.zeros((10, 2), np.float32), 3)
