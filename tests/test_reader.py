from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lookalike.data.datasets import load_dataset
from lookalike.data.images import Unreadable
from lookalike.data.reader import read_batches


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """Two labels of 640x480 colour JPEGs (smooth, photo-like), 12 each."""
    rng = np.random.default_rng(0)
    xx = np.mgrid[0:480, 0:640][1]
    for label in ("dark", "light"):
        (tmp_path / "photos" / label).mkdir(parents=True)
        for i in range(12):
            base = 60 if label == "dark" else 190
            img = np.dstack([(base + 40 * np.sin(xx / (30 + i) + c) + rng.normal(0, 3, xx.shape)) for c in range(3)])
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(tmp_path / "photos" / label / f"{i:02d}.jpg", quality=90)
    return tmp_path / "photos"


def test_batches_come_in_order_decoded_near_the_embedder_size(photos: Path) -> None:
    ds = load_dataset("folder", photos, decode_size=64)
    batches = list(read_batches(ds, ds.items, 5, workers=3))
    assert [it for b in batches for it in b.items] == ds.items
    assert [len(b.items) for b in batches] == [5, 5, 5, 5, 4]
    for b in batches:
        for im in b.images:
            assert isinstance(im, np.ndarray) and im.shape[:2] == (120, 160)  # a 1/4-scale JPEG decode: 1/8 would leave 60 < 64 rows
        assert b.decode_seconds > 0
    serial = [ds.read_one(it) for it in ds.items[:5]]
    assert all(np.array_equal(a, b) for a, b in zip(serial, batches[0].images))  # threads change nothing


def test_decoding_runs_ahead_in_bounded_memory(photos: Path) -> None:
    ds = load_dataset("folder", photos, decode_size=64)
    started: list[int] = []
    real = ds.read_one

    def counting(it: object) -> object:
        started.append(threading.get_ident())
        return real(it)

    ds.read_one = counting
    batches = read_batches(ds, ds.items, 4, workers=2, prefetch=1)
    first = next(batches)
    time.sleep(0.5)  # the consumer is slow: the reader may be at most prefetch + 1 batches ahead
    assert len(first.items) == 4 and 8 <= len(started) <= 12
    batches.close()  # stopping early leaves no thread behind
    time.sleep(0.2)
    assert not any(t.name == "lookalike-reader" and t.is_alive() for t in threading.enumerate())


def test_a_failing_reader_raises_in_the_consumer(photos: Path) -> None:
    ds = load_dataset("folder", photos, decode_size=64)

    def broken(it: object) -> object:
        raise MemoryError("no room")

    ds.read_one = broken
    with pytest.raises(MemoryError, match="no room"):
        list(read_batches(ds, ds.items, 4))


def test_arrays_are_read_in_the_callers_thread(tiny_npz: Path) -> None:
    ds = load_dataset("mnist", source=tiny_npz)
    assert ds.read_one is None
    batches = list(read_batches(ds, ds.items[:30], 8))
    assert [len(b.items) for b in batches] == [8, 8, 8, 6] and batches[0].images[0].shape == (28, 28)


def test_links_out_of_the_folder_are_not_followed(photos: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    (outside / "more").mkdir(parents=True)
    Image.new("RGB", (50, 50)).save(outside / "secret.png")
    Image.new("RGB", (50, 50)).save(outside / "more" / "x.png")
    (photos / "dark" / "secret.png").symlink_to(outside / "secret.png")
    (photos / "dark" / "more").symlink_to(outside / "more", target_is_directory=True)
    (photos / "linked").symlink_to(outside, target_is_directory=True)
    (photos / "light" / "same.jpg").symlink_to(photos / "light" / "00.jpg")  # inside the folder: kept
    ds = load_dataset("folder", photos)
    assert sorted(ds.skipped_links) == ["dark/more", "dark/secret.png", "linked"]
    assert ds.label_names == ["dark", "light"] and len(ds.items) == 25
    followed = load_dataset("folder", photos, follow_links=True)
    assert (
        followed.skipped_links == [] and followed.label_names == ["dark", "light", "linked"] and len(followed.items) == 28
    )  # elsewhere/more once
    assert isinstance(followed.read_one(next(it for it in followed.items if it.locator == "dark/secret.png")), np.ndarray)
    assert not isinstance(ds.load(ds.items[:1])[0], Unreadable)


def test_link_loops_and_links_back_up_are_walked_once(tmp_path: Path) -> None:
    root = tmp_path / "pics"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (20, 20), 40 * i).save(root / label / f"{i}.png")
    (root / "a" / "x.png").symlink_to(root / "a" / "y.png")  # a loop of links
    (root / "a" / "y.png").symlink_to(root / "a" / "x.png")
    (root / "b" / "up").symlink_to(root, target_is_directory=True)  # a folder linked back up: a cycle
    (root / "a" / "other").symlink_to(root / "b", target_is_directory=True)  # another label's folder: not twice
    (root / ".shared").mkdir()
    Image.new("L", (20, 20)).save(root / ".shared" / "s.png")
    (root / "a" / "shared").symlink_to(root / ".shared", target_is_directory=True)  # a folder linked inside: read
    ds = load_dataset("folder", root)
    assert sorted(ds.skipped_links) == ["a/x.png", "a/y.png"]
    assert sorted(it.locator for it in ds.items) == sorted(
        [f"a/{i}.png" for i in range(3)] + ["a/shared/s.png"] + [f"b/{i}.png" for i in range(3)]
    )
    followed = load_dataset("folder", root, follow_links=True)
    assert len(followed.items) == 7  # each real folder once, however many ways lead to it
