from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import lookalike.core.store as store_mod
from lookalike.core.record import Record
from lookalike.core.store import Store
from lookalike.errors import DamagedError, InputError, NotFoundError, StoreError
from lookalike.models.embedder import make_spec

from .conftest import chroma_run, free_port, run_cli


def record(n_labels: int = 10, **protocol: object) -> Record:
    proto = {"dataset": "mnist", "mode": "official", "limit": None, "test_size": None, "seed": 0, **protocol}
    return Record(make_spec("pixels"), proto, [str(i) for i in range(n_labels)], label_partitions=0 < n_labels <= 100)


def create(s: Store, name: str, n_labels: int = 10) -> store_mod.VectorCollection:
    rec = record(n_labels)
    return s.create(name, rec.to_json(), rec.label_partitions)


def fill(col: store_mod.VectorCollection, n: int = 30, dim: int = 784, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vecs = rng.random((n, dim), dtype=np.float32)
    ids = [f"mnist:{'test' if i % 3 == 0 else 'train'}:{i}" for i in range(n)]
    metas = [{"label": i % 10, "label_name": str(i % 10), "split": "test" if i % 3 == 0 else "train"} for i in range(n)]
    col.add(ids, vecs, metas)
    return vecs


def test_create_add_query_scan(db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    s = Store(db, create=True)
    col = create(s, "digits")
    vecs = fill(col)
    assert col.count() == 30
    assert Record.parse(s.open("digits").raw_record, "digits") == record()
    assert col.existing_ids(["mnist:train:1", "mnist:train:999"]) == {"mnist:train:1"}
    (res,) = col.query(vecs[1:2], 3)
    assert res[0].id == "mnist:train:1" and res[0].distance == pytest.approx(0.0, abs=1e-3)
    exact = np.sqrt(((vecs - vecs[1]) ** 2).sum(1))
    assert [n.id for n in res] == [f"mnist:{'test' if i % 3 == 0 else 'train'}:{i}" for i in np.argsort(exact)[:3]]
    assert res[1].distance == pytest.approx(exact[np.argsort(exact)[1]], rel=1e-4)  # Euclidean, not squared
    (filtered,) = col.query(vecs[1:2], 5, where={"split": "test"})
    assert all(n.metadata["split"] == "test" for n in filtered)
    (excluding,) = col.query(vecs[1:2], 3, exclude={"mnist:train:1"}, metadata=False)
    assert [n.id for n in excluding] == [f"mnist:{'test' if i % 3 == 0 else 'train'}:{i}" for i in np.argsort(exact)[1:4]]
    assert excluding[0].metadata == {}
    monkeypatch.setattr(store_mod, "PAGE", 7)  # force several pages
    monkeypatch.setattr(store_mod, "ID_PAGE", 6)  # ... and several id listings
    ids, got, metas = col.scan({"split": "train"})
    assert len(ids) == 20 == len(set(ids)) and got.shape == (20, 784)
    row = ids.index("mnist:train:4")
    assert np.allclose(got[row], vecs[4])
    assert [m["split"] for m in metas] == ["train"] * 20
    every = list(col.pages(vectors=False, metadatas=False))
    assert sorted(i for page, _, _ in every for i in page) == sorted(f"mnist:{'test' if i % 3 == 0 else 'train'}:{i}" for i in range(30))
    assert max(len(page) for page, _, _ in every) == 7
    scan = col.pages(vectors=True)  # paged by id: an item removed during a scan is left out, nothing else is
    first_ids, _, _ = next(scan)
    col.delete(["mnist:train:29"])
    rest = [i for page, _, _ in scan for i in page]
    assert len(first_ids) + len(rest) == 29 and "mnist:train:29" not in first_ids + rest
    col.add(["mnist:train:29"], vecs[29:30], [metas[0] | {"split": "train", "label": 9}])
    col.add(["mnist:train:1"], vecs[:1] * 0, [metas[0]])  # re-adding an id is skipped, not duplicated
    assert col.count() == 30
    assert np.allclose(col.get(["mnist:train:1"], vectors=True)[1], vecs[1])


def _exact_filtered(vecs: np.ndarray, q: np.ndarray, keep: np.ndarray, k: int) -> list[int]:
    d = ((vecs - q) ** 2).sum(1)
    d[~keep] = np.inf
    return [int(i) for i in np.argsort(d, kind="stable")[:k]]


def test_label_filter_uses_partitions_and_matches_exact_search(db: str) -> None:
    s = Store(db, create=True)
    col = create(s, "digits")
    vecs = fill(col, n=200, dim=16)
    labels = np.arange(200) % 10
    split = np.array(["test" if i % 3 == 0 else "train" for i in range(200)])
    assert s.names() == ["digits"]  # the ten partitions are hidden
    assert sorted(s._client.list_collections(), key=lambda c: c.name)[1].name == "digits.p0"
    reopened = s.open("digits", partitioned=True)
    cases = [
        ({"label": 3}, labels == 3),
        ({"label": {"$in": [2, 7]}}, np.isin(labels, [2, 7])),
        ({"$and": [{"label": 4}, {"split": "train"}]}, (labels == 4) & (split == "train")),
        ({"split": "test"}, split == "test"),
    ]
    for where, keep in cases:
        got = reopened.query(vecs[:20], 4, where=where)
        for i, row in enumerate(got):
            assert [int(n.id.rsplit(":", 1)[1]) for n in row] == _exact_filtered(vecs, vecs[i], keep, 4), where
            assert all(store_mod.matches(n.metadata, where) for n in row)
    assert reopened.query(vecs[:1], 4, where={"label": 3})[0][0].metadata["label"] == 3
    # the collection's graph is built 200 wide and searched 64 wide; a partition's (small, searched 384 wide) is built
    # 100 wide, as Chroma stores them for every later process
    main_hnsw = s._client.get_collection("digits").configuration_json["hnsw"]
    part_hnsw = s._client.get_collection("digits.p3").configuration_json["hnsw"]
    assert (main_hnsw["max_neighbors"], main_hnsw["ef_construction"], main_hnsw["ef_search"]) == (32, 200, 64)
    assert (part_hnsw["max_neighbors"], part_hnsw["ef_construction"], part_hnsw["ef_search"]) == (32, 100, 384)
    s.drop("digits")
    assert s._client.list_collections() == []  # partitions dropped with it


def test_released_memory_is_loaded_again_by_the_next_call_and_the_handles_still_work(db: str) -> None:
    """``release_memory`` replaces the client (Chroma drops the indexes it loaded); the collections and their partitions
    already open fetch their handle again, then answer and write as before."""
    s = Store(db, create=True)
    col = create(s, "digits")
    vecs = fill(col, n=60, dim=16)
    want = col.query(vecs[:5], 3, where={"label": 4})
    old_client, old_handle = s._client, col._c
    s.release_memory()
    assert s.epoch == 1 and s._client is not old_client and col._c is not old_handle
    assert col.query(vecs[:5], 3, where={"label": 4}) == want and col.count() == 60
    col.add(["extra"], vecs[:1] + 1, [{"label": 4, "label_name": "4", "split": "train"}])
    assert col.partition(4).count() == 7 and col.count() == 61
    s.close()


def test_partitions_filled_after_the_index_answer_as_those_written_with_each_batch(db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A large write goes to the main collection alone, marked in the store as ahead of its partitions (label filters
    go without them, exactly); ``fill_partitions`` writes each label's items then, mends what an interrupted fill
    left (a stray entry removed, the missing added) and takes the mark away."""
    s = Store(db, create=True)
    col = create(s, "digits")
    rng = np.random.default_rng(3)
    vecs = rng.random((200, 16), dtype=np.float32)
    ids = [f"mnist:train:{i}" for i in range(200)]
    labels = np.arange(200) % 10
    metas = [{"label": int(x), "label_name": str(x), "split": "train"} for x in labels]
    col.add(ids[:150], vecs[:150], metas[:150], partitions_later=True)
    assert col.partitions_behind and col.count() == 150
    assert [c.name for c in s._client.list_collections()] == ["digits"]  # no partition written yet
    reopened = s.open("digits", partitioned=True)  # (another process reads the mark)
    assert reopened.partitions_behind and "lookalike_partitions_behind" not in reopened.notes()
    for row, q in zip(reopened.query(vecs[:5], 4, where={"label": 3}), vecs[:5]):  # exact without the partitions
        assert [n.id for n in row] == [ids[i] for i in _exact_filtered(vecs[:150], q, labels[:150] == 3, 4)]
    assert reopened.partition(3) is None
    assert col.fill_partitions(range(10), release=True) == 150
    assert not col.partitions_behind and not s.open("digits", partitioned=True).partitions_behind
    assert reopened.partitions_behind  # a local store's lock keeps other writers out: what it read at opening holds
    monkeypatch.setattr(store_mod, "is_server", lambda db: True)  # on a server, other processes write: read again
    monkeypatch.setattr(store_mod, "BEHIND_RECHECK", 0.0)
    assert not reopened.partitions_behind
    monkeypatch.undo()
    assert [col.partition(x).count() for x in range(10)] == [15] * 10

    col.add(ids[150:], vecs[150:], metas[150:], partitions_later=True)
    col.partition(4)._write("add", ["stray"], vecs[:1], [metas[4]])  # an entry without a main item
    real = store_mod.VectorCollection._write

    def dies_at_the_third_label(self: store_mod.VectorCollection, how: str, *a: object) -> None:
        if self.name.endswith(".p2"):
            raise KeyboardInterrupt
        real(self, how, *a)

    monkeypatch.setattr(store_mod.VectorCollection, "_write", dies_at_the_third_label)
    with pytest.raises(KeyboardInterrupt):
        col.fill_partitions(range(10))
    monkeypatch.setattr(store_mod.VectorCollection, "_write", real)
    again = s.open("digits", partitioned=True)
    assert again.partitions_behind and again.partition(1).count() == 20 and again.partition(2).count() == 15
    assert again.fill_partitions(range(10)) == 50 - 10  # labels 2-9 (0 and 1 were filled before the interruption)
    assert not again.partitions_behind
    assert [again.partition(x).count() for x in range(10)] == [20] * 10  # the stray entry removed
    for row, q in zip(again.query(vecs[:5], 4, where={"label": {"$in": [2, 4]}}), vecs[:5]):  # through the partitions
        assert [n.id for n in row] == [ids[i] for i in _exact_filtered(vecs, q, np.isin(labels, [2, 4]), 4)]
    s.close()


def test_filtered_query_falls_back_when_the_probe_is_short(db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "PROBE", 5)
    col = create(Store(db, create=True), "digits", n_labels=200)
    assert not col.partitioned  # too many labels for partitions
    vecs = fill(col, n=60, dim=8)
    labels = np.arange(60) % 10
    calls: list[tuple[int, object]] = []
    real = col._query

    def spy(vectors: np.ndarray, k: int, where: object, metadata: bool) -> list:
        calls.append((k, where))
        return real(vectors, k, where, metadata)

    monkeypatch.setattr(col, "_query", spy)
    for i in range(10):  # the probe (32 of 60) often holds fewer than 4 of a label: then brute force over its 6 items answers
        want = _exact_filtered(vecs, vecs[i], labels == (i + 5) % 10, 4)
        (row,) = col.query(vecs[i : i + 1], 4, where={"label": (i + 5) % 10})
        assert [int(n.id.rsplit(":", 1)[1]) for n in row] == want
    assert calls[0] == (32, None)  # the unfiltered probe of max(4k + 16, PROBE)
    assert col.plan_counts["brute"] > 0 and all(where is None for _, where in calls)
    # a narrow filter's items are kept: the same filter again reads nothing from Chroma, until the next write
    reads: list[object] = []
    chroma_get = col._c.get
    monkeypatch.setattr(col._c, "get", lambda *a, **kw: reads.append(kw.get("where")) or chroma_get(*a, **kw))
    brute, probes = col.plan_counts["brute"], len(calls)
    for i in range(10):
        (row,) = col.query(vecs[i : i + 1], 4, where={"label": (i + 5) % 10})
        assert [int(n.id.rsplit(":", 1)[1]) for n in row] == _exact_filtered(vecs, vecs[i], labels == (i + 5) % 10, 4)
    assert reads == [] and col.plan_counts["brute"] == 2 * brute  # the filters answered by brute force: again, from memory
    assert len(calls) == probes + 10 - brute  # ... with no probe either (the others: the probe, as before)
    col.add(["mnist:train:60"], vecs[:1] + 0.5, [{"label": 0, "label_name": "0", "split": "train"}])
    vecs, labels = np.concatenate([vecs, vecs[:1] + 0.5]), np.append(labels, 0)
    for i in range(10):  # after a write, the kept items are let go: read again, with the new item
        (row,) = col.query(vecs[i : i + 1], 4, where={"label": (i + 5) % 10})
        assert [int(n.id.rsplit(":", 1)[1]) for n in row] == _exact_filtered(vecs, vecs[i], labels == (i + 5) % 10, 4)
    assert any(w is not None for w in reads)
    monkeypatch.setattr(store_mod, "NARROW_MB", 0)  # kept items are bounded by their vectors' size: none fit now
    col.add(["mnist:train:61"], vecs[:1] + 0.7, [{"label": 1, "label_name": "1", "split": "train"}])
    for _ in range(2):
        reads.clear()
        ids, _, _ = col._narrow_items({"label": 1})
        assert len(ids) == 7 and reads == [{"label": 1}, None]  # the ids listed by SQLite, then read by id: every time
    monkeypatch.setattr(store_mod, "EXACT_MAX", 3)  # a filter matching more than that: Chroma's where answers
    for i in range(10):
        want = _exact_filtered(vecs, vecs[i], labels == (i + 5) % 10, 4)
        (row,) = col.query(vecs[i : i + 1], 4, where={"label": (i + 5) % 10})
        assert [int(n.id.rsplit(":", 1)[1]) for n in row] == want
    assert col.plan_counts["where"] > 0 and any(where is not None for _, where in calls)


def test_partitions_are_completed_by_a_resumed_add(db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    col = create(Store(db, create=True), "digits")
    rng = np.random.default_rng(1)
    vecs = rng.random((20, 8), dtype=np.float32)
    ids = [f"mnist:train:{i}" for i in range(20)]
    metas = [{"label": i % 2, "label_name": str(i % 2), "split": "train"} for i in range(20)]
    real_write = col._write  # the main collection's own write (each partition is another object)

    def crash(*a: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(col, "_write", crash)  # dies after the partitions, before the main collection
    with pytest.raises(KeyboardInterrupt):
        col.add(ids, vecs, metas)
    monkeypatch.setattr(col, "_write", real_write)
    assert col.partition(1) is not None and col.partition(1).count() == 10  # the partitions were written
    assert col.existing_ids(ids) == set()  # not committed: a resumed ingest adds the batch again
    col.add(ids, vecs, metas)
    assert col.count() == 20
    part = col.partition(1)
    assert part is not None and part.count() == 10
    (row,) = col.query(vecs[1:2], 3, where={"label": 1})
    assert [n.id for n in row] == [ids[i] for i in _exact_filtered(vecs, vecs[1], np.arange(20) % 2 == 1, 3)]


def test_a_user_collection_named_like_a_partition_is_never_written_to(db: str) -> None:
    s = Store(db, create=True)
    theirs = s._client.create_collection("digits.p1", embedding_function=None)  # made outside lookalike
    col = create(s, "digits")
    with pytest.raises(StoreError, match="not a label partition"):
        fill(col, n=20, dim=8)
    assert theirs.count() == 0 and col.count() == 0  # the partition of label 0 was written, the main one not
    with pytest.raises(InputError, match="label partitions"):
        create(s, "mine.p3")  # lookalike never makes such a name itself


def test_partition_lookup_tells_absent_from_failed(db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    s = Store(db, create=True)
    col = create(s, "digits")
    fill(col, n=20, dim=8)  # labels 0-9 all present
    s._client.delete_collection("digits.p3")
    col = s.open("digits", partitioned=True)
    assert col.partition(3) is None  # absent: nobody with label 3 (any more)
    (row,) = col.query(np.zeros((1, 8), np.float32), 5, where={"label": 3})
    assert row == []

    def hiccup(*a: object, **k: object) -> None:
        raise ConnectionResetError("server went away")

    monkeypatch.setattr(s._client, "get_collection", hiccup)
    with pytest.raises(DamagedError, match="server went away"):
        col.partition(4)  # failed: an error, never "no items"


def test_matches_and_label_filter() -> None:
    meta = {"label": 3, "split": "train"}
    assert store_mod.matches(meta, {"$and": [{"label": {"$in": [1, 3]}}, {"split": {"$ne": "test"}}]})
    assert not store_mod.matches(meta, {"$or": [{"label": 4}, {"split": {"$eq": "test"}}]})
    assert store_mod.matches(meta, {"label": {"$gt": 1}}) and not store_mod.matches(meta, {"split": {"$gt": 1}})
    with pytest.raises(ValueError):
        store_mod.matches(meta, {"label": {"$regex": "3"}})
    assert store_mod.label_filter({"label": 3}) == ([3], None)
    assert store_mod.label_filter({"$and": [{"split": "train"}, {"label": {"$in": [1, 2]}}]}) == ([1, 2], {"split": "train"})
    assert store_mod.label_filter({"split": "train"}) is None
    assert store_mod.label_filter({"label": {"$gt": 1}}) is None


def test_pick_and_drop(db: str) -> None:
    s = Store(db, create=True)
    with pytest.raises(NotFoundError, match="no collections"):
        s.pick(None)
    create(s, "first")
    assert s.pick(None) == "first"
    create(s, "second")
    with pytest.raises(InputError, match="first, second"):
        s.pick(None)
    with pytest.raises(NotFoundError, match="collections: first, second"):
        s.pick("third")
    s.drop("first")
    assert s.names() == ["second"] and all(owner != "first" for _, owner in s.all_collections())
    with pytest.raises(NotFoundError):
        s.drop("first")


def test_bad_names_and_paths(db: str, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="invalid collection name"):
        create(Store(db, create=True), "x")
    with pytest.raises(NotFoundError, match="no store"):
        Store(str(tmp_path / "missing"))
    assert not (tmp_path / "missing").exists()  # reading never creates a store
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match=r"writable directory|is a file"):
        Store(str(blocker / "db"), create=True)
    with pytest.raises(StoreError, match="is a file"):
        Store(str(blocker), create=True)
    with pytest.raises(InputError, match="bad port"):
        Store("http://127.0.0.1:notaport")


def test_chroma_errors_become_one_line_store_errors(db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from chromadb.errors import InternalError

    s = Store(db, create=True)
    col = create(s, "digits")

    def broken(*a: object, **k: object) -> None:
        raise InternalError("Error executing plan: Internal error: Error getting embedding")

    monkeypatch.setattr(col._c, "get", broken)
    with pytest.raises(DamagedError, match=r"Error getting embedding\): it may be damaged; run `lookalike check --collection digits"):
        col.get(["mnist:train:1"], vectors=True)


@pytest.fixture(scope="module")
def chroma_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `chroma run` server on loopback."""
    with chroma_run(tmp_path_factory.mktemp("server-db")) as (_, url):
        yield url


@pytest.mark.slow
def test_server_mode_is_shared_between_processes(chroma_server: str, tiny_npz: Path) -> None:
    first = run_cli("ingest", "mnist", "--source", str(tiny_npz), "--embedder", "pixels", "--db", chroma_server, "--collection", "shared")
    assert first.returncode == 0, first.stderr
    found = run_cli("search", "--id", "mnist:test:0", "--k", "3", "--db", chroma_server, "--collection", "shared", "--json")
    assert found.returncode == 0, found.stderr
    hits = json.loads(found.stdout)
    assert len(hits) == 3 and all(h["id"] != "mnist:test:0" for h in hits)
    assert Store(chroma_server).open("shared").count() == 250  # and this process sees the same data
    both = [run_cli("search", "--id", f"mnist:test:{i}", "--db", chroma_server, "--collection", "shared") for i in range(2)]
    assert all(r.returncode == 0 for r in both)  # no lock on a server: processes share it


def test_unreachable_server_is_a_clear_error() -> None:
    with pytest.raises(StoreError, match="chroma run"):
        Store(f"http://127.0.0.1:{free_port()}")


def test_creating_an_existing_collection_touches_nothing(db: str) -> None:
    s = Store(db, create=True)
    col = create(s, "digits")
    fill(col, n=20, dim=8)
    with pytest.raises(StoreError, match="already exists"):
        create(s, "digits")
    assert s.open("digits", partitioned=True).partition(0) is not None  # its label partitions are still there
    (row,) = s.open("digits", partitioned=True).query(np.zeros((1, 8), np.float32), 2, where={"label": 0})
    assert len(row) == 2


def test_a_failing_client_close_still_releases_the_lock(db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from lookalike.core.lock import is_locked_here

    s = Store(db, create=True)

    def broken() -> None:
        raise RuntimeError("close failed")

    monkeypatch.setattr(s._client, "close", broken)
    s.close()
    assert not is_locked_here(Path(db))


def test_large_k_queries_stay_under_chromas_sql_variable_limit(db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chroma reads a call's metadatas in one SQL statement (rows x k variables, at most 32,766): big k is split, or read by id."""
    s = Store(db, create=True)
    col = create(s, "digits", n_labels=0)  # no partitions: one collection answers
    vecs = fill(col, n=60, dim=16)
    want = col.query(vecs[:6], 25)
    calls: list[tuple[int, int, bool]] = []
    real = col._c.query

    def spy(**kw: object) -> object:
        calls.append((len(kw["query_embeddings"]), kw["n_results"], "metadatas" in kw["include"]))  # type: ignore[arg-type]
        return real(**kw)

    monkeypatch.setattr(col._c, "query", spy)
    monkeypatch.setattr(store_mod, "META_RESULTS", 50)  # so 6 x 25 results exceed it: 2 rows per call
    assert col.query(vecs[:6], 25) == want
    assert calls == [(2, 25, True)] * 3
    calls.clear()
    monkeypatch.setattr(store_mod, "META_RESULTS", 10)  # k above it: metadatas read afterwards by id
    got = col.query(vecs[:6], 25)
    assert got == want and all(n.metadata["split"] in ("train", "test") for row in got for n in row)
    assert calls == [(6, 25, False)]


def test_long_rankings_with_many_exclusions_equal_brute_force(db: str) -> None:
    """k above EXTRA with a third of the collection excluded (evaluate's R rankings): the probe widens, the answer stays exact."""
    s = Store(db, create=True)
    col = create(s, "digits", n_labels=0)
    vecs = fill(col, n=90, dim=16)
    ids = [f"mnist:{'test' if i % 3 == 0 else 'train'}:{i}" for i in range(90)]
    excluded = {i for i in ids if ":test:" in i}
    got = col.query(vecs[:4], 40, exclude=excluded, metadata=False)
    keep = np.array([i not in excluded for i in ids])
    for q, row in zip(vecs[:4], got):
        d = ((vecs[keep] - q) ** 2).sum(1)
        assert [n.id for n in row] == [np.array(ids)[keep][j] for j in np.argsort(d, kind="stable")[:40]]


def test_brute_force_stays_exact_where_float32_alone_would_not() -> None:
    """Candidates by float32 distances, ranked in float64: the answer equals a float64 brute force (ties by id), also
    for vectors whose norms dwarf their differences, where a float32 ranking is wrong."""
    rng = np.random.default_rng(0)
    vecs = (1000.0 + rng.normal(size=(400, 32)) * 0.05).astype(np.float32)
    vecs[7] = vecs[3]  # a tie: its two ids in id order
    ids = np.array([f"i{j:03d}" for j in rng.permutation(400)], dtype=object)
    queries = vecs[[3, 10, 20]].astype(np.float64) + rng.normal(size=(3, 32)) * 0.01
    base = store_mod.Base.of(ids, vecs)
    got = store_mod._nearest(queries, base, 5)
    float32_wrong = []
    for q, row in zip(queries, got):
        d2 = ((vecs.astype(np.float64) - q) ** 2).sum(1)
        want = np.lexsort((ids.astype(str), d2))[:5]
        assert [n.id for n in row] == [ids[j] for j in want]
        assert [n.distance for n in row] == pytest.approx(np.sqrt(d2[want]), rel=1e-9)
        approx = base.norms - 2 * (vecs @ q.astype(np.float32))  # what float32 alone would rank by
        float32_wrong.append(list(np.argsort(approx, kind="stable")[:5]) != list(want))
    assert any(float32_wrong)  # (the case is one where the float64 step matters)
    tie = store_mod._nearest(vecs[3:4], base, 2)[0]
    assert [n.id for n in tie] == sorted([ids[3], ids[7]]) and tie[0].distance == tie[1].distance == 0.0
    assert store_mod._nearest(queries, store_mod.Base.of(ids[:0], vecs[:0]), 3) == [[], [], []]
    # vectors of ordinary scale: the float64 step sees a few candidates, not all, and the answer is still exact
    plain = rng.normal(size=(3000, 32)).astype(np.float32)
    plain_ids = np.array([f"p{j:04d}" for j in range(3000)], dtype=object)
    plain_base = store_mod.Base.of(plain_ids, plain)
    q = plain[:5].astype(np.float64) + rng.normal(size=(5, 32)) * 0.3
    for qi, row in zip(q, store_mod._nearest(q, plain_base, 5)):
        d2 = ((plain.astype(np.float64) - qi) ** 2).sum(1)
        assert [n.id for n in row] == [plain_ids[j] for j in np.lexsort((plain_ids.astype(str), d2))[:5]]
        approx = plain_base.norms - 2 * (plain @ qi.astype(np.float32))
        slack = store_mod._margin(32) * ((qi**2).sum() + plain_base.norms.max())
        assert (approx <= np.sort(approx)[4] + 2 * slack).sum() < 50  # (the candidates ranked in float64)
    assert len(store_mod._nearest(queries[:1], base, 500)[0]) == 400  # k above the items: all of them


def test_a_warm_filters_kept_items_follow_writes(db: str) -> None:
    """A warm collection keeps a narrow filter's matching vectors between queries; a write (add, delete) is seen by
    the next query, and the kept answer equals the first."""
    s = Store(db, create=True)
    col = create(s, "digits")
    vecs = fill(col, 400, dim=16)
    col.keep_warm(load=True)
    assert col.warm
    where = {"label_name": "3", "split": "test"}  # 3% of the items (not a label filter: not the partitions)
    first = col.query(vecs[:2], 3, where)
    (kept,) = col._matched.values()
    assert col.query(vecs[:2], 3, where) == first and list(col._matched.values()) == [kept]  # (the same kept rows)
    near = vecs[0] + 1e-3
    col.add(["new:0"], near[None], [{"label": 3, "label_name": "3", "split": "test"}])
    assert col.query(vecs[:1], 3, where)[0][0].id == "new:0"
    col.delete(["new:0"])
    assert col.query(vecs[:2], 3, where) == first
    assert col.plan_counts["mirror"] == 7  # every query planned from the mirror
    s.close()


def test_brute_force_leaves_out_few_or_many_excluded_ids() -> None:
    """A few excluded ids (a search by a stored id) are asked beyond k and dropped; many (evaluate's held-out items)
    are taken out first: the same answer as brute force over the items left."""
    rng = np.random.default_rng(3)
    vecs = rng.random((300, 8), dtype=np.float32)
    ids = np.array([f"i{j:03d}" for j in range(300)], dtype=object)
    base = store_mod.Base.of(ids, vecs)
    q = vecs[:4]
    for excluded in ({"i000", "i001", "i002", "i003"}, {f"i{j:03d}" for j in range(0, 300, 3)}):
        keep = np.array([i not in excluded for i in ids])
        want = store_mod._nearest(q, store_mod.Base.of(ids[keep], vecs[keep]), 5)
        assert store_mod._nearest_excluding(q, base, 5, excluded) == want
        assert all(n.id not in excluded for row in want for n in row) and all(len(row) == 5 for row in want)


def test_without_mirrored_vectors_a_filters_vectors_are_read_once_and_follow_writes(db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A warm collection whose vectors do not fit the mirror reads a narrow filter's matching vectors by id once and
    keeps them; an add, then a delete, are seen by the next query; no query goes to Chroma's allow-list."""
    monkeypatch.setattr(store_mod, "MIRROR_VECTORS_MB", 0)
    s = Store(db, create=True)
    col = create(s, "digits")
    vecs = fill(col, 400, dim=16)
    col.keep_warm(load=True)
    assert col.warm and col._mirror is not None and col._mirror.vectors is None
    where = {"label_name": "3", "split": "test"}
    reads: list[int] = []
    real_get = col.get
    monkeypatch.setattr(col, "get", lambda ids, **kw: reads.append(len(ids)) or real_get(ids, **kw))
    first = col.query(vecs[:2], 3, where)
    assert col.query(vecs[:2], 3, where) == first and len(reads) == 1  # (read once, then kept)
    col.add(["new:0"], (vecs[0] + 1e-3)[None], [{"label": 3, "label_name": "3", "split": "test"}])
    assert col.query(vecs[:1], 3, where)[0][0].id == "new:0" and len(reads) == 2  # (the write dropped the kept vectors)
    col.delete(["new:0"])
    assert col.query(vecs[:2], 3, where) == first
    assert col.plan_counts["kept"] == 7 and col.plan_counts["allow-list"] == 0
    s.close()


def flat(pages: list[list[str]]) -> list[str]:
    return [i for page in pages for i in page]


def listing(col: store_mod.VectorCollection, where: dict[str, object] | None = None, limit: int = 7) -> list[list[str]]:
    """Every page of ``col`` by cursor, to the end."""
    pages, cursor = [], None
    while True:
        ids, metas, cursor = col.page(where, cursor, limit)
        assert len(ids) <= limit and len(metas) == len(ids)
        pages.append(ids)
        if cursor is None:
            return pages


def test_pages_by_cursor_follow_the_write_order_through_writes_and_reopening(db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    s = Store(db, create=True)
    col = create(s, "digits")
    fill(col, 30)
    written = [f"mnist:{'test' if i % 3 == 0 else 'train'}:{i}" for i in range(30)]
    pages = listing(col)
    assert [len(p) for p in pages] == [7, 7, 7, 7, 2] and flat(pages) == written  # no empty last page
    ids, metas, cursor = col.page(None, None, 7)
    assert ids == written[:7] and metas[3]["label"] == 3 and cursor is not None
    # writes between two pages: an item already listed and one still to come removed, one replaced, two added
    col.delete([written[2], written[20]])
    col.upsert([written[10]], np.zeros((1, 784), np.float32), [{"label": 0, "label_name": "0", "split": "train"}])
    col.add(["new:1", "new:2"], np.ones((2, 784), np.float32), [{"label": 1, "label_name": "1", "split": "train"}] * 2)
    rest = []
    while cursor is not None:
        ids, _, cursor = col.page(None, cursor, 7)
        rest += ids
    assert rest == [i for i in written[7:] if i != written[20]] + ["new:1", "new:2"]  # nothing skipped, nothing twice
    # a filtered page reads the index's ids a chunk at a time and looks at a bounded number of them
    monkeypatch.setattr(store_mod, "PAGE", 4)
    monkeypatch.setattr(store_mod, "SCAN_MAX", 8)
    label3 = [i for i in written if i not in (written[2], written[20]) and int(i.rsplit(":", 1)[1]) % 10 == 3]
    pages = listing(col, {"label": 3}, limit=2)
    assert flat(pages) == label3 and any(len(p) < 2 for p in pages[:-1])  # short pages that still go on
    assert flat(listing(col, {"$and": [{"label": 1}, {"split": "train"}]}, limit=50)) == [
        i for i in written if i.startswith("mnist:train") and int(i.rsplit(":", 1)[1]) % 10 == 1
    ] + ["new:1", "new:2"]
    ids, _, cursor = col.page(None, None, 5)
    s.close()
    again = Store(db).open("digits")  # another process later: the index and its cursors are kept
    assert again.page(None, cursor, 5)[0] == [i for i in written if i not in (written[2], written[20])][5:10]


def test_an_unfinished_or_missing_id_index_is_built_again_and_old_cursors_are_refused(db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from lookalike.core.idindex import FILE

    s = Store(db, create=True)
    col = create(s, "digits")
    fill(col, 20)
    expected = flat(listing(col))
    _, _, cursor = col.page(None, None, 5)

    def killed(*a: object, **k: object) -> None:  # Chroma wrote the batch, then the process died before the index heard
        real_add(*a, **k)
        raise KeyboardInterrupt

    real_add = col._c.add
    monkeypatch.setattr(col._c, "add", killed)
    with pytest.raises(KeyboardInterrupt):
        col.add(["late:1"], np.ones((1, 784), np.float32), [{"label": 2, "label_name": "2", "split": "train"}])
    monkeypatch.undo()
    s.close()
    s = Store(db)
    col = s.open("digits")
    assert flat(listing(col)) == [*expected, "late:1"]  # built again from Chroma's listing
    with pytest.raises(InputError, match="re-indexed since"):
        col.page(None, cursor, 5)  # a cursor of the index before: refused, not followed to the wrong place
    s.close()
    Path(db, FILE).unlink()  # a store of an earlier release has no index: the first page makes it
    for suffix in ("-wal", "-shm"):
        Path(db, FILE + suffix).unlink(missing_ok=True)
    s = Store(db)
    assert flat(listing(s.open("digits"))) == [*expected, "late:1"]
    s.rebuild("digits")  # a rebuilt collection has another UUID: indexed afresh, the old one's rows dropped
    assert flat(listing(s.open("digits"))) == [*expected, "late:1"]
    s.drop("digits")
    assert s._ids is not None and s._ids._conn().execute("SELECT COUNT(*) FROM ids").fetchone()[0] == 0
    with pytest.raises(InputError, match="not one this collection gave"):
        create(s, "fresh").page(None, "12.x", 5)


def test_writes_the_index_never_saw_are_found_and_a_failing_index_file_is_gone_without(db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from lookalike.core.idindex import FILE

    def chroma_ids(col: store_mod.VectorCollection) -> list[str]:
        return col._c.get(include=[])["ids"]

    meta = [{"label": 2, "label_name": "2", "split": "train"}]
    s = Store(db, create=True)
    col = create(s, "digits")
    fill(col, 12)
    flat(listing(col))

    def then_killed(real: Any) -> Any:
        def call(*a: object, **k: object) -> None:
            real(*a, **k)
            raise KeyboardInterrupt

        return call

    # an add killed after Chroma wrote it, then a delete killed likewise, then a write that finishes: the counts
    # come out equal, the ids do not; the index stays stale until built again
    monkeypatch.setattr(col._c, "add", then_killed(col._c.add))
    with pytest.raises(KeyboardInterrupt):
        col.add(["x1"], np.ones((1, 784), np.float32), meta)
    monkeypatch.undo()
    monkeypatch.setattr(col._c, "delete", then_killed(col._c.delete))
    with pytest.raises(KeyboardInterrupt):
        col.delete(["mnist:train:4"])
    monkeypatch.undo()
    col.add(["z"], np.ones((1, 784), np.float32), meta)
    s.close()
    s = Store(db)
    col = s.open("digits")
    assert flat(listing(col)) == chroma_ids(col) and "x1" in chroma_ids(col)
    # an earlier release writes without the index (one added, one removed: the same count): the last id tells
    old = store_mod.VectorCollection(col._c, s)
    old.add(["old:1"], np.ones((1, 784), np.float32), meta)
    old.delete(["mnist:train:5"])
    s.close()
    s = Store(db)
    col = s.open("digits")
    assert flat(listing(col)) == chroma_ids(col) and "old:1" in chroma_ids(col)
    s.close()
    Path(db, FILE).write_bytes(b"not a database" * 200)  # a damaged index file: the store goes on without it
    for suffix in ("-wal", "-shm"):
        Path(db, FILE + suffix).unlink(missing_ok=True)
    s = Store(db)
    col = s.open("digits")
    col.add(["after:1"], np.ones((1, 784), np.float32), meta)  # the write works (the file is given up and removed)
    assert not Path(db, FILE).exists()
    assert flat(listing(col)) == chroma_ids(col)  # paged by offset meanwhile
    assert [i for ids, _, _ in col.pages(vectors=False) for i in ids] == chroma_ids(col)
    s.close()
    s = Store(db)
    col = s.open("digits")
    assert flat(listing(col)) == chroma_ids(col) and Path(db, FILE).exists()  # the next process builds it again
