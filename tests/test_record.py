from __future__ import annotations

import json

import pytest

from lookalike.core.record import SCHEMA, Record
from lookalike.errors import MismatchError, StoreError
from lookalike.models.embedder import make_spec


def record(**protocol: object) -> Record:
    proto = {"dataset": "mnist", "mode": "official", "limit": None, "test_size": None, "seed": 0, **protocol}
    return Record(make_spec("pixels"), proto, [str(i) for i in range(10)])


def test_round_trip_and_schema() -> None:
    rec = record()
    data = json.loads(rec.to_json())
    assert data["schema"] == SCHEMA and data["embedder"]["model"] == "pixels"
    assert Record.parse(rec.to_json(), "c") == rec
    old = {k: v for k, v in data.items() if k != "schema"}  # written before the schema field
    assert Record.parse(json.dumps(old), "c").schema == 1
    kept = Record.parse(json.dumps({**data, "note": "from a newer minor version"}), "c")
    assert json.loads(kept.to_json())["note"] == "from a newer minor version"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (None, "no lookalike record"),
        ("{not json", "damaged record"),
        (json.dumps({"protocol": {"dataset": "mnist"}}), "damaged record"),
        (json.dumps({"schema": SCHEMA + 1, "embedder": {}, "protocol": {"dataset": "x"}}), "newer lookalike"),
    ],
)
def test_unusable_records_name_the_fix(raw: str | None, message: str) -> None:
    with pytest.raises(StoreError, match=message):
        Record.parse(raw, "c")


def test_compatibility_check() -> None:
    have = record()
    have.check_compatible(record(), "c")
    other = Record(make_spec("vgg16", weights="random"), have.protocol, have.label_names)
    with pytest.raises(MismatchError, match="another --collection"):
        have.check_compatible(other, "c")
    with pytest.raises(MismatchError, match="limit"):
        have.check_compatible(record(limit=5000), "c")
    vgg = make_spec("vgg16", weights="random", precision="float32").to_dict()
    old = json.loads(record().to_json())
    old["embedder"] = {k: v for k, v in vgg.items() if k != "precision"}  # written before bfloat16 existed
    old_record = Record.parse(json.dumps(old), "c")
    old_record.check_compatible(Record(make_spec("vgg16", weights="random", precision="float32"), have.protocol, []), "c")
    with pytest.raises(MismatchError, match="pass --precision float32"):
        old_record.check_compatible(Record(make_spec("vgg16", weights="random", precision="bfloat16"), have.protocol, []), "c")
