from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from lookalike.core.gallery import Gallery
from lookalike.core.ingest import ingest
from lookalike.errors import EmbedderError, InputError, MismatchError
from lookalike.models.embedder import PixelEmbedder

ingest_mod = importlib.import_module("lookalike.core.ingest")  # (the package exports the function under the same name)


class CountingEmbedder(PixelEmbedder):
    """Raw pixels, counting how many images it embeds."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        self.seen += len(images)
        return super().embed(images)


def test_ingest_then_rerun_adds_nothing(tiny_npz: Path, db: str) -> None:
    emb = CountingEmbedder()
    report = ingest("mnist", source=str(tiny_npz), embedder=emb, batch_size=64, db=db)
    assert report.collection == "mnist" and report.added == {"train": 200, "test": 50}
    assert report.stored == {"train": 200, "test": 50} and report.already_stored == 0
    assert emb.seen == 250
    col = Gallery.open("mnist", db)
    assert col.count() == 250
    assert col.record.protocol["dataset"] == "mnist" and col.record.embedder.model == "pixels"
    _, vecs, metas = col.get(["mnist:test:7"], vectors=True)
    with np.load(tiny_npz) as f:
        assert np.allclose(vecs[0], f["x_test"][7].reshape(-1) / 255.0)
        assert metas[0]["label"] == int(f["y_test"][7])
    assert metas[0] == {
        "label": metas[0]["label"],
        "label_name": str(metas[0]["label"]),
        "split": "test",
        "dataset": "mnist",
        "source": "x_test",
        "index": 7,
    }
    again = CountingEmbedder()
    second = ingest("mnist", source=str(tiny_npz), embedder=again, db=db)
    assert second.added == {"train": 0, "test": 0} and second.already_stored == 250 and again.seen == 0
    assert col.count() == 250


def test_interrupted_ingest_resumes_without_duplicates_or_reembedding(tiny_npz: Path, db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingest_mod, "WRITE_BATCH", 40)  # each batch written as soon as it is embedded
    emb = CountingEmbedder()
    calls = []

    def stop_after_two_batches(done: int, total: int) -> None:
        calls.append(done)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ingest("mnist", source=str(tiny_npz), embedder=emb, batch_size=40, db=db, progress=stop_after_two_batches)
    assert Gallery.open(db=db).count() == 80
    resumed = CountingEmbedder()
    report = ingest("mnist", source=str(tiny_npz), embedder=resumed, batch_size=40, db=db)
    assert resumed.seen == 170 and report.already_stored == 80
    assert report.stored == {"train": 200, "test": 50}
    ids, _, _ = Gallery.open(db=db).scan(vectors=False)
    assert len(ids) == len(set(ids)) == 250


def test_other_embedder_or_protocol_is_refused_and_nothing_written(tiny_npz: Path, db: str) -> None:
    ingest("mnist", source=str(tiny_npz), embedder="pixels", limit=100, test_size=20, db=db)
    with pytest.raises(MismatchError, match="embedder"):
        ingest("mnist", source=str(tiny_npz), embedder="pixels", input_size=20, limit=100, test_size=20, db=db)
    with pytest.raises(MismatchError, match="protocol"):
        ingest("mnist", source=str(tiny_npz), embedder="pixels", db=db)
    assert Gallery.open(db=db).count() == 100


def test_failing_embedder_build_writes_nothing(tiny_npz: Path, db: str, tmp_path: Path) -> None:
    weights = tmp_path / "w.weights.h5"
    weights.write_bytes(b"not weights")
    with pytest.raises(EmbedderError):
        ingest("mnist", source=str(tiny_npz), weights=str(weights), db=db)
    assert not Path(db).exists()  # not even an empty store is left behind


def test_folder_ingest_skips_and_reports_unreadable_files(digits_folder: Path, db: str) -> None:
    report = ingest("folder", str(digits_folder), embedder="pixels", test_size=0.34, db=db, collection="pics")
    assert report.skipped == ["class_1/broken.png"] and report.too_large == []
    assert sum(report.stored.values()) == 18
    col = Gallery.open("pics", db)
    assert col.count() == 18 and col.label_names == ["class_0", "class_1", "class_2"]
    _, _, metas = col.get(["folder:class_2/0.png"])
    assert metas[0]["path"] == "class_2/0.png" and metas[0]["label_name"] == "class_2" and metas[0]["split"] in ("train", "test")
    assert metas[0]["size"] == (digits_folder / "class_2/0.png").stat().st_size and len(metas[0]["sha256"]) == 64


def test_images_over_the_pixel_limit_are_skipped_and_counted(digits_folder: Path, db: str) -> None:
    from PIL import Image

    Image.new("L", (300, 200)).save(digits_folder / "class_2" / "big.png")  # 60,000 pixels
    with pytest.raises(InputError, match="--max-pixels"):
        ingest("folder", str(digits_folder), embedder="pixels", max_pixels=0, db=db)
    report = ingest("folder", str(digits_folder), embedder="pixels", max_pixels=50_000, db=db)
    assert report.too_large == ["class_2/big.png"] and report.skipped == ["class_1/broken.png"]
    assert sum(report.stored.values()) == 18
    assert report.to_dict()["too_large"] == ["class_2/big.png"]


def test_ingest_into_a_given_store_leaves_it_open(tiny_npz: Path, db: str, fake_embedder: PixelEmbedder) -> None:
    from lookalike.core.store import Store

    with Store(db, create=True) as store:
        ingest("mnist", source=str(tiny_npz), embedder=fake_embedder, collection="one", store=store)
        ingest("mnist", source=str(tiny_npz), embedder=fake_embedder, collection="two", store=store)
        assert store.names() == ["one", "two"]  # still usable: ingest did not close what it was given


def test_a_collection_made_meanwhile_is_resumed_not_replaced(tiny_npz: Path, db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two first ingests into a store that does not exist yet: the later one finds the earlier one's work."""
    import importlib

    ingest_mod = importlib.import_module("lookalike.core.ingest")  # the package attribute is the function

    real_build = ingest_mod.build_embedder

    def build_while_another_ingests(spec):  # the slow model build of the second process, while the first writes
        monkeypatch.setattr(ingest_mod, "build_embedder", real_build)
        ingest("mnist", source=str(tiny_npz), embedder="pixels", db=db)
        return real_build(spec)

    monkeypatch.setattr(ingest_mod, "build_embedder", build_while_another_ingests)
    report = ingest("mnist", source=str(tiny_npz), embedder="pixels", db=db)
    assert report.added == {"train": 0, "test": 0} and report.already_stored == 250
    with Gallery.open(db=db) as g:
        assert g.count() == 250 and len(g.neighbours(g.vector("mnist:test:0"), 5, labels=[3])[0]) == 5


