from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lookalike.errors import InputError, NotFoundError
from lookalike.ingest import ingest
from lookalike.search import build_where, resolve_labels, save_picture, search


@pytest.fixture
def pixel_db(tiny_npz: Path, db: str) -> str:
    ingest("mnist", source=str(tiny_npz), embedder="pixels", db=db)
    return db


def test_search_by_id_never_returns_the_query(pixel_db: str) -> None:
    hits = search(id="mnist:test:3", k=5, db=pixel_db)
    assert len(hits) == 5 and [h.rank for h in hits] == [1, 2, 3, 4, 5]
    assert all(h.id != "mnist:test:3" for h in hits)
    assert [h.distance for h in hits] == sorted(h.distance for h in hits)
    (self_label,) = {h.label for h in hits[:1]}
    assert all(h.label == self_label for h in hits)  # separable classes: all neighbours agree


def test_label_and_split_filters(pixel_db: str) -> None:
    hits = search(id="mnist:test:0", k=8, labels=[3], db=pixel_db)
    assert len(hits) == 8 and {h.label for h in hits} == {3}
    hits = search(id="mnist:test:0", k=30, labels=["3", 5], split="test", db=pixel_db)
    assert {h.label for h in hits} <= {3, 5} and {h.split for h in hits} == {"test"}
    assert len(hits) == 10  # all five 3s and five 5s held out, never the query


def test_search_by_image_file_finds_the_stored_item(pixel_db: str, tiny_npz: Path, tmp_path: Path) -> None:
    with np.load(tiny_npz) as f:
        img = f["x_train"][17]
    Image.fromarray(img).save(tmp_path / "q.png")
    hits = search(image=tmp_path / "q.png", k=2, db=pixel_db)
    assert hits[0].id == "mnist:train:17" and hits[0].distance == pytest.approx(0.0, abs=1e-3)
    Image.fromarray(img).convert("RGB").resize((56, 56)).save(tmp_path / "big.jpg")
    assert search(image=tmp_path / "big.jpg", k=1, db=pixel_db)[0].label == hits[0].label


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"id": "mnist:test:999"}, NotFoundError, "no item"),
        ({"id": "mnist:test:0", "k": 0}, InputError, "--k"),
        ({"id": "mnist:test:0", "labels": ["12"]}, InputError, "not in this collection"),
        ({"id": "mnist:test:0", "split": "val"}, InputError, "--split"),
        ({"id": "mnist:test:0", "collection": "nope"}, NotFoundError, "collections: mnist"),
        ({}, InputError, "exactly one"),
        ({"image": "/nonexistent.png"}, InputError, "not found"),
    ],
)
def test_bad_queries(pixel_db: str, kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        search(db=pixel_db, **kwargs)


def test_labels_by_name_and_where() -> None:
    names = ["T-shirt/top", "Trouser", "Sneaker"]
    assert resolve_labels(names, ["Sneaker", 1, "1"]) == [1, 2]
    assert build_where({"label_names": names}, None, None) is None
    assert build_where({"label_names": names}, ["Sneaker"], "train") == {"$and": [{"label": 2}, {"split": "train"}]}
    assert build_where({"label_names": names}, [0, 2], None) == {"label": {"$in": [0, 2]}}


def test_save_picture_writes_a_png(pixel_db: str, tmp_path: Path) -> None:
    hits = search(id="mnist:test:0", k=4, db=pixel_db)
    out = save_picture(hits, tmp_path / "pics" / "n.png", id="mnist:test:0", db=pixel_db)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 4 * im.size[1] / 2
    with pytest.raises(InputError, match=".png"):
        save_picture(hits, tmp_path / "n.jpg", id="mnist:test:0", db=pixel_db)
