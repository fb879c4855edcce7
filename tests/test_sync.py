"""Living folders through a real store: a folder that grows and changes, new labels, unlabelled folders, a moved
folder, collections of an earlier release, and syncs killed at random moments (real processes)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from lookalike.analysis.audit import audit
from lookalike.analysis.check import check
from lookalike.analysis.evaluate import evaluate
from lookalike.analysis.explore import cluster, embedding_map
from lookalike.core.gallery import Gallery
from lookalike.core.ingest import ingest, sync
from lookalike.core.record import Record
from lookalike.core.search import search
from lookalike.core.store import Store
from lookalike.errors import MismatchError
from lookalike.frontends.cli import app
from lookalike.models.embedder import PixelEmbedder

from .conftest import make_digits, one_line_error


def write_digits(root: Path, per_label: int, start: int = 0, labels: tuple[int, ...] = (0, 1, 2), seed: int = 3) -> None:
    """``per_label`` digit PNGs in folders ``0/``, ``1/``, ``2/`` named ``{start + i:03d}.png``."""
    x, y = make_digits(40 * per_label, seed=seed)
    for lab in labels:
        d = root / str(lab)
        d.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(x[y == lab][:per_label]):
            Image.fromarray(img).save(d / f"{start + i:03d}.png")


def snapshot(db: str, name: str) -> dict:
    """Everything a collection holds: each item's vector and metadata, each label partition's ids, the record."""
    with Gallery.open(name, db) as g:
        ids, vecs, metas = g.collection().scan(vectors=True, dim=g.record.embedder.dim)
        parts = {}
        for label in range(len(g.label_names)):
            part = g.collection().partition(label)
            parts[label] = sorted(part.scan(vectors=False, metadatas=False)[0]) if part is not None else []
        record = json.loads(g.record.to_json())
    order = np.argsort(ids)
    return {
        "ids": [ids[i] for i in order],
        "vectors": vecs[order],
        "metas": [metas[i] for i in order],
        "partitions": parts,
        "record": record,
    }


def test_a_folder_that_grows_and_changes_is_mirrored(tmp_path: Path, db: str, fake_embedder: PixelEmbedder) -> None:
    """The experiment of the living-collections issue: 90 files, 90 more, one replaced, one deleted."""
    root = tmp_path / "F"
    write_digits(root, 30)
    first = ingest("folder", str(root), embedder=fake_embedder, db=db, collection="photos")
    assert first.stored == {"train": 72, "test": 18}
    with Gallery.open("photos", db) as g:
        split_before = {i: m["split"] for i, m in g.catalogue().items()}
    write_digits(root, 30, start=30, seed=4)
    x, y = make_digits(200, seed=9)
    Image.fromarray(x[y == 2][0]).save(root / "0" / "000.png")  # replaced by a "2"
    (root / "1" / "001.png").unlink()
    again = ingest("folder", str(root), embedder=fake_embedder, db=db, collection="photos")
    assert sum(again.added.values()) == 90 and again.updated == 1 and again.unchanged == 88
    assert again.gone == ["folder:1/001.png"] and again.removed == []
    pruned = ingest("folder", str(root), embedder=fake_embedder, db=db, collection="photos", prune=True)
    assert pruned.removed == ["folder:1/001.png"] and sum(pruned.added.values()) == 0 and pruned.updated == 0
    assert sum(pruned.stored.values()) == 179
    with Gallery.open("photos", db) as g:
        items = g.catalogue()
        assert len(items) == 179 and len({m["path"] for m in items.values()}) == 179  # no file twice
        assert all(split_before[i] == items[i]["split"] for i in split_before if i in items)  # nothing moved split
        for label in range(3):
            held = [m["split"] == "test" for m in items.values() if m["label"] == label]
            assert abs(np.mean(held) - 0.2) <= 1 / len(held)
        hits = search(g, image=root / "0" / "000.png", k=3)
        assert hits[0].id == "folder:0/000.png" and hits[0].distance < 1e-5 and hits[0].label_name == "0"
        everything = search(g, image=x[y == 1][0], k=178)
        assert "folder:1/001.png" not in {h.id for h in everything}
        report = audit(g, k=5)
        assert report.leaked_ids == [] and not any(grp.cross_split for grp in report.groups)
    with Store(db) as store:
        assert check(store, "photos", full=True).ok


def test_a_new_label_folder_is_appended_and_numbers_never_shift(tmp_path: Path, db: str, fake_embedder: PixelEmbedder) -> None:
    root = tmp_path / "F"
    write_digits(root, 12, labels=(1, 2))
    ingest("folder", str(root), embedder=fake_embedder, db=db)
    with Gallery.open(db=db) as g:
        before = {i: m["label"] for i, m in g.catalogue().items()}
        assert g.label_names == ["1", "2"]
    write_digits(root, 12, labels=(0,))  # "0" sorts before the others
    report = sync(db=db)
    assert report.new_labels == ["0"] and report.added["train"] + report.added["test"] == 12
    with Gallery.open(db=db) as g:
        assert g.label_names == ["1", "2", "0"]
        items = g.catalogue()
        assert all(items[i]["label"] == lab for i, lab in before.items())
        assert {m["label"] for i, m in items.items() if i.startswith("folder:0/")} == {2}
        hits = search(g, id="folder:0/001.png", k=3, labels=["0"])  # through the new label's partition
        assert len(hits) == 3 and all(h.label_name == "0" for h in hits)
    with Store(db) as store:
        report = check(store)
        assert report.ok and report.partitions == {"1": 12, "2": 12, "0": 12}


def test_an_unlabelled_folder_is_ingested_searched_audited_and_mapped(
    tmp_path: Path, db: str, fake_embedder: PixelEmbedder, runner: CliRunner
) -> None:
    root = tmp_path / "photos"
    x, _ = make_digits(60, seed=5)
    (root / "2024" / "trip").mkdir(parents=True)
    for i, img in enumerate(x):
        Image.fromarray(img).save((root if i % 2 else root / "2024" / "trip") / f"{i:02d}.png")
    Image.fromarray(x[0]).save(root / "copy-of-00.png")  # an exact duplicate
    report = ingest("folder", str(root), embedder=fake_embedder, db=db, collection="album")
    assert sum(report.stored.values()) == 61 and report.new_labels == []
    with Gallery.open("album", db) as g:
        assert not g.record.labelled and g.label_names == []
        hits = search(g, id="folder:copy-of-00.png", k=2)
        assert hits[0].id == "folder:2024/trip/00.png" and hits[0].label_name == "unlabelled"
        found = audit(g, k=3)
        assert found.suspects == [] and not found.labelled and found.accuracy is None
        assert any(set(grp.ids) == {"folder:copy-of-00.png", "folder:2024/trip/00.png"} for grp in found.groups)
        assert len(found.outliers) == 10
        ev = evaluate(g)
        assert np.isnan(ev.accuracy) and ev.recall_at_1 == 1.0 and ev.retrieval["unlabelled"]
        result = embedding_map(g, method="pca")
        assert len(result.points.ids) == 61
        from lookalike.analysis.explore import save_map_picture

        assert save_map_picture(result, tmp_path / "map.png").stat().st_size > 5000
        clusters = cluster(g, k=3)
        assert clusters.clusters.shape == (61,) and clusters.adjusted_rand is None
    out = runner.invoke(app, ["search", "--id", "folder:00.png" if (root / "00.png").exists() else "folder:01.png", "--db", db])
    assert out.exit_code == 0 and "unlabelled" in out.stdout
    ev_cli = runner.invoke(app, ["evaluate", "--db", db])
    assert ev_cli.exit_code == 0 and "unlabelled: no labels" in ev_cli.stdout
    bad = runner.invoke(app, ["search", "--id", "folder:01.png", "--label", "3", "--db", db])
    assert bad.exit_code == 2 and "unlabelled" in one_line_error(bad)
    with Store(db) as store:
        assert check(store).ok


def test_a_moved_folder_is_pointed_at_without_embedding(tmp_path: Path, db: str, fake_embedder: PixelEmbedder) -> None:
    root = tmp_path / "F"
    write_digits(root, 6)
    ingest("folder", str(root), embedder=fake_embedder, db=db)
    moved = tmp_path / "elsewhere" / "G"
    moved.parent.mkdir()
    shutil.copytree(root, moved)  # copied: new modification times, same bytes
    shutil.rmtree(root)
    with pytest.raises(MismatchError, match="--relocate"):
        ingest("folder", str(moved), embedder=fake_embedder, db=db)
    with pytest.raises(Exception, match="none of the collection's files"):
        sync(db=db, relocate=str(tmp_path))
    report = sync(db=db, relocate=str(moved))
    assert report.relocated_from == str(root) and sum(report.added.values()) == 0 and report.updated == 0
    assert report.unchanged == 18 and report.gone == []
    with Gallery.open(db=db) as g:
        assert g.record.protocol["root"] == str(moved)
        _, _, metas = g.get(["folder:1/002.png"])
        (image,) = g.images(metas)
        assert image is not None and image.shape == (28, 28)
    assert sync(db=db).unchanged == 18  # the fast check holds again: nothing hashed, nothing embedded


def write_legacy_collection(db: str, root: Path, embedder: PixelEmbedder) -> dict[str, np.ndarray]:
    """A folder collection as the release before living folders wrote it: record schema 2, mode "stratified",
    ids ``folder:SPLIT:PATH``, label partitions; one file stored under both splits (that release's bug).
    Returns each stored id's vector."""
    from lookalike.data.datasets import stratified_pick
    from lookalike.data.images import read_image

    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    names = sorted({f.split("/")[0] for f in files})
    labels = np.array([names.index(f.split("/")[0]) for f in files])
    test = set(stratified_pick(labels, round(0.2 * len(files)), 1).tolist())
    ids, metas = [], []
    for i, f in enumerate(files):
        split = "test" if i in test else "train"
        ids.append(f"folder:{split}:{f}")
        metas.append({"label": int(labels[i]), "label_name": names[labels[i]], "split": split, "dataset": "folder", "path": f})
    dup = next(i for i in range(len(files)) if i not in test)  # the bug: a later ingest stored it again as test
    ids.append(f"folder:test:{files[dup]}")
    metas.append({**metas[dup], "split": "test"})
    vectors = embedder.embed([read_image(root / m["path"]) for m in metas]).astype(np.float32)
    protocol = {"dataset": "folder", "mode": "stratified", "limit": None, "test_size": None, "seed": 0, "root": str(root)}
    record = Record(embedder.spec, protocol, names, label_partitions=True, schema=2)
    with Store(db, create=True) as store:
        col = store.create("old", record.to_json(), True)
        col.add(ids, vectors, metas)
    return dict(zip(ids, vectors))


def test_a_collection_of_the_earlier_release_answers_then_upgrades_in_place(tmp_path: Path, db: str, fake_embedder: PixelEmbedder) -> None:
    root = tmp_path / "F"
    write_digits(root, 10)
    old = write_legacy_collection(db, root, fake_embedder)
    some_id = next(i for i in old if i.startswith("folder:test:"))
    with Gallery.open("old", db) as g:  # opens and answers as before
        assert g.record.schema == 2 and g.record.legacy_folder
        assert len(search(g, id=some_id, k=3, labels=["1"])) == 3
    with Store(db) as store:
        before = check(store, "old")
        assert not before.ok and any("two ids" in p for p in before.problems) and "lookalike sync" in before.fix
    with pytest.raises(MismatchError, match="limit=None not 5"):  # refused before anything is rewritten
        ingest("folder", str(root), embedder=fake_embedder, db=db, collection="old", limit=5)
    with Gallery.open("old", db) as g:
        assert g.record.legacy_folder and g.count() == 31
    report = sync("old", db)
    assert report.upgraded == 30 and sum(report.added.values()) == 0 and report.updated == 0 and report.unchanged == 30
    with Gallery.open("old", db) as g:
        assert g.record.living and g.record.schema == 3 and g.count() == 30
        items = g.catalogue()
        _, vecs, metas = g.get(sorted(items), vectors=True)
        for id_, vec, meta in zip(sorted(items), vecs, metas):
            legacy = f"folder:{meta['split']}:{meta['path']}"
            assert id_ == f"folder:{meta['path']}" and np.array_equal(vec, old[legacy])  # the same vector, the same split
            assert len(meta["sha256"]) == 64
    with Store(db) as store:
        assert check(store, "old", full=True).ok
    write_digits(root, 3, start=10, seed=8)  # and it syncs as a living folder from now on
    assert sum(sync("old", db).added.values()) == 9


def _cli_sync(root: Path, db: str) -> subprocess.Popen[str]:
    args = ["ingest", "folder", str(root), "--embedder", "pixels", "--collection", "live", "--db", db, "--prune", "--batch-size", "8"]
    return subprocess.Popen(
        [sys.executable, "-c", "from lookalike.frontends.cli import main; main()", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_lock(proc: subprocess.Popen[str], db: str) -> float:
    """The moment ``proc`` holds the store's lock (it has opened the store: from here on it plans and writes)."""
    lock = Path(db) / "lookalike.lock"
    deadline = time.perf_counter() + 120
    while time.perf_counter() < deadline and proc.poll() is None:
        try:
            if f"{proc.pid}" in lock.read_text():
                return time.perf_counter()
        except OSError:
            pass
        time.sleep(0.005)
    return time.perf_counter()


def _kill_and_resume(tmp_path: Path, kills: int) -> None:
    """A sync that adds, updates and removes, killed (SIGKILL) ``kills`` times at spread moments, then run to its
    end: the collection equals an uninterrupted sync's, and check is clean."""
    root = tmp_path / "F"
    write_digits(root, 40)
    base = str(tmp_path / "base")
    assert _cli_sync(root, base).wait(timeout=120) == 0
    write_digits(root, 40, start=40, seed=6)  # 120 new files
    x, y = make_digits(400, seed=11)
    for i in range(0, 40, 4):
        Image.fromarray(x[y == 2][i]).save(root / "0" / f"{i:03d}.png")  # 10 changed
    for i in range(1, 40, 4):
        (root / "1" / f"{i:03d}.png").unlink()  # 10 removed
    ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
    shutil.copytree(base, ref)
    shutil.copytree(base, killed)
    proc = _cli_sync(root, ref)
    locked = _wait_for_lock(proc, ref)
    assert proc.wait(timeout=120) == 0, proc.stderr.read() if proc.stderr else ""
    work = time.perf_counter() - locked  # from opening the store (planning, writing) to the end
    rng = np.random.default_rng(kills)
    outcomes = []
    for moment in sorted(rng.uniform(0.0, 1.0, kills) * work):
        proc = _cli_sync(root, killed)
        _wait_for_lock(proc, killed)
        time.sleep(moment)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        outcomes.append(proc.wait(timeout=60))
    assert -signal.SIGKILL in outcomes  # at least one was killed in the middle of its work
    proc = _cli_sync(root, killed)
    assert proc.wait(timeout=120) == 0, proc.stderr.read() if proc.stderr else ""
    want, got = snapshot(ref, "live"), snapshot(killed, "live")
    assert got["ids"] == want["ids"] and len(got["ids"]) == 230
    assert np.array_equal(got["vectors"], want["vectors"])
    assert got["metas"] == want["metas"] and got["partitions"] == want["partitions"] and got["record"] == want["record"]
    with Store(killed) as store:
        report = check(store, "live", full=True)
        assert report.ok, report.problems


@pytest.mark.slow
def test_a_sync_killed_at_random_moments_ends_as_an_uninterrupted_one(tmp_path: Path) -> None:
    _kill_and_resume(tmp_path, kills=3)


@pytest.mark.slow
def test_a_sync_killed_many_times_ends_as_an_uninterrupted_one(tmp_path: Path) -> None:
    _kill_and_resume(tmp_path, kills=12)


def test_churn_keeps_every_item_findable_or_check_says_so_and_repair_mends_it(
    tmp_path: Path, db: str, fake_embedder: PixelEmbedder
) -> None:
    """Rounds of changing, deleting and adding files: every live item finds itself after each sync (the full
    check), or check names the loss and --repair rebuilds the index from the stored vectors."""
    root = tmp_path / "F"
    write_digits(root, 60)
    ingest("folder", str(root), embedder=fake_embedder, db=db)
    rng = np.random.default_rng(0)
    x, y = make_digits(4000, seed=21)
    fresh = iter(range(100, 10_000))
    for _ in range(4):
        files = sorted(root.rglob("*.png"))
        picks = rng.permutation(len(files))
        for j in picks[:18]:
            lab = int(files[j].parent.name)
            Image.fromarray(x[y == lab][int(rng.integers(0, 300))]).save(files[j])
        for j in picks[18:36]:
            files[j].unlink()
        for j in picks[36:54]:
            lab = int(files[j].parent.name)
            Image.fromarray(x[y == lab][int(rng.integers(0, 300))]).save(root / str(lab) / f"{next(fresh):05d}.png")
        report = sync(db=db, prune=True)
        assert len(report.removed) == 18 and report.updated == 18 and sum(report.added.values()) == 18
        with Store(db) as store:
            found = check(store, full=True)
            if not found.ok:
                from lookalike.analysis.check import repair

                assert any("does not find" in p for p in found.problems), found.problems
                assert repair(store).ok
    with Store(db) as store:
        store.rebuild(store.pick(None))  # the rebuild itself keeps every item, vector and record
        assert check(store, full=True).ok
    with Gallery.open(db=db) as g:
        assert g.count() == 180 and g.record.living


def test_an_unlabelled_collection_in_the_service_and_the_app(
    tmp_path: Path, db: str, fake_embedder: PixelEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    from streamlit.testing.v1 import AppTest

    import lookalike.frontends.app as app_module
    from lookalike.errors import InputError
    from lookalike.frontends.service import Service

    root = tmp_path / "album"
    x, _ = make_digits(30, seed=5)
    root.mkdir()
    for i, img in enumerate(x):
        Image.fromarray(img).save(root / f"{i:02d}.png")
    ingest("folder", str(root), embedder=fake_embedder, db=db, collection="album")
    with Gallery.open("album", db) as g:
        from lookalike.analysis.evaluate import save_report

        save_report(g, evaluate(g))
    buf = io.BytesIO()
    Image.fromarray(x[4]).save(buf, format="PNG")
    with Service(db) as service:
        (info,) = service.collections()
        assert info["labelled"] is False and info["label_names"] == []
        answer = service.search("album", image=buf.getvalue(), k=3)
        assert answer.hits[0].id == "folder:04.png" and answer.hits[0].label_name == "unlabelled"
        assert service.item("album", "folder:04.png").label_name == "unlabelled"
        with pytest.raises(InputError, match="unlabelled"):
            service.search("album", id="folder:04.png", k=3, labels=["1"])
    monkeypatch.setenv("LOOKALIKE_DB", db)
    monkeypatch.setenv("LOOKALIKE_CACHE", str(tmp_path / "cache"))
    for page in ("Search", "Map", "Evaluation", "Clusters", "Audit"):
        at = AppTest.from_file(str(Path(app_module.__file__)), default_timeout=120)
        at.query_params["page"] = page
        if page == "Search":
            at.query_params["id"] = "folder:04.png"
        at.run()
        assert not at.exception, (page, at.exception)
        if page == "Search":
            assert any("unlabelled collection" in c.value for c in at.caption) and at.get("image")
        if page == "Evaluation":
            assert {m.label for m in at.metric} >= {"recall@1", "held-out queries"}
