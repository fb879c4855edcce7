"""The catalogue's rules as pure functions: the split quota, append-only labels, the plan of a sync (no store)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from lookalike.data.catalogue import assign_splits, balance, merge_labels, plan
from lookalike.data.datasets import Item, load_dataset


def _items(label: int, start: int, n: int) -> list[Item]:
    return [Item(f"folder:{label}/{i:05d}.png", label, "", f"{label}/{i:05d}.png") for i in range(start, start + n)]


def test_a_growing_shrinking_label_keeps_its_held_out_share_and_no_item_moves() -> None:
    """Deleting items can skew a label's share (nothing stored ever moves); the label's next new items restore it."""
    rng = np.random.default_rng(0)
    stored: dict[str, tuple[int, str]] = {}
    next_i = 0
    for step in range(60):
        new = _items(step % 3, next_i, int(rng.integers(1, 40)))
        next_i += len(new)
        got = assign_splits(new, stored.values(), fraction=0.2, seed=7)
        before = dict(stored)
        stored.update({it.id: (it.label, it.split) for it in got})
        assert all(stored[i] == s for i, s in before.items())  # nothing stored changes split
        test, total = balance(stored.values())[step % 3]
        held = sum(it.split == "test" for it in got)
        if total >= 100 and 0 < held < len(got):  # a label that gained items is back at the fraction (unless clamped)
            assert abs(test / total - 0.2) <= 0.02, (step, test, total)
        if step % 4 == 3:  # delete a random tenth
            ids = sorted(stored)
            for i in rng.choice(len(ids), size=len(ids) // 10, replace=False):
                del stored[ids[i]]


def test_a_split_interrupted_halfway_ends_as_the_uninterrupted_one() -> None:
    kept = [(0, "train")] * 70 + [(0, "test")] * 10
    new = _items(0, 0, 50)
    whole = {it.id: it.split for it in assign_splits(new, kept, fraction=0.2, seed=3)}
    assert sum(s == "test" for s in whole.values()) == 16  # round(0.2 * 130) - 10 already held out
    for cut in (1, 17, 30, 49):
        written = [it for it in new if it.id in {i.id for i in new[:cut]}]
        first = {it.id: whole[it.id] for it in written}  # what the killed sync wrote, with the splits it gave
        rest = assign_splits(new[cut:], kept + [(0, first[it.id]) for it in written], fraction=0.2, seed=3)
        assert {**first, **{it.id: it.split for it in rest}} == whole


def test_new_labels_are_appended_never_renumbered(tmp_path: Path) -> None:
    for name in ("b", "c", "a0"):
        (tmp_path / name).mkdir()
        Image.new("L", (8, 8), 9).save(tmp_path / name / "x.png")
    ds = load_dataset("folder", tmp_path)
    assert ds.label_names == ["a0", "b", "c"]
    merged, new = merge_labels(["b", "c"], ds)
    assert merged.label_names == ["b", "c", "a0"] and new == ["a0"]
    assert {it.locator: it.label for it in merged.items} == {"b/x.png": 0, "c/x.png": 1, "a0/x.png": 2}


def test_the_plan_tells_new_changed_touched_unchanged_and_gone_files(tmp_path: Path) -> None:
    root = tmp_path / "f"
    for i in range(6):
        (root / "a").mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8), 10 * i).save(root / "a" / f"{i}.png")
    ds = load_dataset("folder", root)
    first = plan(ds, {}, fraction=0.2, seed=0)
    assert len(first.add) == 6 and all(it.sha256 and it.split in ("train", "test") for it in first.add)
    stored = {it.id: it.metadata("folder", ds.label_names) for it in first.add}
    Image.new("L", (8, 8), 200).save(root / "a" / "0.png")  # changed
    os.utime(root / "a" / "1.png", ns=(1, 10**9))  # touched, same bytes
    (root / "a" / "2.png").unlink()  # gone
    Image.new("L", (8, 8), 99).save(root / "a" / "9.png")  # new
    again = plan(load_dataset("folder", root), stored, fraction=0.2, seed=0)
    assert [it.locator for it in again.update] == ["a/0.png"] and again.update[0].split == stored["folder:a/0.png"]["split"]
    assert [it.locator for it in again.refresh] == ["a/1.png"] and again.refresh[0].mtime_ns == 10**9
    assert [it.locator for it in again.add] == ["a/9.png"]
    assert again.gone == ["folder:a/2.png"] and again.unchanged == 3
