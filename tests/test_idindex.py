from __future__ import annotations

from pathlib import Path

import pytest

from lookalike.core.idindex import FILE, IdIndex, IdIndexError, decode_cursor, encode_cursor
from lookalike.errors import InputError


def test_ids_keep_their_first_write_number_and_pages_follow_it(tmp_path: Path) -> None:
    idx = IdIndex(tmp_path)
    assert idx.state("c") is None
    epoch = idx.build("c", ["a", "b", "c"])
    assert idx.after("c", 0, 10) == [(1, "a"), (2, "b"), (3, "c")]
    assert idx.stale("c") is True
    assert not idx.state("c").fresh  # type: ignore[union-attr]
    idx.added("c", ["b", "d", "e"], stored=5, was_fresh=True)  # b replaced: it keeps its place; d and e come at the end
    state = idx.state("c")
    assert state is not None and state.fresh and state.rows == 5 and state.epoch == epoch and state.agrees(5)
    assert [i for _, i in idx.after("c", 0, 10)] == ["a", "b", "c", "d", "e"]
    idx.removed("c", ["b", "zz"], stored=4, was_fresh=True)  # an id not held is ignored
    assert idx.after("c", 1, 2) == [(3, "c"), (5, "d")]  # keyset: after write number 1, two ids
    idx.added("c", ["b"], stored=5, was_fresh=True)
    assert idx.after("c", 5, 10)[-1][1] == "b"  # removed then added again: a new number, at the end
    assert idx.state("other") is None and idx.after("other", 0, 5) == []
    idx.close()
    again = IdIndex(tmp_path)  # the file keeps it
    assert [i for _, i in again.after("c", 0, 10)] == ["a", "c", "d", "e", "b"] and again.state("c").agrees(5)  # type: ignore[union-attr]
    again.forget("c")
    assert again.state("c") is None and again.after("c", 0, 10) == []


def test_a_count_that_disagrees_leaves_the_index_unusable(tmp_path: Path) -> None:
    idx = IdIndex(tmp_path)
    idx.build("c", ["a"])
    idx.added("c", ["b"], stored=3, was_fresh=idx.stale("c"))  # Chroma counts an item the index never heard of
    state = idx.state("c")
    assert state is not None and not state.fresh and not state.agrees(3)
    idx.added("never-built", ["x"], stored=1, was_fresh=True)  # a collection without an index gets none from a write
    assert idx.state("never-built") is None
    first = idx.state("c").epoch  # type: ignore[union-attr]
    assert idx.build("c", ["a", "b", "c"]) != first  # built again: another epoch
    assert idx.state("c").agrees(3)  # type: ignore[union-attr]


def test_a_stale_index_stays_stale_until_built_even_when_the_counts_come_out_equal(tmp_path: Path) -> None:
    idx = IdIndex(tmp_path)
    idx.build("c", ["a", "b", "y"])
    assert idx.stale("c")  # an add of x1, x2: killed after Chroma stored x1 (the index never hears of it)
    assert not idx.stale("c")  # a delete of y: killed after Chroma deleted y
    was = idx.stale("c")
    idx.added("c", ["z"], stored=4, was_fresh=was)  # a write that finishes: 4 ids held, 4 stored, but not the same ones
    state = idx.state("c")
    assert state is not None and not was and state.rows == state.stored == 4 and not state.agrees(4)


def test_a_failing_file_is_removed_and_the_index_given_up_for_the_process(tmp_path: Path) -> None:
    (tmp_path / FILE).write_bytes(b"this is not a database" * 100)
    idx = IdIndex(tmp_path)
    with pytest.raises(IdIndexError, match="built again by the next process"):
        idx.state("c")
    assert not (tmp_path / FILE).exists() and idx.unavailable
    with pytest.raises(IdIndexError):
        idx.build("c", ["a"])  # (given up for this process: nothing half-written beside the store)
    fresh = IdIndex(tmp_path)  # the next process starts a new file
    fresh.build("c", ["a"])
    fresh.close()
    with pytest.raises(IdIndexError, match="closed"):
        fresh.after("c", 0, 5)


def test_cursors_name_their_epoch() -> None:
    assert decode_cursor(encode_cursor(123456, 42), 123456) == 42
    for bad in (
        "",
        "42",
        "zz.1",
        f"{123457:x}.42",
        f"{123456:x}.-1",
        f"{123456:x}.x",
        "1e.2.3",
        f"{123456:x}.²",
        f"{123456:x}." + "9" * 30,
    ):
        with pytest.raises(InputError, match="start again without a cursor"):
            decode_cursor(bad, 123456)