def test_photos_are_found_by_their_own_file_and_phone_shots_read_upright(tmp_path: Path, db: str, fake_embedder) -> None:
    from PIL import Image

    from lookalike.core.search import search

    rng = np.random.default_rng(4)
    root = tmp_path / "photos"
    for label in range(3):
        (root / f"c{label}").mkdir(parents=True)
        for i in range(6):
            img = np.full((900, 600), 40, np.uint8)  # tall photos of a bright block whose place is the label
            img[100 + 250 * label : 300 + 250 * label, 100:500] = 220
            img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / f"c{label}" / f"{i}.jpg", quality=92)
    report = ingest("folder", str(root), embedder=fake_embedder, test_size=0.17, db=db)
    assert sum(report.added.values()) == 18 and report.decode_seconds > 0 and report.embed_seconds > 0
    assert report.decode_images_per_s > 0 and report.to_dict()["embed_images_per_s"] == report.embed_images_per_s
    with Gallery.open(db=db) as g:
        (hit,) = search(g, image=root / "c1" / "4.jpg", k=1)
        assert hit.id.endswith("c1/4.jpg") and hit.distance < 1e-5  # the same file reads the same way at search
        with Image.open(root / "c2" / "0.jpg") as upright:
            sideways = upright.transpose(Image.Transpose.ROTATE_90)  # the sensor's view of a phone held sideways
        exif = Image.Exif()
        exif[0x0112] = 6
        sideways.save(tmp_path / "phone.jpg", exif=exif, quality=92)
        (hit,) = search(g, image=tmp_path / "phone.jpg", k=1)
        assert hit.id.endswith("c2/0.jpg") and hit.distance < 0.05
        sideways.save(tmp_path / "no-exif.jpg", quality=92)  # without the tag it is another picture
        assert search(g, image=tmp_path / "no-exif.jpg", k=1)[0].distance > 10 * hit.distance


