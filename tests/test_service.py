"""The service's library side (no HTTP): the library's answers, batched image queries, items, the saved evaluation."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lookalike.analysis.evaluate import evaluate, save_report
from lookalike.core.gallery import Gallery
from lookalike.core.ingest import ingest
from lookalike.core.search import search
from lookalike.errors import InputError, NotFoundError, TooLargeError
from lookalike.frontends.service import MAX_K, Service, check_k
from lookalike.models.embedder import PixelEmbedder


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def stored(tiny_npz: Path, db: str, fake_embedder: PixelEmbedder) -> str:
    ingest("mnist", source=str(tiny_npz), embedder=fake_embedder, db=db)
    return db


@pytest.fixture
def service(stored: str) -> Iterator[Service]:
    with Service(stored) as s:
        yield s


def test_answers_are_the_librarys(service: Service, tiny_npz: Path) -> None:
    x = np.load(tiny_npz)["x_test"]
    g = service.gallery("mnist")
    for i in (0, 7):
        got = service.search("mnist", image=png(x[i]), k=4, labels=["3", 5], split="train")
        want = search(g, image=x[i], k=4, labels=["3", 5], split="train")
        assert [h.to_dict() for h in got.hits] == [h.to_dict() for h in want]
        assert got.labels == [3, 5] and got.query["kind"] == "image"
    by_id = service.search("mnist", id="mnist:test:3", k=5)
    assert [h.id for h in by_id.hits] == [h.id for h in search(g, id="mnist:test:3", k=5)]
    vec = g.vector("mnist:test:3")[0]
    by_vector = service.search("mnist", vector=vec.tolist(), k=6)
    assert by_vector.hits[0].id == "mnist:test:3" and by_vector.hits[0].distance == pytest.approx(0, abs=1e-6)
    assert [h.id for h in by_vector.hits[1:]] == [h.id for h in by_id.hits]


def test_concurrent_image_queries_equal_sequential_ones(service: Service, tiny_npz: Path) -> None:
    x = np.load(tiny_npz)["x_test"]
    uploads = [png(x[i]) for i in range(32)]
    sequential = [[h.id for h in service.search("mnist", image=u, k=3).hits] for u in uploads]
    concurrent: dict[int, list[str]] = {}

    def ask(i: int) -> None:
        concurrent[i] = [h.id for h in service.search("mnist", image=uploads[i], k=3).hits]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [concurrent[i] for i in range(32)] == sequential
    stats = service.stats()["collections"]["mnist"]
    assert stats["items"] == 64


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"id": "mnist:test:0", "k": 0}, InputError, "between 1 and 1000"),
        ({"id": "mnist:test:0", "k": MAX_K + 1}, InputError, "between 1 and 1000"),
        ({"id": "mnist:test:0", "k": "five"}, InputError, "whole number"),
        ({"id": "mnist:test:0", "k": True}, InputError, "whole number"),
        ({"id": "nope"}, NotFoundError, "ids look like 'mnist:"),
        ({"id": "mnist:test:0", "labels": ["cat"]}, InputError, "choose from 0, 1, 2"),
        ({"id": "mnist:test:0", "split": "validation"}, InputError, "train, test"),
        ({"image": b"not an image"}, InputError, "cannot read the upload as an image"),
        ({"vector": [0.1, 0.2]}, InputError, "list of 64 numbers"),
        ({"vector": [float("nan")] * 64}, InputError, "finite"),
        ({"vector": "abc"}, InputError, "64 numbers"),
        ({}, InputError, "exactly one query"),
        ({"id": "mnist:test:0", "vector": [0.0] * 64}, InputError, "exactly one query"),
    ],
)
def test_bad_queries(service: Service, kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        service.search("mnist", **kwargs)


def test_unknown_collection_names_the_ones_there_are(service: Service) -> None:
    with pytest.raises(NotFoundError, match=r"no collection 'digits' here: the collections are mnist"):
        service.search("digits", id="x")


def test_an_upload_over_the_pixel_limit_is_too_large(stored: str, tiny_npz: Path) -> None:
    with Service(stored, max_pixels=500) as s, pytest.raises(TooLargeError, match="over the limit of 500"):  # a digit: 784 px
        s.search("mnist", image=png(np.load(tiny_npz)["x_test"][0]))


def test_items_and_their_images_come_from_the_recorded_source(service: Service, tiny_npz: Path) -> None:
    info = service.item("mnist", "mnist:test:4")
    y = np.load(tiny_npz)["y_test"]
    assert (info.label, info.split, info.metadata["index"]) == (int(y[4]), "test", 4)
    back = np.asarray(Image.open(io.BytesIO(service.item_png("mnist", "mnist:test:4"))))
    assert np.array_equal(back, np.load(tiny_npz)["x_test"][4])
    with pytest.raises(NotFoundError):
        service.item_png("mnist", "../../etc/passwd")


def test_evaluation_is_404_until_evaluate_saves_one(stored: str) -> None:
    with Service(stored) as s:
        with pytest.raises(NotFoundError, match="lookalike evaluate --collection mnist"):
            s.evaluation("mnist")
        g = s.gallery("mnist")
        report = evaluate(g)
        saved = save_report(g, report)
        got = s.evaluation("mnist")
    assert got == saved and got["accuracy"] == report.accuracy and got["n_mistakes"] == len(report.mistakes)
    with Gallery.open("mnist", stored) as g:  # kept with the collection: a new process finds it, the record intact
        assert g.evaluation() == saved and g.record.dataset == "mnist"


def test_check_k() -> None:
    assert check_k("7") == 7 and check_k(1000) == 1000
    for bad in (0, -1, 1001, "x", 2.5, None):
        with pytest.raises(InputError):
            check_k(bad)


def test_health_and_collections_hold_no_paths(service: Service, stored: str) -> None:
    assert service.health()["status"] == "ok"
    (col,) = service.collections()
    assert col["name"] == "mnist" and col["count"] == 250 and col["label_names"][:2] == ["0", "1"]
    assert stored not in repr(service.collections()) and stored not in repr(service.health())


def test_warming_with_mirrors_reads_each_collections_mirror_before_any_query(service: Service) -> None:
    """`serve --preload`: embedders built and filter mirrors read before serving (a filtered query is planned warm)."""
    assert service.warm(mirrors=True) == ["mnist"]
    col = service.gallery("mnist").collection()
    assert col.warm and col.from_mirror(len) == 250  # read now, not in the background
    service.search("mnist", id="mnist:test:1", k=3, where={"split": "train"})
    assert col.plan_counts["overfetch"] + col.plan_counts["mirror"] == 1 and col.plan_counts["probe"] == 0
