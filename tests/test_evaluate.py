from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lookalike.analysis.evaluate import evaluate, save_confusion_picture, save_errors_picture
from lookalike.core.gallery import Gallery
from lookalike.core.ingest import ingest
from lookalike.core.record import Record
from lookalike.core.store import Store
from lookalike.errors import InputError, NotFoundError, StoreError

from .conftest import make_digits, write_npz


def test_separable_data_scores_perfectly(gallery: Gallery) -> None:
    r = evaluate(gallery)
    assert (r.n_queries, r.n_indexed, r.k) == (50, 200, 1)
    assert r.accuracy == r.exact_accuracy == r.recall_at_1 == 1.0
    assert np.trace(np.array(r.confusion)) == 50 and np.array(r.confusion).sum() == 50
    assert set(r.per_class.values()) == {1.0} and len(r.per_class) == 10
    assert r.queries_per_s > 0 and not r.mistakes


def test_accuracy_matches_sklearn_on_noisy_data(tmp_path: Path, db: str, fake_embedder) -> None:
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(7)
    x = rng.integers(0, 256, (400, 28, 28)).astype(np.uint8)  # labels unrelated to pixels: ~chance accuracy
    y = rng.integers(0, 10, 400).astype(np.uint8)
    path = write_npz(tmp_path / "noise.npz", (x[:300], y[:300]), (x[300:], y[300:]))
    ingest("mnist", source=str(path), embedder="pixels", db=db)
    with Gallery.open(db=db) as g:
        flat = x.reshape(400, -1) / 255.0
        for k in (1, 5):
            r = evaluate(g, k=k)
            ref = KNeighborsClassifier(n_neighbors=k, algorithm="brute").fit(flat[:300], y[:300])
            sk = float((ref.predict(flat[300:]) == y[300:]).mean())
            if k == 1:  # no vote: exactly sklearn's answer
                assert r.exact_accuracy == pytest.approx(sk)
            else:  # sklearn breaks vote ties by the smaller label, lookalike by the nearer one
                assert r.exact_accuracy == pytest.approx(sk, abs=0.021)
            assert r.recall_at_1 >= 0.99 and abs(r.accuracy - r.exact_accuracy) <= 0.02
            assert r.accuracy_1nn == evaluate(g, k=1).accuracy
            assert len(r.mistakes) == round((1 - r.accuracy) * r.n_queries)


def test_pictures_of_a_report(tmp_path: Path, db: str) -> None:
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (120, 28, 28)).astype(np.uint8)
    y = rng.integers(0, 3, 120).astype(np.uint8)
    ingest("mnist", source=str(write_npz(tmp_path / "n.npz", (x[:90], y[:90]), (x[90:], y[90:]))), embedder="pixels", db=db)
    with Gallery.open(db=db) as g:
        r = evaluate(g)
        assert r.mistakes  # random labels: some are wrong
        first = r.mistakes[0]
        assert first["true"] == int(y[90 + int(first["id"].split(":")[-1])])
        for out in (save_confusion_picture(r, tmp_path / "c.png"), save_errors_picture(g, r, tmp_path / "e.png")):
            assert out.stat().st_size > 5000


def test_bad_evaluations(tiny_npz: Path, db: str, fake_embedder) -> None:
    with pytest.raises(NotFoundError, match="no store"):
        Gallery.open(db=db)  # no store yet
    ingest("mnist", source=str(tiny_npz), embedder=fake_embedder, db=db)
    with Store(db) as store:
        g = Gallery.open(store=store)
        with pytest.raises(InputError, match="--k"):
            evaluate(g, k=0)
        with pytest.raises(InputError, match="more than"):
            evaluate(g, k=500)
        only_train = Gallery.create(store, "onlytrain", Record(g.record.embedder, g.record.protocol, g.label_names))
        only_train.add(["a:train:1"], np.zeros((1, 64), np.float32), [{"label": 1, "label_name": "1", "split": "train"}])
        with pytest.raises(StoreError, match="no held-out"):
            evaluate(only_train)


