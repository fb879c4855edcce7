from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from lookalike.compare import collection_name, compare, parse_spec, save_compare_picture
from lookalike.errors import InputError
from lookalike.store import Store


def test_parse_spec() -> None:
    assert parse_spec("pixels") == {"model": "pixels"}
    assert parse_spec("model:/models/digits.keras") == {"model": "keras", "weights": "/models/digits.keras"}
    assert parse_spec("vgg16:precision=float32", "random")["precision"] == "float32"
    with pytest.raises(InputError, match="model:FILE.keras"):
        parse_spec("model:")
    assert parse_spec("vgg16", "random", 2) == {"model": "vgg16", "weights": "random", "seed": 2}
    assert parse_spec("vgg16:layer=block3_pool, pooling=flatten,size=48", "random") == {
        "model": "vgg16", "weights": "random", "seed": 0, "layer": "block3_pool", "pooling": "flatten", "input_size": 48}  # fmt: skip
    for bad in ("vgg16:colour=red", "vgg16:input_size=big", "vgg16:layer"):
        with pytest.raises(InputError, match="--embedder"):
            parse_spec(bad)
    name = collection_name("mnist", 5000, 1000, 0, "vgg16:layer=block3_pool,pooling=flatten")
    assert name == "cmp-mnist-5000-1000-s0-vgg16-layer-block3_pool-pooling-flatten"


def test_compare_builds_one_collection_per_embedder_and_reuses_them(tiny_npz: Path, db: str, tmp_path: Path) -> None:
    specs = ["pixels", "pixels:normalize=l2", "vgg16:weights=random"]
    r = compare("mnist", source=str(tiny_npz), limit=100, test_size=30, embedders=specs, k=3, db=db)
    assert [row.spec for row in r.rows] == specs and r.k == 3
    assert r.rows[0].accuracy_1nn == 1.0 and r.rows[0].dim == 784 and r.rows[2].dim == 512
    assert all(0 <= row.accuracy_knn <= 1 and row.recall_at_1 >= 0.999 and row.images_per_s > 0 for row in r.rows)
    assert -1 <= r.rows[0].silhouette <= 1
    names = Store(db).names()
    assert len(names) == 3 and all(Store(db).open(n).count() == 100 for n in names)
    again = compare("mnist", source=str(tiny_npz), limit=100, test_size=30, embedders=specs[:2], k=3, db=db)
    assert Store(db).names() == names and again.rows[1].accuracy_1nn == r.rows[1].accuracy_1nn
    out = save_compare_picture(r, tmp_path / "bars.png")
    with Image.open(out) as im:
        assert im.format == "PNG"


def test_compare_validates_every_spec_before_writing(tiny_npz: Path, db: str) -> None:
    with pytest.raises(InputError):
        compare("mnist", source=str(tiny_npz), embedders=["pixels", "vgg16:input_size=8"], db=db)
    with pytest.raises(InputError, match="at least one"):
        compare("mnist", source=str(tiny_npz), embedders=[], db=db)
    assert not Path(db).exists()
