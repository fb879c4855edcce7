"""Export and import: a round trip local -> `chroma run` server -> local gives the same ids, vectors bit for bit,
metadata and record, check clean; an interrupted import resumes; an existing collection is never touched."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lookalike.analysis.check import check
from lookalike.core.gallery import Gallery
from lookalike.core.ingest import ingest
from lookalike.core.items import add_images
from lookalike.core.store import Store
from lookalike.core.transfer import export_collection, import_collection
from lookalike.errors import InputError
from lookalike.models.embedder import PixelEmbedder

from .conftest import chroma_run, make_digits, one_line_error
from .test_items import _png
from .test_sync import snapshot, write_digits


def _same(a: dict, b: dict) -> None:
    assert a["ids"] == b["ids"]
    assert a["vectors"].dtype == b["vectors"].dtype == np.float32
    assert a["vectors"].tobytes() == b["vectors"].tobytes()  # bit for bit
    assert a["partitions"] == b["partitions"]
    for x, y in zip(a["metas"], b["metas"]):
        assert x == y and all(type(x[k]) is type(y[k]) for k in x)  # an int stays an int, a float a float
    borrowed = {**a["record"], "protocol": {k: v for k, v in a["record"]["protocol"].items() if k != "files_borrowed"}}
    assert borrowed == b["record"]  # (an import borrows the exporter's folder of added images: it never deletes there)


def test_a_round_trip_through_a_chroma_server_is_bit_for_bit(
    tmp_path: Path, db: str, fake_embedder: PixelEmbedder, runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lookalike.core import transfer
    from lookalike.frontends.cli import app

    root = tmp_path / "F"
    write_digits(root, 30)
    side = tmp_path / "m.jsonl"
    side.write_text(json.dumps({"path": "0/000.png", "score": 1.0, "n": 1, "tags": ["sea", "sun"], "名前": "猫"}) + "\n")
    ingest("folder", str(root), embedder=fake_embedder, db=db, collection="live", metadata=str(side))
    with Gallery.open("live", db) as g:
        add_images(g, [("x.png", _png(make_digits(1, seed=5)[0][0]))], label="cats")
        g.save_note("lookalike_evaluation", {"accuracy": 0.5})
    original = snapshot(db, "live")
    first = tmp_path / "out" / "live.parquet"
    r = runner.invoke(app, ["export", "live", "--out", str(first), "--db", db])
    assert r.exit_code == 0 and "exported 91 items" in r.stdout, r.output
    with chroma_run(tmp_path / "server") as (_, url):
        r = runner.invoke(app, ["import", str(first), "--collection", "moved", "--db", url])
        assert r.exit_code == 0 and "imported 91 items into 'moved'" in r.stdout, r.output
        _same(snapshot(url, "moved"), original)
        assert snapshot(url, "moved")["record"]["protocol"]["files_borrowed"] is True
        with Store(url) as store:
            assert check(store, "moved", full=True).ok
        with Gallery.open("moved", url) as g:
            assert g.evaluation()["accuracy"] == 0.5  # the notes travel too
            second = export_collection(g, tmp_path / "back.parquet")
        assert second.items == 91
    monkeypatch.setattr(transfer, "PARTITIONS_LATER", 50)  # back home as a large import: the label partitions after the index
    r = runner.invoke(app, ["import", second.path, "--collection", "home", "--db", db])
    assert r.exit_code == 0, r.output
    _same(snapshot(db, "home"), original)
    with Store(db) as store:
        assert check(store, "home", full=True).ok
    again = runner.invoke(app, ["import", second.path, "--collection", "home", "--db", db])  # never over an existing one
    assert again.exit_code == 2 and "already exists" in one_line_error(again)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 nope")
    for args, needle in (
        (["import", str(bad), "--db", db], "not a Parquet file"),
        (["import", str(tmp_path / "none.parquet"), "--db", db], "no such file"),
        (["export", "live", "--out", str(tmp_path), "--db", db], "is a directory"),
        (["export", "nope", "--out", str(tmp_path / "n.parquet"), "--db", db], "no collection 'nope'"),
    ):
        r = runner.invoke(app, args)
        assert r.exit_code != 0 and needle in one_line_error(r), (args, r.output)


def test_an_interrupted_import_is_resumed_and_check_says_so(tmp_path: Path, db: str, fake_embedder: PixelEmbedder, monkeypatch) -> None:
    import lookalike.core.transfer as transfer

    root = tmp_path / "F"
    write_digits(root, 40)
    ingest("folder", str(root), embedder=fake_embedder, db=db, collection="live")
    with Gallery.open("live", db) as g:
        path = export_collection(g, tmp_path / "live.parquet").path
    original = snapshot(db, "live")
    other = str(tmp_path / "other")
    monkeypatch.setattr(transfer, "PAGE", 50)  # row groups of 50: the second one fails
    calls = {"n": 0}
    real_add = Gallery.add

    def failing(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as a process stopped mid-way
        return real_add(self, *a, **kw)

    monkeypatch.setattr(Gallery, "add", failing)
    with pytest.raises(KeyboardInterrupt):
        import_collection(path, db=other)
    monkeypatch.setattr(Gallery, "add", real_add)
    with Store(other) as store:
        report = check(store, "live")
        assert not report.ok and any("did not finish" in p for p in report.problems)
    r = import_collection(path, db=other)
    assert r.resumed and r.items == 120
    _same(snapshot(other, "live"), original)
    with Store(other) as store:
        assert check(store, "live", full=True).ok
    with pytest.raises(InputError, match="already exists"):
        import_collection(path, db=other)
