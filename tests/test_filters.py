"""Metadata filters: the --where language, the client-side matcher against Chroma's own, and exact filtered search
at every selectivity (against brute force over the matching items)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lookalike.core.gallery import Gallery
from lookalike.core.ingest import ingest
from lookalike.core.search import search
from lookalike.data.filters import matches, parse_where
from lookalike.errors import InputError
from lookalike.frontends.cli import app

from .conftest import make_digits, one_line_error, write_npz


def test_expressions_parse_to_chromas_where_form() -> None:
    assert parse_where(["width >= 1000"]) == {"width": {"$gte": 1000}}
    assert parse_where(['camera = "Pixel 7"', "split in [train, test]"]) == {
        "$and": [{"camera": {"$eq": "Pixel 7"}}, {"split": {"$in": ["train", "test"]}}]
    }
    assert parse_where(["path not in ['a b.png', c]"]) == {"path": {"$nin": ["a b.png", "c"]}}
    assert parse_where(["size between 10 and 2.5e3"]) == {"$and": [{"size": {"$gte": 10}}, {"size": {"$lte": 2500.0}}]}
    day = parse_where(["taken between 2024-01-01 and 2024-01-01"])  # both days included: the whole day
    assert day == {"$and": [{"taken": {"$gte": 1704067200}}, {"taken": {"$lte": 1704067200 + 86399}}]}
    assert parse_where(["ok = true", "n != -3"]) == {"$and": [{"ok": {"$eq": True}}, {"n": {"$ne": -3}}]}
    assert parse_where(["名前 = 猫"]) == {"名前": {"$eq": "猫"}}
    assert parse_where([]) is None
    for bad in ("width", "width >= big", "w ~ 3", "x in 3", "x between 1 2", "= 3", "x = ", 'x = "open'):
        with pytest.raises(InputError):
            parse_where([bad])


def test_the_matcher_agrees_with_chroma(tmp_path: Path, db: str, fake_embedder) -> None:
    """The store filters a probe's answers itself (see VectorCollection.query): it must keep exactly what Chroma would."""
    path = write_npz(tmp_path / "d.npz", make_digits(120, seed=1), make_digits(30, seed=2))
    ingest("mnist", source=str(path), embedder=fake_embedder, db=db)
    filters = [
        {"index": {"$lt": 17}},
        {"index": {"$gte": 100}},
        {"$and": [{"label": {"$in": [1, 2, 3]}}, {"split": "train"}]},
        {"$or": [{"label_name": {"$eq": "4"}}, {"index": {"$lte": 2}}]},
        {"source": {"$ne": "x_test"}},
        {"label": {"$nin": [0, 9]}},
        {"index": {"$gt": 5.5}},
    ]
    with Gallery.open(db=db) as g:
        col = g.collection()
        ids, _, metas = col.scan(vectors=False)
        for where in filters:
            chroma = set(col._c.get(where=where, include=[])["ids"])
            ours = {i for i, m in zip(ids, metas) if matches(m, where)}
            assert ours == chroma, where


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> str:
    from lookalike.models.embedder import PixelEmbedder, make_spec

    root = tmp_path_factory.mktemp("filters")
    path = write_npz(root / "d.npz", make_digits(2000, seed=7), make_digits(40, seed=8))
    db = str(root / "db")
    ingest("mnist", source=str(path), embedder=PixelEmbedder(make_spec("pixels", input_size=8, normalize="l2")), db=db)
    return db


