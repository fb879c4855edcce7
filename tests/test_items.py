"""Single images in and out: add (kept by content, labelled, with fields), remove (by id or filter), the CLI,
a sync that leaves added images alone, a warm collection that sees every write, and a remove killed halfway."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lookalike.analysis.check import check
from lookalike.core.gallery import Gallery
from lookalike.core.ingest import ingest, sync
from lookalike.core.items import add_images, list_items, remove_items
from lookalike.core.search import search
from lookalike.core.store import Store
from lookalike.errors import InputError
from lookalike.frontends.cli import app
from lookalike.models.embedder import PixelEmbedder

from .conftest import make_digits, one_line_error, write_npz
from .test_sync import _wait_for_lock, snapshot, write_digits


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def test_add_then_remove_single_images(tmp_path: Path, db: str, fake_embedder: PixelEmbedder) -> None:
    root = tmp_path / "F"
    write_digits(root, 5)
    ingest("folder", str(root), embedder=fake_embedder, db=db, collection="live")
    x, y = make_digits(40, seed=21)
    img = x[y == 1][0]
    f = tmp_path / "new one.png"
    f.write_bytes(_png(img))
    with Gallery.open("live", db) as g:
        g.keep_warm(load=True)
        assert "album" not in g.fields()  # (the mirror is loaded now: the writes below must reach it)
        r = add_images(g, [f, ("again.png", _png(img))], label="1", metadata=["album=Trip", "rating=4", "empty="])
        (item_id,) = set(r.ids)
        assert r.added == [item_id] and item_id.startswith("added:")  # the same content twice: stored once
        meta, vec = g.item(item_id, vector=True)
        assert meta["label"] == 1 and meta["split"] == "train" and meta["album"] == "Trip" and meta["rating"] == 4
        assert meta["filename"] == "new one.png" and meta["width"] == 28 and "empty" not in meta  # no value: no field
        kept = Path(g.record.protocol["files"]) / meta["file"]
        assert kept.read_bytes() == f.read_bytes() and kept.parent.parent == Path(db).resolve() / "lookalike-files" / "live"
        assert np.allclose(vec, g.embed([img])[0])
        (hit,) = search(g, vector=vec, k=1, where={"album": "Trip"})  # the warm mirror saw the write at once
        assert hit.id == item_id and g.images([meta])[0] is not None  # its thumbnail reads from the kept file
        assert add_images(g, [f], label="1").already_stored == [item_id]
        r2 = add_images(g, [("cat.png", _png(x[0]))], label="cats", metadata={"note": None})  # a new label is appended
        assert r2.new_labels == ["cats"] and g.label_names[-1] == "cats"
        assert g.item(r2.ids[0])[0]["label"] == len(g.label_names) - 1
        for bad, needle in (
            (lambda: add_images(g, [f]), "pass --label NAME"),
            (lambda: add_images(g, [("x.png", b"not an image")], label="1"), "x.png"),
            (lambda: add_images(g, [tmp_path / "missing.png"], label="1"), "cannot read"),
            (lambda: add_images(g, [f], label="1", metadata=["width=3"]), "lookalike fills itself"),
            (lambda: add_images(g, [f], label="1", metadata=["oops"]), "KEY=VALUE"),
            (lambda: remove_items(g), "give ids"),
            (lambda: remove_items(g, where=["nofield = 1"]), "has no field 'nofield'"),
        ):
            with pytest.raises(InputError, match=needle):
                bad()
        n = g.count()
        out = remove_items(g, [item_id, "folder:0/000.png", "nope"])
        assert out.removed == sorted([item_id, "folder:0/000.png"]) and out.missing == ["nope"]
        assert out.still_in_folder == ["folder:0/000.png"] and not kept.exists() and g.count() == n - 2
        assert "album" not in g.fields() and g.get([item_id])[0] == []
        assert remove_items(g, where=["label = 2"]).removed == [f"folder:2/{i:03d}.png" for i in range(5)]
    with Store(db) as store:
        assert check(store, "live", full=True).ok
    rep = sync("live", db)  # the folder's own items come back; the added cat stays (not the folder's)
    assert sum(rep.added.values()) == 6 and rep.gone == []
    with Gallery.open("live", db) as g:
        assert g.existing_ids([r2.ids[0]]) == {r2.ids[0]}


def test_add_and_remove_in_the_cli(tmp_path: Path, db: str, runner, fake_embedder: PixelEmbedder) -> None:
    path = write_npz(tmp_path / "d.npz", make_digits(60, seed=1), make_digits(10, seed=2))
    ingest("mnist", source=str(path), embedder=fake_embedder, db=db)
    x, _ = make_digits(3, seed=9)
    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.png")
        files[-1].write_bytes(_png(x[i]))
    r = runner.invoke(app, ["add", *map(str, files), "--label", "7", "--meta", "batch=b1", "--db", db])
    assert r.exit_code == 0, r.output
    assert "added 3 to 'mnist'" in r.stdout
    ids = [line.split()[0] for line in r.stdout.splitlines()[:3]]
    r = runner.invoke(app, ["search", "--id", ids[0], "--where", "batch = b1", "--k", "5", "--db", db, "--json"])
    assert r.exit_code == 0 and sorted(h["id"] for h in json.loads(r.stdout)) == sorted(ids[1:])
    bad = runner.invoke(app, ["add", str(files[0]), "--db", db])
    assert bad.exit_code == 2 and "--label" in one_line_error(bad)
    r = runner.invoke(app, ["remove", "--where", "batch = b1", "--db", db])
    assert r.exit_code == 0 and "removed 3" in r.stdout
    bad = runner.invoke(app, ["remove", "--db", db])
    assert bad.exit_code == 2 and "give ids" in one_line_error(bad)


def test_items_are_listed_a_page_at_a_time_with_filters(gallery: Gallery, db: str, runner) -> None:
    everything, cursor = [], None
    while True:
        page = list_items(gallery, cursor=cursor, limit=64)
        everything += page.items
        cursor = page.next_cursor
        if cursor is None:
            break
    ids = [it["id"] for it in everything]
    assert len(ids) == 250 == len(set(ids)) == gallery.count()
    assert all(it["label_name"] == gallery.label_name(it["label"]) and it["split"] in ("train", "test") for it in everything)
    sevens = list_items(gallery, labels=["7"], split="train", where=["index < 150"], limit=1000)
    assert sevens.next_cursor is None and [it["id"] for it in sevens.items] == [
        it["id"] for it in everything if it["label"] == 7 and it["split"] == "train" and it["metadata"]["index"] < 150
    ]
    for kwargs, message in (
        ({"limit": 0}, "--limit must be 1 to 1,000"),
        ({"limit": 1001}, "--limit must be 1 to 1,000"),
        ({"cursor": "abc"}, "start again without a cursor"),
        ({"where": ["colour = red"]}, "colour"),
        ({"labels": ["cat"]}, "cat"),
    ):
        with pytest.raises(InputError, match=message):
            list_items(gallery, **kwargs)
    gallery.close()
    r = runner.invoke(app, ["items", "--db", db, "--limit", "4"])
    lines = r.stdout.splitlines()
    assert r.exit_code == 0 and [line.split()[0] for line in lines[:4]] == ids[:4] and lines[4].startswith("next page: --cursor ")
    r = runner.invoke(app, ["items", "--db", db, "--limit", "4", "--cursor", lines[4].split()[-1], "--json"])
    assert r.exit_code == 0 and [it["id"] for it in json.loads(r.stdout)["items"]] == ids[4:8]
    r = runner.invoke(app, ["items", "--db", db, "--where", "index > 100000"])
    assert r.exit_code == 0 and r.stdout.strip() == "no items match the filters"
    for args, message in (
        (["--cursor", "12.34"], "start again without a cursor"),
        (["--where", "index >"], "index"),
        (["--limit", "0"], "--limit"),
    ):
        bad = runner.invoke(app, ["items", "--db", db, *args])
        assert bad.exit_code == 2 and message in one_line_error(bad), bad.output


def _cli_remove(db: str) -> subprocess.Popen[str]:
    args = ["remove", "--where", "index < 1200", "--where", "source = x_train", "--db", db]
    cmd = [sys.executable, "-c", "from lookalike.frontends.cli import main; main()", *args]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_a_remove_killed_halfway_then_run_again_leaves_everything_consistent(tmp_path: Path, fake_embedder: PixelEmbedder) -> None:
    """Killed (SIGKILL) at spread moments of its work, then run again: the collection and its label partitions end as
    after one uninterrupted remove, and check is clean."""
    path = write_npz(tmp_path / "d.npz", make_digits(3000, seed=1), make_digits(10, seed=2))
    ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
    for db in (ref, killed):
        ingest("mnist", source=str(path), embedder=fake_embedder, db=db)
    proc = _cli_remove(ref)
    locked = _wait_for_lock(proc, ref)
    assert proc.wait(timeout=120) == 0
    work = time.perf_counter() - locked
    states = []
    for fraction in (0.6, 0.7, 0.8):
        proc = _cli_remove(killed)
        _wait_for_lock(proc, killed)
        time.sleep(fraction * work)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        snap = snapshot(killed, "mnist")
        states.append((len(snap["ids"]), sum(len(p) for p in snap["partitions"].values())))
    assert _cli_remove(killed).wait(timeout=120) == 0
    want, got = snapshot(ref, "mnist"), snapshot(killed, "mnist")
    assert got["ids"] == want["ids"] and len(got["ids"]) == 3010 - 1200
    assert got["partitions"] == want["partitions"] and got["metas"] == want["metas"]
    with Store(killed) as store:
        assert check(store, "mnist", full=True).ok
    print("states after each kill (items, partition entries):", states, f"work {work:.2f} s")