def test_no_label_partitions_makes_a_collection_without_them_and_filters_stay_exact(tiny_npz: Path, db: str) -> None:
    from typer.testing import CliRunner

    from lookalike.core.search import search
    from lookalike.frontends.cli import app

    r = CliRunner().invoke(app, ["ingest", "mnist", "--source", str(tiny_npz), "--embedder", "pixels", "--no-label-partitions", "--db", db])
    assert r.exit_code == 0, r.output
    with Gallery.open("mnist", db) as g:
        assert g.record.label_partitions is False and g.store.names() == ["mnist"]
        assert [c for c, _ in g.store.all_collections()] == ["mnist"]  # no hidden NAME.pLABEL collections
        ids, vecs, metas = g.scan("train")
        q = g.vector("mnist:test:3")
        threes = [i for i, m in enumerate(metas) if m["label"] == 3]
        d = np.sqrt(((vecs[threes] - q) ** 2).sum(1))
        assert [h.id for h in search(g, id="mnist:test:3", k=5, labels=["3"], where={"split": "train"})] == [
            ids[threes[j]] for j in np.argsort(d, kind="stable")[:5]
        ]
    with pytest.raises(InputError, match="has no label partitions: --label-partitions/--no-label-partitions is for a new collection"):
        ingest("mnist", source=str(tiny_npz), embedder="pixels", db=db, label_partitions=True)
    ingest("mnist", source=str(tiny_npz), embedder="pixels", db=db, collection="parts")  # the default: partitions
    with Gallery.open("parts", db) as g:
        assert g.record.label_partitions is True and len(g.store.all_collections()) == 2 + 10