@pytest.mark.parametrize("warm", ["cold", "mirror", "no vectors", "no vectors, kept"])
@pytest.mark.parametrize("share", [0.5, 0.1, 0.01, 0.001])
def test_filtered_search_is_exact_at_every_selectivity(big: str, share: float, warm: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The k nearest among the matching items, as brute force over them finds them; fewer than k when fewer match.
    Cold (a command: probe, then brute force or Chroma's where) and warm (the service: planned from the mirror,
    with its vectors or, when they do not fit, reading the matching ones by id once and keeping them, or past
    EXACT_MAX searching Chroma's id allow-list)."""
    import lookalike.core.store as store_mod

    n_match = max(1, round(share * 2000))
    where = {"$and": [{"source": "x_train"}, {"index": {"$lt": n_match}}]}
    if warm.startswith("no vectors"):
        monkeypatch.setattr(store_mod, "MIRROR_VECTORS_MB", 0)
    if warm == "no vectors":  # the 1% filter (20 items) goes to the allow-list
        monkeypatch.setattr(store_mod, "EXACT_MAX", 10)
    with Gallery.open(db=big) as g:
        if warm != "cold":
            g.keep_warm(load=True)
        ids, vecs, metas = g.collection().scan(vectors=True, dim=g.record.embedder.dim)
        rows = [i for i, m in enumerate(metas) if matches(m, where)]
        assert len(rows) == n_match
        for q_id in [f"mnist:test:{i}" for i in range(0, 40, 4)]:
            queries = g.vector(q_id)
            d = np.sqrt(((vecs[rows] - queries) ** 2).sum(1))
            want = [ids[rows[j]] for j in np.lexsort((np.array([ids[r] for r in rows]), d))[:10]]
            got = search(g, id=q_id, k=10, where=where)
            assert [h.id for h in got] == want, (share, q_id)
            assert len(got) == min(10, n_match)
            assert all(matches(h.metadata, where) and h.metadata == metas[ids.index(h.id)] for h in got)
        plans = g.collection().plan_counts
        if warm == "mirror":
            assert plans["overfetch" if share >= 0.1 else "mirror"] > 0
        elif warm == "no vectors":
            assert plans["overfetch" if share >= 0.1 else "allow-list" if share == 0.01 else "kept"] > 0
        elif warm == "no vectors, kept":
            assert plans["overfetch" if share >= 0.1 else "kept"] > 0 and plans["allow-list"] == 0
        # the same through a label partition (label filter plus a metadata filter)
        label_rows = [i for i in rows if metas[i]["label"] == 3]
        got = search(g, id="mnist:test:1", k=5, labels=[3], where=where)
        q = g.vector("mnist:test:1")
        d = np.sqrt(((vecs[label_rows] - q) ** 2).sum(1)) if label_rows else np.zeros(0)
        assert [h.id for h in got] == [ids[label_rows[j]] for j in np.argsort(d, kind="stable")[:5]]


def test_a_warm_collection_reads_unfiltered_hits_metadata_from_its_mirror(big: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with Gallery.open(db=big) as g:
        cold = [search(g, id=f"mnist:test:{i}", k=8) for i in range(5)]
        g.keep_warm(load=True)
        col = g.collection()
        asked: list[list[str]] = []
        real = col._c.query
        monkeypatch.setattr(col._c, "query", lambda *a, **kw: asked.append(kw["include"]) or real(*a, **kw))
        warm = [search(g, id=f"mnist:test:{i}", k=8) for i in range(5)]
        assert asked and all("metadatas" not in inc for inc in asked)  # not read from Chroma ...
        assert [[(h.id, h.metadata) for h in hits] for hits in warm] == [[(h.id, h.metadata) for h in hits] for hits in cold]
        assert all({"split", "label", "index"} <= set(h.metadata) for hits in warm for h in hits)  # ... yet there, as stored


def test_where_in_the_cli_and_the_service(big: str) -> None:
    from lookalike.frontends.service import Service

    runner = CliRunner()
    r = runner.invoke(
        app, ["search", "--id", "mnist:test:3", "--k", "3", "--where", "index < 5", "--where", "source = x_train", "--db", big]
    )
    assert r.exit_code == 0, r.output
    shown = [line.split()[1] for line in r.stdout.splitlines()[1:]]
    assert len(shown) == 3 and all(int(i.rsplit(":", 1)[1]) < 5 for i in shown)
    none = runner.invoke(app, ["search", "--id", "mnist:test:3", "--where", "index > 99999", "--db", big])
    assert none.exit_code == 0 and "no items match the filters" in none.stdout  # matching nothing is no error
    bad = runner.invoke(app, ["search", "--id", "mnist:test:3", "--where", "camera = x", "--db", big])
    assert bad.exit_code == 2 and "has no field 'camera'" in one_line_error(bad) and "index" in one_line_error(bad)
    bad = runner.invoke(app, ["search", "--id", "mnist:test:3", "--where", "index <", "--db", big])
    assert bad.exit_code == 2 and "--where" in one_line_error(bad)
    with Service(big) as service:
        a = service.search("mnist", id="mnist:test:3", k=3, where=["index < 5", "source = x_train"])
        b = service.search("mnist", id="mnist:test:3", k=3, where={"$and": [{"index": {"$lt": 5}}, {"source": "x_train"}]})
        assert [h.id for h in a.hits] == [h.id for h in b.hits] == shown
        with pytest.raises(InputError, match="where must be"):
            service.search("mnist", id="mnist:test:3", k=3, where=5)
        with pytest.raises(InputError, match="unknown filter operator"):
            service.search("mnist", id="mnist:test:3", k=3, where={"index": {"$regex": "1"}})
        with pytest.raises(InputError, match="unknown filter operator"):  # checked in every clause, not only the first
            service.search("mnist", id="mnist:test:3", k=3, where={"$and": [{"index": {"$gt": 10**9}}, {"index": {"$regex": "1"}}]})
        with pytest.raises(InputError, match="compares numbers only"):  # a range on a string: refused, as Chroma does
            service.items("mnist", where={"index": {"$gt": "x"}})
        page = service.items("mnist", where={"$and": [{"index": {"$lt": 5}}, {"source": "x_train"}]}, limit=3)
        assert [it["metadata"]["index"] for it in page.items] == [0, 1, 2] and page.next_cursor is not None


def _photo(path: Path, shade: int, when: str | None, model: str, gps: tuple[float, float] | None = None) -> None:
    from PIL import Image

    img = Image.fromarray(np.full((30, 40, 3), shade, np.uint8))
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x0112] = "Google", model, 1
    if when:
        exif.get_ifd(0x8769)[0x9003] = when
    if gps:
        ifd = exif.get_ifd(0x8825)
        ifd[1], ifd[2], ifd[3], ifd[4] = "N", (gps[0], 0.0, 0.0), "E", (gps[1], 0.0, 0.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, exif=exif, quality=95)


def test_a_folders_own_fields_are_stored_and_filtered_on(tmp_path: Path, db: str, fake_embedder) -> None:
    root = tmp_path / "photos"
    _photo(root / "a.jpg", 40, "2024:03:05 10:20:30", "Pixel 7", gps=(52.0, 4.0))
    _photo(root / "b.jpg", 90, "2024:07:01 08:00:00", "Pixel 7")
    _photo(root / "c.jpg", 140, "2023:12:31 23:59:59", "Pixel 6")
    _photo(root / "d.jpg", 200, None, "Pixel 6")
    ingest("folder", str(root), embedder=fake_embedder, db=db, collection="photos")
    with Gallery.open("photos", db) as g:
        items = g.catalogue()
        a = items["folder:a.jpg"]
        assert (a["width"], a["height"], a["format"], a["camera_model"], a["taken_at"]) == (
            40,
            30,
            "JPEG",
            "Pixel 7",
            "2024-03-05T10:20:30",
        )
        assert "latitude" not in a and "taken" not in items["folder:d.jpg"]  # GPS only when asked; no time, no field

        def ids(*where: str) -> list[str]:
            return sorted(h.id for h in search(g, id="folder:d.jpg", k=10, where=parse_where(list(where))))

        assert ids('camera_model = "Pixel 7"') == ["folder:a.jpg", "folder:b.jpg"]
        assert ids("taken between 2024-01-01 and 2024-06-30") == ["folder:a.jpg"]
        assert ids("taken <= 2023-12-31") == ["folder:c.jpg"]  # the whole day
        assert ids("width >= 40", "camera_model != Pixel 7") == ["folder:c.jpg"]
    with pytest.raises(InputError, match="--gps and --metadata are for folders"):
        ingest("mnist-sample", embedder=fake_embedder, db=db, collection="s", gps=True)
    ingest("folder", str(root), embedder=fake_embedder, db=db, collection="with-gps", gps=True)
    with Gallery.open("with-gps", db) as g:
        assert g.catalogue()["folder:a.jpg"]["latitude"] == 52.0 and g.record.protocol["gps"] is True
