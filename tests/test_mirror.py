"""The in-memory mirror: its masks agree with the matcher item by item, and it follows writes as Chroma does."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from lookalike.core.mirror import Mirror
from lookalike.data.filters import matches


def _random_metas(rng: np.random.Generator, n: int) -> list[dict]:
    metas = []
    for _ in range(n):
        m: dict = {}
        if rng.random() < 0.9:
            m["n"] = int(rng.integers(-3, 4)) if rng.random() < 0.7 else float(rng.integers(-3, 4)) + 0.5
        if rng.random() < 0.8:
            m["s"] = str(rng.choice(["a", "b", "Pixel 7", "猫"]))
        if rng.random() < 0.5:
            m["b"] = bool(rng.random() < 0.5)
        if rng.random() < 0.3:
            m["mixed"] = [1, "1", True, 1.0][int(rng.integers(4))]
        if rng.random() < 0.4:
            m["tags"] = sorted({str(t) for t in rng.choice(["beach", "sun", "dog"], int(rng.integers(1, 3)))})
        if rng.random() < 0.1:
            m["big"] = 1_700_000_000_123_456_789 + int(rng.integers(0, 2))
        metas.append(m)
    return metas


FILTERS = [
    {"n": 1},
    {"n": {"$eq": 1.0}},
    {"n": {"$ne": 2}},
    {"n": {"$gt": 0.5}},
    {"n": {"$lte": -1}},
    {"n": {"$in": [1, 2, 3.5]}},
    {"n": {"$nin": [0, 1]}},
    {"s": "Pixel 7"},
    {"s": {"$in": ["a", "猫"]}},
    {"s": {"$ne": "b"}},
    {"s": {"$nin": ["a", "zzz"]}},
    {"b": True},
    {"b": {"$ne": False}},
    {"mixed": 1},
    {"mixed": True},
    {"mixed": "1"},
    {"mixed": {"$gte": 1}},
    {"tags": {"$contains": "beach"}},
    {"big": 1_700_000_000_123_456_789},
    {"big": {"$gt": 1_700_000_000_123_456_788}},
    {"nope": 3},
    {"nope": {"$ne": 3}},
    {"$or": [{"s": "a"}, {"n": {"$gte": 2}}]},
    {"$and": [{"s": {"$in": ["a", "b"]}}, {"$or": [{"b": True}, {"tags": {"$contains": "dog"}}]}]},
]


@pytest.mark.parametrize("seed", [0, 1])
def test_masks_agree_with_the_matcher(seed: int) -> None:
    rng = np.random.default_rng(seed)
    metas = _random_metas(rng, 400)
    ids = [f"i{j}" for j in range(400)]
    mir = Mirror(2, vectors=True)
    for start in range(0, 400, 150):  # several puts: the columns grow
        mir.put(ids[start : start + 150], rng.normal(size=(len(ids[start : start + 150]), 2)), metas[start : start + 150])
    for where in FILTERS:
        want = np.array([matches(m, where) for m in metas])
        assert (mir.mask(where) == want).all(), where
        assert want.any() or where.get("nope") == 3, where  # the filters do select something
    assert mir.fields() == ["b", "big", "mixed", "n", "s", "tags"]
    assert mir.metadata("i5") == metas[5]


def test_writes_follow_chromas_semantics() -> None:
    mir = Mirror(2, vectors=True)
    mir.put(["a", "b"], np.array([[1, 1], [2, 2]], np.float32), [{"x": 1, "y": "p"}, {"x": 2}])
    mir.put(["a"], None, [{"x": 5}])  # update: the keys given are merged in, the vector kept
    assert mir.metadata("a") == {"x": 5, "y": "p"} and mir.vectors[mir.row("a")].tolist() == [1, 1]
    mir.put(["a"], None, [{"y": None}])  # None removes a key
    assert mir.metadata("a") == {"x": 5}
    assert mir.mask({"y": "p"}).sum() == 0
    mir.put(["b"], None, [{"z": 1}], replace=True)  # replace: the keys not given go
    assert mir.metadata("b") == {"z": 1}
    mir.remove(["a"])
    assert mir.row("a") is None and len(mir) == 1 and mir.mask({"x": 5}).sum() == 0 and mir.fields() == ["z"]
    mir.put(["a"], np.array([[3, 3]], np.float32), [{"w": 1}])  # stored again after removal: a new item
    assert mir.metadata("a") == {"w": 1} and mir.vectors[mir.row("a")].tolist() == [3, 3] and len(mir) == 2
    assert list(mir.rows(["a", "gone", "b"])) == [mir.row("a"), mir.row("b")]


def test_describe_gives_what_filter_widgets_need() -> None:
    mir = Mirror(1, vectors=False)
    metas = [{"n": i, "s": f"v{i % 3}", "b": i % 2 == 0, "tags": ["x", "y"] if i % 2 else ["z"], "many": f"u{i}"} for i in range(60)]
    mir.put([f"i{i}" for i in range(60)], None, metas)
    mir.put(["m"], None, [{"n": "text now"}])
    mir.remove(["i59"])
    d = mir.describe()
    assert d["s"] == {"kind": "text", "count": 59, "values": ["v0", "v1", "v2"]}
    assert d["b"]["values"] == [False, True] and d["tags"]["values"] == ["x", "y", "z"]
    assert d["many"]["values"] is None and d["many"]["count"] == 59  # too many distinct values to list
    assert d["n"]["kind"] == "mixed"
    mir.remove(["m"])
    assert mir.describe()["n"] == {"kind": "number", "count": 59, "min": 0.0, "max": 58.0}


def _typed(meta: dict) -> list:
    return sorted((key, type(value).__name__, repr(value)) for key, value in meta.items())


def test_metadata_comes_back_with_its_types_and_only_tags_and_big_ints_are_kept_as_objects() -> None:
    """The columns give every value back as it was stored (1 stays an int, 1.0 a float, True a bool), while only
    tag lists and ints past a float64's exact range are kept as Python objects (a million items' metadata)."""
    rng = np.random.default_rng(2)
    metas = [*_random_metas(rng, 400), {"n": -0.0, "s": "", "big": -(2**62)}, {"n": 2**53 - 1, "mixed": False}, {"big": 2**63 - 1}]
    ids = [f"i{j}" for j in range(len(metas))]
    mir = Mirror(2, vectors=False)
    mir.put(ids, None, metas)
    for item_id, meta in zip(ids, metas):
        assert _typed(mir.metadata(item_id)) == _typed(meta), item_id
    objects = sum(len(col.other) for col in mir._cols.values())
    assert objects == sum(isinstance(v, list) or (type(v) is int and abs(v) >= 2**53) for m in metas for v in m.values())
    assert not any(hasattr(col, "raw") for col in mir._cols.values())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (an int near 2**63 is not cast through a float)
        assert mir.mask({"big": {"$gte": 2**63 - 1}}).sum() == 1 and mir.describe()["big"]["kind"] == "number"
    tags = mir.metadata("i1").get("tags") or next(mir.metadata(i)["tags"] for i, m in zip(ids, metas) if "tags" in m)
    tags.append("changed")  # (a copy: the mirror's own list is not changed through it)
    assert all("changed" not in (mir.metadata(i).get("tags") or []) for i in ids)
    mir.put(["i0"], None, [{"tags": None, "n": 7}])  # a value replaced: its kept object goes
    assert "tags" not in mir.metadata("i0") and mir.metadata("i0")["n"] == 7
