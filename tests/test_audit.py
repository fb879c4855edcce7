"""lookalike audit: label issues, near-duplicates, leaks and outliers on constructed sets where the answer is known."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from lookalike.analysis.audit import audit, self_neighbours
from lookalike.analysis.evaluate import evaluate
from lookalike.core.gallery import Gallery
from lookalike.core.ingest import ingest
from lookalike.errors import InputError
from lookalike.frontends.cli import app
from lookalike.models.embedder import PixelEmbedder

from .conftest import make_digits, one_line_error, write_npz


def test_self_neighbours_exclude_the_item_but_keep_its_copies() -> None:
    rng = np.random.default_rng(0)
    v = rng.normal(size=(50, 4)).astype(np.float32)
    v[10] = v[20]  # an exact copy
    idx, dist = self_neighbours(v, 3)
    assert idx[20, 0] == 10 and idx[10, 0] == 20 and dist[10, 0] == 0.0
    assert all(i not in row for i, row in enumerate(idx))
    full = np.sqrt(((v[:, None] - v[None]) ** 2).sum(-1))
    np.fill_diagonal(full, np.inf)
    assert np.allclose(np.sort(full, axis=1)[:, :3], dist, atol=1e-5)


def test_the_sample_recall_measures_neighbours_against_exact_search() -> None:
    from lookalike.analysis.audit import _sample_recall

    rng = np.random.default_rng(1)
    v = rng.normal(size=(80, 6)).astype(np.float32)
    ids = [str(i) for i in range(80)]
    idx, dist = self_neighbours(v, 4)
    assert _sample_recall(ids, v, idx, dist, 4, 30, seed=0) == (1.0, 30)
    worse_idx, worse_dist = idx.copy(), dist.copy()
    worse_idx[:, 3] = (np.arange(80) + 40) % 80  # each item's 4th neighbour replaced by a far one
    worse_dist[:, 3] = np.linalg.norm(v - v[worse_idx[:, 3]], axis=1)
    recall, _ = _sample_recall(ids, v, worse_idx, worse_dist, 4, 80, seed=0)
    assert 0.74 <= recall < 0.8  # about one of four wrong (a far item that is truly 4th-nearest still counts)


def test_a_flipped_label_comes_first_with_the_right_suggestion(planted: str) -> None:
    with Gallery.open("planted", planted) as g:
        r = audit(g, k=5, top=5)
        _, y_tr = make_digits(200, seed=1)
        assert r.suspects[0].id == "mnist:train:7" and r.suspects[0].score == pytest.approx(1.0)
        assert r.suspects[0].suggested_label == str(y_tr[7]) and r.suspects[0].label == str((int(y_tr[7]) + 3) % 10)
        assert len(r.suspects[0].neighbours) == 5 and "mnist:train:7" not in r.suspects[0].neighbours
        disputed = {s.id for s in r.suspects if s.score > 0.5}
        assert disputed <= {"mnist:train:7", "mnist:train:201"} and r.n_disputed == len(disputed)  # only the flip (and the blank)
        assert r.store_recall_at_k == 1.0 and r.store_sample == r.n_items == 253


def test_a_planted_copy_is_a_leak_and_leaves_the_leak_free_accuracy(planted: str) -> None:
    with Gallery.open("planted", planted) as g:
        r = audit(g, k=5)
        groups = {frozenset(gr.ids): gr for gr in r.groups}
        leak, within = frozenset({"mnist:test:50", "mnist:train:3"}), frozenset({"mnist:train:11", "mnist:train:200"})
        assert set(groups) == {leak, within} and groups[leak].cross_split and not groups[within].cross_split
        assert r.groups[0].cross_split  # leaks listed first
        assert r.leaked_ids == ["mnist:test:50"]
        e = evaluate(g)
        assert r.accuracy == pytest.approx(e.accuracy) and r.n_queries == 51
        wrong = {m["id"] for m in e.mistakes}
        assert "mnist:test:50" not in wrong  # its copy answers it: the leak flatters the accuracy
        assert r.leak_free_accuracy == pytest.approx(1 - len(wrong) / 50)
        assert r.threshold == pytest.approx(0.25 * r.median_nn_distance) and "median" in r.threshold_rule
        exact = audit(g, k=5, threshold=0.0)  # at 0: exact copies only (both planted copies are exact)
        assert {frozenset(gr.ids) for gr in exact.groups} == {leak, within} and exact.leaked_ids == ["mnist:test:50"]


def test_the_held_out_queries_run_after_every_read_vector_is_let_go(planted: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """audit reads every vector once; by the time the store is asked about the held-out items (its index loaded
    again: 3.8 GB at a million) no array of all of them is alive, and the findings are those of an audit that kept them."""
    import gc
    import weakref

    from lookalike.analysis import evaluate as evaluate_module

    with Gallery.open("planted", planted) as g:
        kept = audit(g, k=5)
        read: list[weakref.ref] = []
        alive_when_asked: list[bool] = []
        scan, asked = Gallery.scan_by_split, evaluate_module._store_ranking

        def scan_by_split(self: Gallery):
            items = scan(self)
            read.append(weakref.ref(items.vectors))
            return items

        def store_ranking(*args, **kwargs):
            gc.collect()
            alive_when_asked.append(read[-1]() is not None)
            return asked(*args, **kwargs)

        monkeypatch.setattr(Gallery, "scan_by_split", scan_by_split)
        monkeypatch.setattr(evaluate_module, "_store_ranking", store_ranking)
        r = audit(g, k=5)
    assert len(read) == 1 and alive_when_asked == [False]
    assert r.leaked_ids == kept.leaked_ids == ["mnist:test:50"] and r.accuracy == kept.accuracy
    assert r.leak_free_accuracy == kept.leak_free_accuracy and r.store_recall_at_k == kept.store_recall_at_k
    assert [s.id for s in r.suspects] == [s.id for s in kept.suspects]


def test_past_exact_max_the_store_answers_and_a_sample_checks_it(planted: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A large collection's neighbours come from the store (n log n, not n^2), checked against exact search on a
    seeded sample; on these 253 items HNSW is exact, so every finding is the exact audit's."""
    import importlib

    audit_module, evaluate_module = (importlib.import_module(f"lookalike.analysis.{m}") for m in ("audit", "evaluate"))

    with Gallery.open("planted", planted) as g:
        exact = audit(g, k=5)
        monkeypatch.setattr(audit_module, "EXACT_MAX", 100)
        monkeypatch.setattr(evaluate_module, "EXACT_PAIRS", 10)  # leaks: the store's nearest, exact on a sample
        monkeypatch.setattr(evaluate_module, "EXACT_MIN", 10)
        r = audit(g, k=5, store_sample=50, seed=2, neighbours="store")
    assert exact.neighbours_by == "exact" and r.neighbours_by == "store"
    assert r.store_sample == 50 and r.store_recall_at_k == 1.0
    assert [s.id for s in r.suspects] == [s.id for s in exact.suspects] and r.n_disputed == exact.n_disputed
    assert {frozenset(gr.ids) for gr in r.groups} == {frozenset(gr.ids) for gr in exact.groups}
    assert r.leaked_ids == exact.leaked_ids == ["mnist:test:50"] and r.accuracy == exact.accuracy
    assert [o.id for o in r.outliers] == [o.id for o in exact.outliers]
    assert r.median_nn_distance == pytest.approx(exact.median_nn_distance, rel=1e-5)