def test_embedded_batches_are_written_to_the_store_in_large_calls(tiny_npz: Path, db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Chroma write costs ~40 ms besides its items, and a batch spread over ten label partitions is ten writes:
    batches of 40 are written together, WRITE_BATCH at a time, the rest at the end."""
    monkeypatch.setattr(ingest_mod, "WRITE_BATCH", 100)
    writes: list[int] = []
    real = Gallery.add
    monkeypatch.setattr(Gallery, "add", lambda self, ids, *a, **kw: writes.append(len(ids)) or real(self, ids, *a, **kw))
    seen: list[int] = []
    report = ingest("mnist", source=str(tiny_npz), embedder="pixels", batch_size=40, db=db, progress=lambda d, t: seen.append(d))
    assert writes == [120, 120, 10] and report.stored == {"train": 200, "test": 50}  # (40-item batches until >= 100)
    assert seen == [40, 80, 120, 160, 200, 240, 250]  # progress follows the embedding, batch by batch
    monkeypatch.setattr(ingest_mod, "WRITE_SECONDS", 0.0)  # ... or when the first waiting batch has waited long enough
    writes.clear()
    ingest("mnist", source=str(tiny_npz), embedder="pixels", batch_size=40, db=db, collection="again")
    assert writes == [40] * 6 + [10]


def test_a_large_ingest_writes_the_index_first_then_the_partitions_label_by_label(
    tiny_npz: Path, db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At PARTITIONS_LATER new items or more, every batch goes to the index alone and the label partitions are filled
    after it, one label at a time; they then hold what partitions written batch by batch hold."""
    from lookalike.analysis.check import check
    from lookalike.core.store import VectorCollection

    order: list[str] = []
    real = VectorCollection._write
    monkeypatch.setattr(VectorCollection, "_write", lambda self, how, ids, *a: order.append(self.name) or real(self, how, ids, *a))
    monkeypatch.setattr(ingest_mod, "PARTITIONS_LATER", 100)
    later = ingest("mnist", source=str(tiny_npz), embedder="pixels", db=db, collection="later")
    assert later.partitions_filled == 250 and later.stored == {"train": 200, "test": 50}
    first = next(i for i, name in enumerate(order) if ".p" in name)
    assert first > 0 and set(order[:first]) == {"later"} and all(name.startswith("later.p") for name in order[first:])
    assert len(order[first:]) == 10  # each label's items in one write
    monkeypatch.setattr(ingest_mod, "PARTITIONS_LATER", 10**9)
    each = ingest("mnist", source=str(tiny_npz), embedder="pixels", db=db, collection="each")
    assert each.partitions_filled == 0
    with Gallery.open("later", db) as g, Gallery.open("each", db, store=g.store) as h:
        assert not g.partitions_behind and check(g.store, "later", full=True).ok
        for label in range(10):
            assert sorted(g.collection().partition(label).ids()) == sorted(h.collection().partition(label).ids())
        q = g.vector("mnist:test:3").reshape(1, -1)
        assert g.neighbours(q, 5, labels=["3"]) == h.neighbours(q, 5, labels=["3"])


def test_an_ingest_killed_before_its_partitions_were_filled_answers_exactly_and_is_finished_by_the_next(tiny_npz: Path, db: str) -> None:
    """kill -9 between a large ingest's index and its partitions: the store says they are behind, label filters are
    answered without them (exactly), `check` names the fix, and the next ingest fills them."""
    import os
    import signal
    import subprocess
    import sys

    from lookalike.analysis.check import check
    from lookalike.core.search import search

    args = ("ingest", "mnist", "--source", str(tiny_npz), "--embedder", "pixels", "--batch-size", "25", "--db", db)
    env = {**os.environ, "LOOKALIKE_WRITE_BATCH": "25", "LOOKALIKE_PARTITIONS_LATER": "100"}
    # the child says when its index is written and waits there: the kill lands between the index and the partitions
    hold = (
        "import sys, time; from lookalike.core.store import VectorCollection as V; "
        "V.fill_partitions = lambda self, *a, **k: (print('index written', file=sys.stderr, flush=True), time.sleep(120)); "
        "from lookalike.frontends.cli import main; main()"
    )
    proc = subprocess.Popen([sys.executable, "-c", hold, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    for line in proc.stderr:
        if "index written" in line:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    with Gallery.open("mnist", db) as g:
        assert g.partitions_behind and g.count() == 250
        assert all(g.collection().partition(label) is None for label in range(10))  # none written yet
        ids, vecs, metas = g.scan(None)
        q = g.vector(ids[0])
        threes = [i for i, m in enumerate(metas) if m["label"] == 3 and i != 0]  # (the query item is never returned)
        d = ((vecs[threes] - q) ** 2).sum(1)
        want = [ids[threes[j]] for j in np.argsort(d, kind="stable")[:3]]
        assert [h.id for h in search(g, id=ids[0], k=3, labels=["3"])] == want
        r = check(g.store, "mnist")
        assert not r.ok and any("label partitions are behind the index" in p for p in r.problems) and "--repair" in r.fix
    report = ingest("mnist", source=str(tiny_npz), embedder="pixels", db=db)  # nothing left to embed: it fills them
    assert report.partitions_filled == 250 and sum(report.added.values()) == 0
    with Gallery.open("mnist", db) as g:
        assert not g.partitions_behind and g.count() == 250 and check(g.store, "mnist", full=True).ok
