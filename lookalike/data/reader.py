"""The reader: a dataset's images decoded on a small thread pool, ahead of the embedder, in bounded memory.

Decoding a folder of photos is most of an ingest's work (a 3000x2000 JPEG takes ~48 ms to decode
in full on one core here, ~6 ms in Pillow's draft mode). :func:`read_batches` decodes each batch's
files on ``workers`` threads (Pillow releases the GIL while it decodes) while the caller embeds and
writes the previous batch; at most ``prefetch`` decoded batches wait in a queue, so memory depends
on neither the folder's size nor its photos' size (each image is already near the embedder's input
size when it leaves :func:`lookalike.data.images.read_image`). Array datasets (MNIST) need no decoding
and are read in the caller's thread.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from lookalike.data.datasets import Dataset, Item
from lookalike.data.images import Unreadable

PREFETCH = 2  # decoded batches waiting for the embedder


def default_workers() -> int:
    """Decode threads: the cores this process may use, at most 4."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


@dataclass
class Batch:
    """One batch: its items, their pixels (or why not) and the wall time its decoding took."""

    items: list[Item]
    images: list[np.ndarray | Unreadable]
    decode_seconds: float


def read_batches(
    ds: Dataset, items: Sequence[Item], batch_size: int, workers: int | None = None, prefetch: int = PREFETCH
) -> Iterator[Batch]:
    """``items`` in batches of ``batch_size``, in order, decoded ahead on ``workers`` threads."""
    chunks = [list(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]
    if ds.read_one is None:  # arrays in memory: nothing to overlap
        for chunk in chunks:
            started = time.perf_counter()
            images = ds.load(chunk)
            yield Batch(chunk, images, time.perf_counter() - started)
        return
    read_one = ds.read_one
    done: queue.Queue[Batch | BaseException | None] = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()

    def guarded(it: Item) -> np.ndarray | Unreadable:
        return Unreadable(it.locator, "unreadable", "not read: the ingest stopped") if stop.is_set() else read_one(it)

    def produce() -> None:
        try:
            with ThreadPoolExecutor(max_workers=workers or default_workers(), thread_name_prefix="lookalike-decode") as pool:
                for chunk in chunks:
                    if stop.is_set():
                        return
                    started = time.perf_counter()
                    images = list(pool.map(guarded, chunk))
                    if stop.is_set():  # the consumer left mid-batch: the rest was not decoded
                        return
                    _put(Batch(chunk, images, time.perf_counter() - started))
            _put(None)
        except BaseException as exc:  # handed to the consumer, raised there
            _put(exc)

    def _put(value: Batch | BaseException | None) -> None:
        while not stop.is_set():
            try:
                done.put(value, timeout=0.1)
                return
            except queue.Full:
                continue

    producer = threading.Thread(target=produce, name="lookalike-reader", daemon=True)
    producer.start()
    try:
        while True:
            got = done.get()
            if got is None:
                return
            if isinstance(got, BaseException):
                raise got
            yield got
    finally:  # the consumer stopped (finished, failed or interrupted): let the producer go
        stop.set()
        producer.join(timeout=5)