def test_a_short_answer_from_the_store_names_check(gallery: Gallery, monkeypatch: pytest.MonkeyPatch) -> None:
    real = gallery.neighbours

    def short(vectors, k, **kwargs):
        rows = real(vectors, k, **kwargs)
        rows[0] = rows[0][:-1]  # a store that lost items answers short
        return rows

    monkeypatch.setattr(gallery, "neighbours", short)
    with pytest.raises(StoreError, match="lookalike check --collection mnist"):
        evaluate(gallery, k=3)


def test_retrieval_metrics_through_the_store_and_exactly(tmp_path: Path, db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from .test_metrics import _independent_r_metrics

    rng = np.random.default_rng(11)
    y = rng.integers(0, 4, 260).astype(np.uint8)
    x = rng.integers(0, 120, (260, 28, 28)).astype(np.uint8)
    x[:, :8, :8] += (y * 30)[:, None, None].astype(np.uint8)  # labels show, partly
    path = write_npz(tmp_path / "blocks.npz", (x[:200], y[:200]), (x[200:], y[200:]))
    ingest("mnist", source=str(path), embedder="pixels", db=db)
    with Gallery.open(db=db) as g:
        _, test_vecs, _ = g.scan("test")  # the stored vectors, in scan order, as evaluate reads them
        _, train_vecs, train_metas = g.scan("train")
        _, _, test_metas = g.scan("test")
        y_test = np.array([m["label"] for m in test_metas])
        y_train = np.array([m["label"] for m in train_metas])
        want = _independent_r_metrics(test_vecs, y_test, train_vecs, y_train)
        r = evaluate(g)
        ret = r.retrieval
        assert (ret["exact"]["r_precision"], ret["exact"]["map_at_r"]) == pytest.approx(want)
        assert ret["r_queries_store"] == ret["r_queries_exact"] == 60 and "exact_same_queries" not in ret
        assert ret["store"]["map_at_r"] == pytest.approx(ret["exact"]["map_at_r"], abs=0.01)  # 200 items: HNSW ~exact
        assert ret["store"]["precision_at_1"] == pytest.approx(r.accuracy)  # 1-NN: the same thing
        assert set(ret["store"]["per_class"]) == {"0", "1", "2", "3"}
        mine = [((y_train[np.argsort(((train_vecs - q) ** 2).sum(1))[:5]]) == lab).mean() for q, lab in zip(test_vecs, y_test)]
        assert ret["exact"]["precision_at_5"] == pytest.approx(np.mean(mine))
        monkeypatch.setattr(
            importlib.import_module("lookalike.analysis.evaluate"), "R_BUDGET", 100
        )  # too many ranked items: the store's R metrics on a sample
        sampled = evaluate(g, r_sample=20, seed=4).retrieval
        assert sampled["r_queries_store"] == 20 and sampled["r_queries_exact"] == 60
        pick = np.sort(np.random.default_rng(4).choice(60, 20, replace=False))
        same = _independent_r_metrics(test_vecs[pick], y_test[pick], train_vecs, y_train)
        assert (sampled["exact_same_queries"]["r_precision"], sampled["exact_same_queries"]["map_at_r"]) == pytest.approx(same)
        labels_seen = {str(y_test[i]) for i in pick}
        for label, metrics in sampled["store"]["per_class"].items():  # the store's R metrics: only labels the sample met
            assert (metrics["map_at_r"] == metrics["map_at_r"]) == (label in labels_seen)
        with pytest.raises(InputError):
            evaluate(g, r_sample=0)

        # past EXACT_PAIRS exact search answers a seeded sample of the queries, and past EXACT_R_CELLS its R metrics
        # use the store's sample: nothing grows as queries x indexed items (issue: a million items)
        ev = importlib.import_module("lookalike.analysis.evaluate")
        monkeypatch.setattr(ev, "R_BUDGET", 10**9)
        monkeypatch.setattr(ev, "EXACT_PAIRS", 200 * 30)
        monkeypatch.setattr(ev, "EXACT_MIN", 5)
        part = evaluate(g, seed=3)
        rows = ev.exact_sample(60, 200, seed=3)
        assert len(rows) == part.exact_queries == 30 and part.n_queries == 60 and part.accuracy == pytest.approx(r.accuracy)
        exact_1nn = np.array([y_train[np.argmin(((train_vecs - q) ** 2).sum(1))] for q in test_vecs[rows]])
        assert part.exact_accuracy == pytest.approx((exact_1nn == y_test[rows]).mean())
        wrong = {m["id"] for m in part.mistakes}
        test_ids = g.scan("test")[0]
        assert part.accuracy_same_queries == pytest.approx(np.mean([test_ids[i] not in wrong for i in rows]))
        pret = part.retrieval  # the store's R metrics on the same sample: the exact ones beside them need no more ranking
        assert pret["precision_queries_exact"] == pret["r_queries_exact"] == pret["r_queries_store"] == 30
        assert "exact_same_queries" not in pret and pret["queries"] == 60
        want_part = _independent_r_metrics(test_vecs[rows], y_test[rows], train_vecs, y_train)
        assert (pret["exact"]["r_precision"], pret["exact"]["map_at_r"]) == pytest.approx(want_part)
        monkeypatch.setattr(ev, "EXACT_R_CELLS", 10)  # too many exact ranks: the store's R sample, drawn from the exact one
        monkeypatch.setattr(ev, "R_BUDGET", 100)
        tight = evaluate(g, seed=3, r_sample=10).retrieval
        picked = np.sort(rows[np.random.default_rng(3).choice(30, 10, replace=False)])
        assert tight["r_queries_exact"] == tight["r_queries_store"] == 10 and tight["precision_queries_exact"] == 30
        want_tight = _independent_r_metrics(test_vecs[picked], y_test[picked], train_vecs, y_train)
        assert (tight["exact"]["r_precision"], tight["exact"]["map_at_r"]) == pytest.approx(want_tight)
        # R so long that r_sample queries would rank more than R_RESULTS items: fewer (at least R_MIN), asked a few at a time
        monkeypatch.setattr(ev, "R_RESULTS", tight["r_max"] * 7)
        monkeypatch.setattr(ev, "R_MIN", 3)
        monkeypatch.setattr(ev, "RANK_CHUNK", 1)  # (one query a call)
        short = evaluate(g, seed=3, r_sample=10).retrieval
        picked = np.sort(rows[np.random.default_rng(3).choice(30, 7, replace=False)])
        assert short["r_queries_exact"] == short["r_queries_store"] == 7
        want_short = _independent_r_metrics(test_vecs[picked], y_test[picked], train_vecs, y_train)
        assert (short["exact"]["r_precision"], short["exact"]["map_at_r"]) == pytest.approx(want_short)
        assert short["store"]["map_at_r"] == pytest.approx(short["exact"]["map_at_r"], abs=0.01)
        monkeypatch.setattr(ev, "R_RESULTS", 1)
        assert evaluate(g, seed=3, r_sample=10).retrieval["r_queries_store"] == 3  # (R_MIN)


def test_retrieval_metrics_on_small_and_disjoint_collections(tmp_path: Path, db: str) -> None:
    """Fewer than 10 indexed items: P@10 is over those there are; held-out labels never indexed: no R metrics, no failure."""
    x, y = make_digits(6, seed=3)
    y[:] = [0, 0, 0, 1, 1, 1]
    xt, yt = make_digits(4, seed=4)
    yt[:] = [2, 2, 3, 3]  # labels no indexed item has
    path = write_npz(tmp_path / "small.npz", (x, y), (xt, yt))
    ingest("mnist", source=str(path), embedder="pixels", db=db, collection="small")
    with Gallery.open("small", db) as g:
        ret = evaluate(g).retrieval
        assert ret["r_max"] == 0 and ret["store"]["precision_at_10"] == 0.0 and ret["store"]["map_at_r"] != ret["store"]["map_at_r"]
    yt[:] = [0, 0, 1, 1]
    path = write_npz(tmp_path / "small2.npz", (x, y), (xt, yt))
    ingest("mnist", source=str(path), embedder="pixels", db=db, collection="small2")
    with Gallery.open("small2", db) as g:
        ret = evaluate(g).retrieval
        _, tv, tm = g.scan("test")
        _, iv, im = g.scan("train")
        iy = np.array([m["label"] for m in im])
        want = np.mean([(iy[np.argsort(((iv - q) ** 2).sum(1))] == m["label"]).mean() for q, m in zip(tv, tm)])  # all 6 places
        assert ret["exact"]["precision_at_10"] == pytest.approx(want)


def test_past_store_queries_a_seeded_sample_of_the_held_out_items_is_asked(gallery: Gallery, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past STORE_QUERIES held-out items, a seeded sample of that many queries the store (every held-out item still
    kept out of the answers); the figures are the sample's, and ``n_held_out`` counts them all."""
    import importlib

    ev = importlib.import_module("lookalike.analysis.evaluate")

    whole = evaluate(gallery)
    asked: list[int] = []
    real = gallery.neighbours

    def spy(vectors: np.ndarray, k: int, **kw: object) -> list:
        asked.append(len(vectors))
        assert len(kw["exclude"]) == 50  # (every held-out id, not the sample's alone)
        return real(vectors, k, **kw)

    read: list[int] = []
    real_scan = gallery.scan

    def scan_spy(split: str | None = None, **kw: object) -> tuple:
        got = real_scan(split, **kw)
        read.append(len(got[1]))
        return got

    monkeypatch.setattr(ev, "STORE_QUERIES", 20)
    monkeypatch.setattr(gallery, "neighbours", spy)
    monkeypatch.setattr(gallery, "scan", scan_spy)
    part = evaluate(gallery, seed=5)
    assert read[0] == 20  # (the sample's vectors alone are read, not every held-out item's)
    assert (part.n_queries, part.n_held_out, whole.n_held_out, whole.n_queries) == (20, 50, 50, 50)
    assert asked[0] == 20 and part.exact_queries == 20 and np.array(part.confusion).sum() == 20
    test_ids = gallery.scan("test")[0]
    pick = np.sort(np.random.default_rng(5).choice(50, 20, replace=False))
    wrong_whole = {m["id"] for m in whole.mistakes}
    assert part.accuracy == pytest.approx(np.mean([test_ids[i] not in wrong_whole for i in pick]))
    assert part.retrieval["queries"] == 20
    assert part.queries_asked() == "20 of 50 held-out items asked, a seeded sample" and whole.queries_asked() == "50 held-out queries"


def test_labels_are_listed_label_by_label_without_reading_metadata(gallery: Gallery, monkeypatch: pytest.MonkeyPatch) -> None:
    """``labels_of`` takes labels from one id listing a label (no metadata read); past LABELS_LISTED label names, or
    for an id the listing lacks, the label field is read by id; an id not stored is a StoreError."""
    import importlib

    gallery_mod = importlib.import_module("lookalike.core.gallery")
    ids, _, metas = gallery.scan(vectors=False)
    want = np.array([m["label"] for m in metas])
    col = gallery.collection()
    reads: list[int] = []
    real_scan = col.scan

    def scan_spy(*args: object, **kw: object) -> tuple:
        reads.append(len(kw["only"]))  # type: ignore[arg-type]
        return real_scan(*args, **kw)

    monkeypatch.setattr(col, "scan", scan_spy)
    listed = gallery.listed_labels()
    assert len(listed) == len(ids) and np.array_equal(gallery.labels_of(ids[::-1], listed), want[::-1]) and reads == []
    partial = {i: listed[i] for i in ids[5:]}  # (an item added after the listing: its label read by id)
    assert np.array_equal(gallery.labels_of(ids, partial), want) and reads == [5]
    monkeypatch.setattr(gallery_mod, "LABELS_LISTED", 0)
    assert gallery.listed_labels() == {} and np.array_equal(gallery.labels_of(ids), want) and reads == [5, len(ids)]
    with pytest.raises(StoreError, match="no longer holds item 'gone'"):
        gallery.labels_of([ids[0], "gone"])


def test_an_item_without_a_label_in_a_labelled_collection_is_one_line(gallery: Gallery) -> None:
    ids, _, metas = gallery.scan("train", vectors=False)
    gallery.update_metadatas([ids[4]], [{**metas[4], "label": -1}])
    with pytest.raises(StoreError, match="holds items without a label: run `lookalike check"):
        evaluate(gallery)


def test_a_collection_without_held_out_items_cannot_be_evaluated(gallery: Gallery) -> None:
    gallery.remove(gallery.ids("test"))
    with pytest.raises(StoreError, match="has no held-out items: ingest with --test-size N"):
        evaluate(gallery)


def test_a_scan_of_chosen_ids_reads_them_in_that_order_and_leaves_out_the_missing(gallery: Gallery) -> None:
    ids, vecs, metas = gallery.scan("test")
    assert gallery.ids("test") == ids and set(gallery.ids()) >= set(ids) and len(gallery.ids()) == gallery.count()
    chosen = [ids[7], "not-stored", ids[2], ids[7]]
    got_ids, got_vecs, got_metas = gallery.scan(fields=("label",), only=chosen)
    assert got_ids == [ids[7], ids[2]] and np.array_equal(got_vecs, vecs[[7, 2]])
    assert got_metas == [{"label": metas[7]["label"]}, {"label": metas[2]["label"]}]


def test_a_scan_keeps_only_the_fields_asked(gallery: Gallery) -> None:
    ids, vecs, metas = gallery.scan("train")
    got_ids, got_vecs, got_metas = gallery.scan("train", fields=("label", "absent"))
    assert got_ids == ids and np.array_equal(got_vecs, vecs) and got_vecs.dtype == np.float32
    assert got_metas == [{"label": m["label"]} for m in metas] and len(metas[0]) > 1


def test_a_scan_by_split_puts_the_held_out_items_first_and_its_splits_are_views(gallery: Gallery) -> None:
    """audit reads the collection once, held-out items first, without metadata: evaluate's two splits of it are
    then views of its vectors (a million items: no second 3 GB copy); items of neither split come last."""
    from lookalike.core.gallery import Scanned

    ids, vecs, metas = gallery.scan()
    gallery.update_metadatas([ids[3]], [{**metas[3], "split": "extra"}])
    got = gallery.scan_by_split()
    want_split = {i: ("extra" if n == 3 else m["split"]) for n, (i, m) in enumerate(zip(ids, metas))}
    assert got.splits == [want_split[i] for i in got.ids] and sorted(got.ids) == sorted(ids)
    assert got.splits == sorted(got.splits, key=lambda s: ("test", "train", "extra").index(s)) and got.splits[-1] == "extra"
    row = {i: n for n, i in enumerate(ids)}
    assert np.array_equal(got.vectors, vecs[[row[i] for i in got.ids]])
    assert got.labels.tolist() == [metas[row[i]]["label"] for i in got.ids]
    for split in ("test", "train"):
        part_ids, part_vecs, part_labels = got.split(split)
        assert np.shares_memory(part_vecs, got.vectors) and part_ids == [i for i, s in zip(got.ids, got.splits) if s == split]
        assert part_labels.tolist() == [metas[row[i]]["label"] for i in part_ids]
    order = np.argsort([i % 5 for i in range(len(ids))], kind="stable")  # the splits' rows interleaved
    apart = Scanned([ids[i] for i in order], vecs[order], np.zeros(len(ids), int), [str(metas[i]["split"]) for i in order])
    _, mixed, _ = apart.split("train")  # (rows apart: a copy, as before)
    assert not np.shares_memory(mixed, apart.vectors) and len(mixed) == 200


def test_held_out_that_consumes_the_scan_gives_the_same_answers_and_lets_the_vectors_go(
    gallery: Gallery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """audit hands its scan over (``consume``): exact search runs first, then every indexed vector is let go of
    before the store's index is loaded for the held-out queries; the answers are those of a held_out that kept them."""
    from lookalike.analysis import evaluate as ev

    kept = ev.held_out(gallery, 3, items=gallery.scan_by_split(), sample_exact=False)
    items = gallery.scan_by_split()
    seen: list[int] = []
    asked = ev._store_ranking

    def ranking(*args, **kwargs):  # (what the scan still holds when the store is asked)
        seen.append(len(items.vectors))
        return asked(*args, **kwargs)

    monkeypatch.setattr(ev, "_store_ranking", ranking)
    given = ev.held_out(gallery, 3, items=items, sample_exact=False, consume=True)
    assert seen == [0] and len(items.vectors) == 0 and len(given.train_vecs) == 0
    assert given.test_ids == kept.test_ids and np.array_equal(given.test_vecs, kept.test_vecs)
    assert not np.shares_memory(given.test_vecs, kept.test_vecs)
    for name in ("store_nn", "store_d1", "exact_rows", "exact_nn", "exact_d2", "y_test", "y_train"):
        assert np.array_equal(getattr(given, name), getattr(kept, name)), name
    assert np.array_equal(given.predictions(), kept.predictions())
