from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from lookalike.analysis.compare import collection_name, compare, parse_spec, save_compare_picture
from lookalike.core.gallery import Gallery
from lookalike.core.ingest import ingest
from lookalike.core.store import Store
from lookalike.errors import InputError, StoreError
from lookalike.models.embedder import make_spec


def test_parse_spec() -> None:
    assert parse_spec("pixels") == {"model": "pixels"}
    assert parse_spec("model:/models/digits.keras") == {"model": "keras", "weights": "/models/digits.keras"}
    assert parse_spec("vgg16:precision=float32", "random")["precision"] == "float32"
    with pytest.raises(InputError, match=r"model:FILE\.keras"):
        parse_spec("model:")
    assert parse_spec("vgg16", "random", 2) == {"model": "vgg16", "weights": "random", "seed": 2}
    assert parse_spec("vgg16:layer=block3_pool, pooling=flatten,size=48", "random") == {
        "model": "vgg16",
        "weights": "random",
        "seed": 0,
        "layer": "block3_pool",
        "pooling": "flatten",
        "input_size": 48,
    }
    assert parse_spec("mobilenetv3large:fit=crop,size=64", "random") == {
        "model": "mobilenetv3large",
        "weights": "random",
        "seed": 0,
        "fit": "crop",
        "input_size": 64,
    }
    for bad in ("vgg16:colour=red", "vgg16:input_size=big", "vgg16:layer"):
        with pytest.raises(InputError, match="--embedder"):
            parse_spec(bad)


def test_collection_names_tell_apart_everything_that_differs() -> None:
    proto = {"dataset": "mnist", "mode": "first-n", "limit": 5000, "test_size": 1000, "seed": 0, "source_sha256": "ab"}
    spec = make_spec("vgg16", weights="random", layer="block3_pool", pooling="flatten", precision="float32")
    name = collection_name("mnist", "vgg16:layer=block3_pool,pooling=flatten", spec, proto)
    assert name.startswith("cmp-mnist-vgg16-layer-block3_pool-pooling-flatten-") and len(name) < 100
    assert name == collection_name("mnist", "vgg16:layer=block3_pool,pooling=flatten", spec, dict(proto))  # stable
    others = [
        collection_name(
            "mnist",
            "vgg16:layer=block3_pool,pooling=flatten",
            make_spec("vgg16", weights="random", seed=1, layer="block3_pool", pooling="flatten", precision="float32"),
            proto,
        ),
        collection_name("mnist", "vgg16:layer=block3_pool,pooling=flatten", spec, {**proto, "source_sha256": "cd"}),
        collection_name("mnist", "vgg16:layer=block3_pool,pooling=flatten", spec, {**proto, "root": "/other/folder"}),
        collection_name("mnist", "vgg16:layer=block3_pool,pooling=flatten", spec, {**proto, "limit": 6000}),
    ]
    assert len({name, *others}) == 5


def test_compare_builds_one_collection_per_embedder_and_reuses_them(tiny_npz: Path, db: str, tmp_path: Path) -> None:
    specs = ["pixels", "pixels:normalize=l2", "vgg16:weights=random"]
    r = compare("mnist", source=str(tiny_npz), limit=100, test_size=30, embedders=specs, k=3, db=db)
    assert [row.spec for row in r.rows] == specs and r.k == 3
    assert r.rows[0].accuracy_1nn == 1.0 and r.rows[0].dim == 784 and r.rows[2].dim == 512
    assert all(row.recall_at_1 >= 0.999 and row.images_per_s > 0 for row in r.rows)
    from sklearn.metrics import silhouette_score

    from lookalike.analysis.evaluate import evaluate

    with Store(db) as store:
        for row in r.rows:  # the table holds what evaluate and sklearn say of each collection
            g = Gallery(store, row.collection)
            assert evaluate(g, k=3).accuracy == row.accuracy_knn and evaluate(g).accuracy == row.accuracy_1nn
        _, vecs, metas = Gallery(store, r.rows[0].collection).scan()
        assert r.rows[0].silhouette == pytest.approx(silhouette_score(vecs, [m["label"] for m in metas]), abs=1e-6)
    with Store(db) as store:
        names = store.names()
        assert len(names) == 3 and all(Gallery(store, n).count() == 100 for n in names)
        assert sorted(row.collection for row in r.rows) == names
    again = compare("mnist", source=str(tiny_npz), limit=100, test_size=30, embedders=specs[:2], k=3, db=db)
    assert Store(db).names() == names and again.rows[1].accuracy_1nn == r.rows[1].accuracy_1nn
    other = compare("mnist", source=str(tiny_npz), limit=100, test_size=30, embedders=["vgg16:weights=random,seed=1"], k=3, db=db)
    assert other.rows[0].collection not in names  # other weights: another collection, no mismatch error
    out = save_compare_picture(r, tmp_path / "bars.png")
    with Image.open(out) as im:
        assert im.format == "PNG"


def test_compare_validates_every_spec_before_writing(tiny_npz: Path, db: str) -> None:
    with pytest.raises(InputError):
        compare("mnist", source=str(tiny_npz), embedders=["pixels", "vgg16:input_size=8"], db=db)
    with pytest.raises(InputError, match="at least one"):
        compare("mnist", source=str(tiny_npz), embedders=[], db=db)
    assert not Path(db).exists()


def test_a_name_taken_by_something_else_fails_cleanly(tiny_npz: Path, db: str) -> None:
    proto = compare("mnist", source=str(tiny_npz), limit=60, test_size=20, embedders=["pixels"], k=1, db=db).rows[0].collection
    with Store(db) as store:
        store.drop(proto)
        ingest("mnist", source=str(tiny_npz), embedder="pixels", normalize="l2", collection=proto, store=store)  # squatter
    with pytest.raises(StoreError, match=f"drop it with `lookalike drop {proto}`"):
        compare("mnist", source=str(tiny_npz), limit=60, test_size=20, embedders=["pixels"], k=1, db=db)


def test_specs_without_a_size_get_the_datas() -> None:  # (the defaults ingest gives a new collection)
    from lookalike.models.embedder import defaults_by_data as _by_data

    assert _by_data({"model": "resnet50"}, photos=True) == {"model": "resnet50", "input_size": 224, "fit": "crop"}
    assert _by_data({"model": "resnet50"}, photos=False) == {"model": "resnet50", "input_size": 32}
    assert _by_data({"model": "dinov2_small", "input_size": 56}, photos=True) == {"model": "dinov2_small", "input_size": 56, "fit": "crop"}
    assert _by_data({"model": "pixels"}, photos=True) == {"model": "pixels", "fit": "crop"}


@pytest.mark.slow  # ~7 s: several Keras backbones built
def test_compare_across_backbones(tiny_npz: Path, db: str) -> None:
    specs = ["pixels", "mobilenetv3large:weights=random,precision=float32"]
    r = compare("mnist", source=str(tiny_npz), limit=60, test_size=20, embedders=specs, k=3, db=db)
    assert [row.dim for row in r.rows] == [784, 960]
    assert r.rows[1].embedder == "mobilenetv3large random(seed=0) avg/l2 32px 960d"
    assert 0 <= r.rows[1].accuracy_1nn <= 1 and r.rows[1].recall_at_1 >= 0.999
