from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lookalike.core.gallery import Gallery
from lookalike.core.search import save_picture, search
from lookalike.errors import InputError, NotFoundError


def test_search_by_id_never_returns_the_query(gallery: Gallery) -> None:
    hits = search(gallery, id="mnist:test:3", k=5)
    assert len(hits) == 5 and [h.rank for h in hits] == [1, 2, 3, 4, 5]
    assert all(h.id != "mnist:test:3" for h in hits)
    assert [h.distance for h in hits] == sorted(h.distance for h in hits)
    (self_label,) = {h.label for h in hits[:1]}
    assert all(h.label == self_label for h in hits)  # separable classes: all neighbours agree


def test_label_and_split_filters(gallery: Gallery) -> None:
    hits = search(gallery, id="mnist:test:0", k=8, labels=[3])
    assert len(hits) == 8 and {h.label for h in hits} == {3}
    hits = search(gallery, id="mnist:test:0", k=30, labels=["3", 5], split="test")
    assert {h.label for h in hits} <= {3, 5} and {h.split for h in hits} == {"test"}
    assert len(hits) == 10  # all five 3s and five 5s held out, never the query


def test_search_by_image_file_finds_the_stored_item(gallery: Gallery, tiny_npz: Path, tmp_path: Path) -> None:
    with np.load(tiny_npz) as f:
        img = f["x_train"][17]
    Image.fromarray(img).save(tmp_path / "q.png")
    hits = search(gallery, image=tmp_path / "q.png", k=2)
    assert hits[0].id == "mnist:train:17" and hits[0].distance == pytest.approx(0.0, abs=1e-3)
    Image.fromarray(img).convert("RGB").resize((56, 56)).save(tmp_path / "big.jpg")
    assert search(gallery, image=tmp_path / "big.jpg", k=1)[0].label == hits[0].label
    assert search(gallery, image=img, k=1)[0].id == "mnist:train:17"  # an array works the same


def test_search_by_vector_equals_search_by_id(gallery: Gallery) -> None:
    by_id = search(gallery, id="mnist:test:4", k=4)
    by_vector = search(gallery, vector=gallery.vector("mnist:test:4")[0], k=5)
    assert by_vector[0].id == "mnist:test:4" and [h.id for h in by_vector[1:]] == [h.id for h in by_id[:4]]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"id": "mnist:test:999"}, NotFoundError, "no item"),
        ({"id": "mnist:test:0", "k": 0}, InputError, "--k"),
        ({"id": "mnist:test:0", "labels": ["12"]}, InputError, "not in collection 'mnist': choose from 0, 1"),
        ({"id": "mnist:test:0", "split": "val"}, InputError, "--split"),
        ({}, InputError, "exactly one"),
        ({"image": "/nonexistent.png"}, InputError, "not found"),
    ],
)
def test_bad_queries(gallery: Gallery, kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        search(gallery, **kwargs)


def test_decompression_bomb_is_refused_before_decoding(gallery: Gallery, tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    Image.new("1", (12_000, 12_000)).save(bomb)  # 144 Mpx in a small file: over Pillow's 89.5 Mpx
    assert bomb.stat().st_size < 1_000_000
    with pytest.raises(InputError, match=r"too large \(12000x12000 = 144,000,000 pixels, over the limit of 89,478,485\)"):
        search(gallery, image=bomb)
    small = Gallery.open(db=gallery.db, max_pixels=500)
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(tmp_path / "q.png")
    with pytest.raises(InputError, match="--max-pixels"):
        search(small, image=tmp_path / "q.png")
    with pytest.raises(InputError, match="too large"):
        search(small, image=np.zeros((30, 30), np.uint8))


def test_save_picture_writes_a_png(gallery: Gallery, tmp_path: Path) -> None:
    hits = search(gallery, id="mnist:test:0", k=4)
    out = save_picture(gallery, hits, tmp_path / "pics" / "n.png", id="mnist:test:0")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 4 * im.size[1] / 2
    with pytest.raises(InputError, match=r"\.png"):
        save_picture(gallery, hits, tmp_path / "n.jpg", id="mnist:test:0")