def test_past_exact_max_a_faiss_graph_answers_and_a_sample_checks_it(planted: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With faiss installed, a large collection's neighbours come from an HNSW graph built for the audit (auto), checked
    against exact search on the sample; on these 253 items it finds the exact audit's findings. Without faiss, auto
    asks the store, and asking for faiss is one line naming the install."""
    import importlib

    pytest.importorskip("faiss")
    audit_module, evaluate_module = (importlib.import_module(f"lookalike.analysis.{m}") for m in ("audit", "evaluate"))
    args = ["audit", "--collection", "planted", "--db", planted, "--k", "5", "--neighbours", "faiss", "--no-save"]
    by_graph = CliRunner().invoke(app, args)
    assert by_graph.exit_code == 0 and "faiss graph's answers hold 1.0000 of the exact 5" in by_graph.output, by_graph.output
    assert "neighbours: the faiss graph's answers (--neighbours faiss)" in by_graph.output
    with Gallery.open("planted", planted) as g:
        exact = audit(g, k=5)
        monkeypatch.setattr(audit_module, "EXACT_MAX", 100)
        monkeypatch.setattr(evaluate_module, "EXACT_PAIRS", 10)
        monkeypatch.setattr(evaluate_module, "EXACT_MIN", 10)
        r = audit(g, k=5, store_sample=50, seed=2)
        assert r.neighbours_by == "faiss" and r.store_sample == 50 and r.store_recall_at_k == 1.0
        assert [s.id for s in r.suspects] == [s.id for s in exact.suspects] and r.n_disputed == exact.n_disputed
        assert {frozenset(gr.ids) for gr in r.groups} == {frozenset(gr.ids) for gr in exact.groups}
        assert r.leaked_ids == exact.leaked_ids == ["mnist:test:50"] and r.accuracy == exact.accuracy
        assert [o.id for o in r.outliers] == [o.id for o in exact.outliers]
        assert audit(g, k=5, neighbours="exact").neighbours_by == "exact"
        with pytest.raises(InputError, match="--neighbours must be one of auto, exact, faiss, store, got 'hnsw'"):
            audit(g, neighbours="hnsw")
        monkeypatch.setattr(audit_module.ann, "available", lambda: False)
        assert audit(g, k=5, store_sample=50).neighbours_by == "store"
        with pytest.raises(InputError, match=r"the faiss index needs faiss: pip install faiss-cpu"):
            audit(g, neighbours="faiss")


def test_the_blank_item_is_the_first_outlier(planted: str) -> None:
    with Gallery.open("planted", planted) as g:
        r = audit(g, k=5, n_outliers=3)
        assert r.outliers[0].id == "mnist:train:201" and len(r.outliers) == 3
        assert r.outliers[0].score > r.outliers[1].score


def test_bad_options_and_unlabelled_collections(planted: str, tmp_path: Path, fake_embedder: PixelEmbedder) -> None:
    with Gallery.open("planted", planted) as g:
        for kwargs in ({"k": 0}, {"top": 0}, {"threshold": -1.0}, {"threshold": float("nan")}, {"method": "magic"}, {"k": 253}):
            with pytest.raises(InputError):
                audit(g, **kwargs)
    folder = tmp_path / "one-label" / "cats"
    folder.mkdir(parents=True)
    for i in range(6):
        Image.fromarray(make_digits(6, seed=4)[0][i]).save(folder / f"{i}.png")
    ingest("folder", str(tmp_path / "one-label"), embedder=fake_embedder, db=planted, collection="cats")
    with Gallery.open("cats", planted) as g:  # one label: no label issues, but duplicates and outliers
        report = audit(g, k=2, n_outliers=2)
        assert not report.labelled and report.suspects == [] and len(report.outliers) == 2


def test_cli_audit_text_json_csv_and_picture(planted: str, tmp_path: Path) -> None:
    runner = CliRunner()
    out, table = tmp_path / "audit.png", tmp_path / "audit.csv"
    r = runner.invoke(
        app, ["audit", "--collection", "planted", "--db", planted, "--k", "5", "--top", "3", "--out", str(out), "--csv", str(table)]
    )
    assert r.exit_code == 0, r.output
    assert "mnist:train:7" in r.output and "LEAK" in r.output and "without the 1 leaked" in r.output
    assert out.stat().st_size > 10_000 and Image.open(out).size[0] > 500
    with table.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 253 and rows[0]["id"] == "mnist:train:7" and rows[0]["duplicate_group"] == ""
    assert {row["id"] for row in rows if row["duplicate_group"] != ""} == {
        "mnist:test:50",
        "mnist:train:3",
        "mnist:train:11",
        "mnist:train:200",
    }
    j = runner.invoke(app, ["audit", "--collection", "planted", "--db", planted, "--k", "5", "--json"])
    data = json.loads(j.stdout)
    first = data["suspects"][0]
    assert {"id", "split", "label", "suggested_label", "score", "neighbours"} <= set(first) and first["id"] == "mnist:train:7"
    assert data["n_leaked"] == 1 and data["leaked_ids"] == ["mnist:test:50"] and data["n_cross_split_groups"] == 1
    from lookalike.analysis.audit import saved_audit

    with Gallery.open("planted", planted) as g:
        kept = saved_audit(g)  # the first run kept its report (--save is the default)
    assert kept is not None and kept["suspects"][0]["id"] == "mnist:train:7" and kept["k"] == 5 and "saved_at" in kept
    bad = runner.invoke(app, ["audit", "--collection", "planted", "--db", planted, "--k", "0"])
    assert bad.exit_code != 0 and "--k must be at least 1" in one_line_error(bad)
    bad = runner.invoke(app, ["audit", "--collection", "planted", "--db", planted, "--neighbours", "hnsw"])
    assert bad.exit_code != 0 and "--neighbours must be one of auto, exact, faiss, store" in one_line_error(bad)


def test_a_collection_of_copies_still_gets_a_threshold(tmp_path: Path, db: str, fake_embedder: PixelEmbedder) -> None:
    """Every indexed digit stored twice: the median nearest distance is 0, the default threshold must not be."""
    x, y = make_digits(60, seed=5)
    xt, yt = make_digits(20, seed=6)
    path = write_npz(tmp_path / "twice.npz", (np.concatenate([x, x]), np.concatenate([y, y])), (xt, yt))
    ingest("mnist", source=str(path), embedder=fake_embedder, db=db, collection="twice")
    with Gallery.open("twice", db) as g:
        r = audit(g, k=3)
        assert r.median_nn_distance > 0 and r.threshold > 0
        assert len(r.groups) == 60 and all(len(gr.ids) == 2 and not gr.cross_split for gr in r.groups)
        assert r.leaked_ids == [] and r.leak_free_accuracy == r.accuracy
        with pytest.raises(InputError, match="--outliers"):
            audit(g, n_outliers=-1)
