"""Sidecar metadata: typed rows, refusals naming the row before anything is written, edits applied by a sync."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lookalike.core.gallery import Gallery
from lookalike.core.ingest import ingest, sync
from lookalike.core.search import search
from lookalike.data.filters import parse_where
from lookalike.data.sidecar import parse_fields, read_sidecar
from lookalike.errors import InputError
from lookalike.models.embedder import PixelEmbedder

from .test_sync import snapshot, write_digits


def test_csv_and_jsonl_rows_are_typed(tmp_path: Path) -> None:
    csv = tmp_path / "m.csv"
    csv.write_text('path,album,rating,score,fav,tags\n0/000.png,Holidays 2024,4,2.5,true,"[""beach"", ""sun""]"\n0/001.png,,3,1,false,\n')
    got = read_sidecar(csv)
    assert got.rows["0/000.png"] == {"album": "Holidays 2024", "rating": 4, "score": 2.5, "fav": True, "tags": ["beach", "sun"]}
    assert got.rows["0/001.png"] == {"rating": 3, "score": 1, "fav": False}  # an empty cell: no value
    zero = tmp_path / "z.csv"
    zero.write_text("path,code,n\na.png,007,0\nb.png,01234,10\n")  # a leading zero: text (a code, a postcode)
    assert read_sidecar(zero).rows == {"a.png": {"code": "007", "n": 0}, "b.png": {"code": "01234", "n": 10}}
    assert got.columns == ["album", "fav", "rating", "score", "tags"]
    jl = tmp_path / "m.jsonl"
    jl.write_text(json.dumps({"id": "folder:0/000.png", "名前": "猫", "n": 1.5, "tags": ["a"]}) + "\n\n")
    assert read_sidecar(jl).rows == {"folder:0/000.png": {"名前": "猫", "n": 1.5, "tags": ["a"]}}
    assert parse_fields(["rating=4", "album=Old photos", 'tags=["x","y"]', "ok=TRUE"]) == {
        "rating": 4,
        "album": "Old photos",
        "tags": ["x", "y"],
        "ok": True,
    }


@pytest.mark.parametrize(
    ("text", "suffix", "needle"),
    [
        ("path,rating\na.png,4\nb.png,good\n", ".csv", "line 3: column 'rating' holds text 'good' where line 2 holds number"),
        ("path,width\na.png,4\n", ".csv", "'width' is one lookalike fills itself"),
        ("path,$x\na.png,4\n", ".csv", "cannot be stored"),
        ("path,a\na.png,1\na.png,2\n", ".csv", "given twice (also line 2)"),
        ("name,a\na.png,1\n", ".csv", "no 'path' (or 'id') column"),
        ('{"path": "a.png", "d": {"x": 1}}\n', ".jsonl", "line 1: 'd' is dict"),
        ('{"path": "a.png", "t": [1, "x"]}\n', ".jsonl", "list of mixed"),
        ('{"path": "a.png"}\n{oops\n', ".jsonl", "line 2 is not JSON"),
        ("path,a\n", ".txt", "use a .csv or .jsonl file"),
        ('{"path": "a.png", "t": [1, 2.5]}\n', ".jsonl", "mixed types (float, int)"),
        ('{"path": "a.png", "n": 99999999999999999999}\n', ".jsonl", "beyond 64-bit integers"),
    ],
)
def test_bad_sidecars_are_refused_naming_the_row(tmp_path: Path, text: str, suffix: str, needle: str) -> None:
    p = tmp_path / f"m{suffix}"
    p.write_text(text)
    with pytest.raises(InputError, match=None) as err:
        read_sidecar(p)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_sidecar_is_stored_filtered_on_and_edits_need_no_embedding(tmp_path: Path, db: str, fake_embedder: PixelEmbedder) -> None:
    root = tmp_path / "F"
    write_digits(root, 4)
    side = tmp_path / "meta.csv"
    side.write_text('path,album,rating,tags\n0/000.png,Beach,5,"[""sea"", ""sun""]"\n1/001.png,Home,2,\n')
    ingest("folder", str(root), embedder=fake_embedder, db=db, collection="live", metadata=str(side))
    with Gallery.open("live", db) as g:
        meta, _ = g.item("folder:0/000.png")
        assert meta["album"] == "Beach" and meta["rating"] == 5 and meta["tags"] == ["sea", "sun"]
        hits = search(g, id="folder:2/000.png", k=5, where=parse_where(["tags has sun"]))
        assert [h.id for h in hits] == ["folder:0/000.png"]
        assert {h.id for h in search(g, id="folder:2/000.png", k=5, where=parse_where(["rating >= 2"]))} == {
            "folder:0/000.png",
            "folder:1/001.png",
        }
        assert g.record.protocol["metadata"] == str(side.resolve())
    before = snapshot(db, "live")
    # edit: a value changes, a column goes, a row goes, a row comes; `sync` reads the recorded file again
    side.write_text("path,album\n0/000.png,Beach 2024\n2/003.png,Zoo\n")
    rep = sync("live", db)
    assert rep.metadata_updated == 3 and sum(rep.added.values()) == 0 and rep.updated == 0
    after = snapshot(db, "live")
    assert (after["vectors"] == before["vectors"]).all()  # nothing re-embedded
    metas = dict(zip(after["ids"], after["metas"]))
    assert metas["folder:0/000.png"]["album"] == "Beach 2024" and "rating" not in metas["folder:0/000.png"]
    assert "tags" not in metas["folder:0/000.png"] and "album" not in metas["folder:1/001.png"]
    assert metas["folder:2/003.png"]["album"] == "Zoo"
    assert metas["folder:0/000.png"]["width"] == 28  # the file's own fields stay
    assert sync("live", db).metadata_updated == 0  # unchanged: nothing to write
    (root / "2" / "003.png").unlink()  # a photo deleted: its row is skipped, the sync goes on (its fields kept while stored)
    rep = sync("live", db)
    assert rep.gone == ["folder:2/003.png"] and rep.metadata_updated == 0
    # a row naming no image: one line, nothing written
    side.write_text("path,album\n0/000.png,X\nnope/1.png,Y\n")
    with pytest.raises(InputError, match=r"line 3: 'nope/1\.png' names no image of the folder"):
        sync("live", db)
    assert snapshot(db, "live")["metas"] == after["metas"]
    with pytest.raises(InputError, match="--metadata are for folders"):
        ingest("mnist-sample", embedder=fake_embedder, db=db, metadata=str(side))
