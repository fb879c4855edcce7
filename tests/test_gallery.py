from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from lookalike.core.gallery import Gallery, list_collections
from lookalike.core.ingest import ingest
from lookalike.core.store import RECORD_KEY, Store
from lookalike.errors import InputError, NotFoundError, StoreError


def test_the_gallery_owns_record_labels_and_items(gallery: Gallery, tiny_npz: Path) -> None:
    assert gallery.name == "mnist" and gallery.record.dataset == "mnist" and gallery.record.embedder.dim == 64
    assert gallery.label_names == [str(i) for i in range(10)] and gallery.label_name(3) == "3" and gallery.label_name(12) == "12"
    assert gallery.resolve_labels(["3", 3, "7"]) == [3, 7]
    assert gallery.where(["3"], "train") == {"$and": [{"label": 3}, {"split": "train"}]}
    assert gallery.where([0, 2]) == {"label": {"$in": [0, 2]}} and gallery.where() is None
    meta, vec = gallery.item("mnist:test:7", vector=True)
    with np.load(tiny_npz) as f:
        assert meta["label"] == int(f["y_test"][7])
        (pixels,) = gallery.images([meta])
        assert np.array_equal(pixels, f["x_test"][7])  # read back from the recorded source
    assert vec is not None and np.allclose(vec, gallery.embed([pixels])[0], atol=1e-6)
    with pytest.raises(NotFoundError, match="ids look like"):
        gallery.item("nope")


def test_neighbours_hides_partitions_probe_and_filters(gallery: Gallery) -> None:
    ids, vecs, metas = gallery.scan()
    labels = np.array([m["label"] for m in metas])
    split = np.array([m["split"] for m in metas])
    q = vecs[:6]
    for kwargs, keep in [
        ({}, np.ones(len(ids), bool)),
        ({"labels": ["4"]}, labels == 4),
        ({"labels": [1, 2], "split": "test"}, np.isin(labels, [1, 2]) & (split == "test")),
        ({"split": "train"}, split == "train"),
    ]:
        got = gallery.neighbours(q, 3, **kwargs)
        for i, row in enumerate(got):
            d = ((vecs - q[i]) ** 2).sum(1)
            d[~keep] = np.inf
            assert [n.id for n in row] == [ids[j] for j in np.argsort(d, kind="stable")[:3]], kwargs
    test_ids = {i for i, s in zip(ids, split) if s == "test"}
    rows = gallery.neighbours(q, 4, exclude=test_ids, metadata=False)
    assert all(len(r) == 4 and not {n.id for n in r} & test_ids for r in rows)
    with pytest.raises(InputError, match="--k"):
        gallery.neighbours(q, 0)
    with pytest.raises(InputError, match=r"\(n, 64\)"):
        gallery.neighbours(np.zeros((1, 5)), 3)


def test_a_short_probe_is_widened_until_k_are_found(gallery: Gallery) -> None:
    ids, vecs, _ = gallery.scan()
    exclude = set(ids[:240])  # far more than the probe of k + 16 could hold
    (row,) = gallery.neighbours(vecs[:1], 5, exclude=exclude)
    assert len(row) == 5 and {n.id for n in row} <= set(ids[240:])


def test_the_embedder_is_built_once_and_shared_between_threads(gallery: Gallery, tiny_npz: Path, monkeypatch) -> None:
    import time

    import lookalike.core.gallery as gallery_mod

    with np.load(tiny_npz) as f:
        images = list(f["x_test"][:8])
    expected = gallery.embed(images)
    fresh = Gallery.open(store=gallery.store)  # no embedder built yet
    builds: list[int] = []
    real_build = gallery_mod.build_embedder

    def slow_build(spec):  # a slow build (like VGG16's) widens the window for a second one
        builds.append(1)
        time.sleep(0.2)
        return real_build(spec)

    monkeypatch.setattr(gallery_mod, "build_embedder", slow_build)
    results: list[np.ndarray] = []

    def work() -> None:
        for im in images:
            results.append(fresh.embed([im])[0])

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len(results) == 32
    assert all(any(np.array_equal(r, e) for e in expected) for r in results)


def test_open_picks_the_only_collection_and_lists(tiny_npz: Path, db: str, fake_embedder) -> None:
    ingest("mnist", source=str(tiny_npz), embedder=fake_embedder, collection="first", db=db)
    with Store(db) as store:
        assert Gallery.open(store=store).name == "first"
        ingest("mnist", source=str(tiny_npz), embedder=fake_embedder, collection="second", limit=50, test_size=10, store=store)
        with pytest.raises(InputError, match="first, second"):
            Gallery.open(store=store)
        infos = list_collections(store)
        assert [(i.name, i.count, i.dataset) for i in infos] == [("first", 250, "mnist"), ("second", 50, "mnist")]
        assert infos[0].embedder.startswith("pixels 8px") and infos[0].to_dict()["label_names"][0] == "0"


def test_a_collection_without_a_record_is_named_not_a_traceback(db: str) -> None:
    with Store(db, create=True) as store:
        store._client.create_collection("foreign", embedding_function=None, metadata={"other": "x"})
        with pytest.raises(StoreError, match="no lookalike record"):
            Gallery.open("foreign", store=store)
        store._client.create_collection("broken", embedding_function=None, metadata={RECORD_KEY: "{oops"})
        with pytest.raises(StoreError, match="damaged record"):
            Gallery.open("broken", store=store)
        assert {i.name: i.dataset for i in list_collections(store)} == {"broken": "?", "foreign": "?"}
